"""Flow ``qlora-serving-bundle``: lay a registered version out for vLLM multi-LoRA serving (``registry/bundle.py``).

Started by ``qlora bundle`` or, in ``prefect.yaml``, by the event ``champion`` moving: the bundle of the new champion
is in ``OUT/<name>-v<version>/`` with its manifest, ready for ``qlora serve-check`` and ``vllm serve``.
"""

from __future__ import annotations

from prefect import flow, task

from qlora.config.schema import TrackingConfig
from qlora.errors import retry_transient
from qlora.tracking.runs import resolve_uri, using_tracking_uri
from registry import batch
from registry.bundle import write_bundle


@task(name="write-bundle", retry_condition_fn=retry_transient, retries=2, retry_delay_seconds=[2, 10])
def bundle(model_uri: str, out: str, tracking_uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    name, version = batch.resolve(client, model_uri)
    with using_tracking_uri(tracking_uri):  # the artifact download resolves models:/ in the same registry as the client
        return str(write_bundle(client, name, version, out.format(name=name, version=version)))


@flow(name="qlora-serving-bundle", log_prints=True)
def qlora_serving_bundle(model_uri: str, out: str, tracking_uri: str | None = None) -> str:
    """``model_uri``: models:/NAME/VERSION (or @ALIAS, resolved once); ``out``: the bundle folder ({name}, {version}
    filled in). Returns the manifest's path."""
    return bundle(model_uri, out, resolve_uri(TrackingConfig(uri=tracking_uri)))
