"""Flow ``qlora-batch-predict``: every row of a prompts file through one registered version, into a predictions file.

Stages: resolve the model URI to a version (once: a champion that moves during the batch does not mix versions)
-> generate in batches, resuming where an earlier run of the same output stopped -> log an MLflow run linked to
the version. Started by ``qlora batch-predict`` or, in ``prefect.yaml``, by the event ``champion`` moving.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from qlora.config.schema import TrackingConfig
from qlora.errors import retry_transient
from qlora.tracking.runs import resolve_uri
from registry import batch
from registry.consumer import generation_params

_common = dict(retry_condition_fn=retry_transient, retries=2, retry_delay_seconds=[2, 10])


@task(name="resolve-version", **_common)
def resolve_version(model_uri: str, tracking_uri: str) -> tuple[str, str]:
    import mlflow

    return batch.resolve(mlflow.MlflowClient(tracking_uri), model_uri)


@task(name="predict", **_common)  # a retry resumes at the first row not written
def predict(pinned_uri: str, input_path: str, output: str, batch_size: int, params: dict, tracking_uri: str) -> batch.BatchResult:
    return batch.predict_file(pinned_uri, batch.read_prompts(input_path), output, batch_size, params, tracking_uri)


@task(name="log-batch-run", **_common)
def log_run(result: batch.BatchResult, input_path: str, params: dict, experiment: str, tracking_uri: str) -> str:
    run_id = batch.log_batch_run(result, input_path, params, experiment, tracking_uri)
    create_markdown_artifact(key="batch-predict", markdown=(
        f"# Batch prediction: {result.name} v{result.version}\n\n{result.rows} rows ({result.generated} generated now) "
        f"from `{input_path}` to `{result.output}` in {result.seconds:.1f} s; MLflow run `{run_id}`"))
    return run_id


@flow(name="qlora-batch-predict", log_prints=True)
def qlora_batch_predict(model_uri: str, input: str, output: str, batch_size: int = 16, max_new_tokens: int = 64,
                        experiment: str = "qlora-batch-predict", tracking_uri: str | None = None) -> batch.BatchResult:
    """``model_uri``: models:/NAME@ALIAS or models:/NAME/VERSION. ``input``: .jsonl/.csv/.parquet of user messages.
    ``output``: a .jsonl path; ``{name}`` and ``{version}`` in it are filled with the resolved version."""
    uri = resolve_uri(TrackingConfig(uri=tracking_uri))
    name, version = resolve_version(model_uri, uri)
    params = generation_params(max_new_tokens)
    result = predict(f"models:/{name}/{version}", input, output.format(name=name, version=version), batch_size, params, uri)
    log_run(result, input, params, experiment, uri)
    return result
