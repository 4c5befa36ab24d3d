"""A LoggedModel per evaluated checkpoint (MLflow 3): the experiment's Models view shows the checkpoints side by
side, ranked by their task metric, and ``mlflow.search_logged_models`` finds them.

Each is named ``checkpoint-<step>``, tagged with its step, and holds the checkpoint's adapter only
(``adapter_model.safetensors`` + ``adapter_config.json``: a few MB for a LoRA; the optimizer and scheduler
state stay in the run dir, they resume training and serve nobody). Its metrics, ``during_eval/<metric>`` and
``during_eval/loss``, are logged against its ``model_id`` and the during-training slice as an MLflow dataset,
at the checkpoint's step, in the flow's run. Only rank 0 logs (``selection.GenerationEvalCallback``). A
tracking fault costs these records, never the training (one warning, as for every other tracking outage).
A re-run that evaluates a step again (after a kill) reuses that step's LoggedModel.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from qlora.refs import MlflowRun
from qlora.tracking.outage import is_down, is_tracking_fault, mark_down

log = logging.getLogger("qlora.train")

MODEL_TYPE = "peft-lora-checkpoint"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# The run dir's name (its config key): one MLflow run may hold several trainings (a test, a changed config re-run).
TRAINING_TAG = "checkpoint.training"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def find_checkpoint_model(client, experiment_id: str, run_id: str, step: int, training: str):
    """This run's LoggedModel of the checkpoint at ``step`` of the run dir named ``training``, or None."""
    found = client.search_logged_models([experiment_id], filter_string=(
        f"source_run_id = '{run_id}' AND name = '{checkpoint_name(step)}' AND tags.`{TRAINING_TAG}` = '{training}'"))
    return found[0] if found else None


def checkpoint_model_id(run: MlflowRun, step: int, training: str) -> str | None:
    """The id of this run's LoggedModel of the checkpoint at ``step`` (None if absent or the server is down)."""
    if is_down(run):
        return None
    import mlflow

    try:
        client = mlflow.MlflowClient(run.tracking_uri)
        model = find_checkpoint_model(client, client.get_run(run.run_id).info.experiment_id, run.run_id, step, training)
    except Exception as e:  # noqa: BLE001 - only tracking faults are swallowed
        if not is_tracking_fault(e):
            raise
        mark_down(run, e)
        return None
    return model.model_id if model else None


def checkpoint_model_logger(run: MlflowRun, metric: str, rows=None):
    """``on_checkpoint(step, checkpoint_dir, record)`` for the generation-eval callback; ``rows`` (the
    during-training slice, with prompt and reference) becomes the dataset its metrics are logged against."""
    dataset = [None]

    def on_checkpoint(step: int, checkpoint_dir: str, record: dict) -> str | None:
        if is_down(run):
            return None
        try:
            return _log(run, metric, step, Path(checkpoint_dir), record, dataset, rows)
        except Exception as e:  # noqa: BLE001 - only tracking faults are swallowed
            if not is_tracking_fault(e):
                raise
            mark_down(run, e)
            return None

    return on_checkpoint


def slice_dataset(rows):
    """The during-training slice as an MLflow dataset (name, digest of its content)."""
    import mlflow

    df = rows.select_columns(["prompt", "reference"]).to_pandas()
    return mlflow.data.from_pandas(df, name="eval-during-training", targets="reference")


def _log(run: MlflowRun, metric: str, step: int, ckpt: Path, record: dict, dataset: list, rows) -> str:
    import mlflow

    client = mlflow.MlflowClient(run.tracking_uri)
    experiment_id = client.get_run(run.run_id).info.experiment_id
    training = ckpt.parent.name
    model = find_checkpoint_model(client, experiment_id, run.run_id, step, training)
    if model is None:
        model = client.create_logged_model(experiment_id, name=checkpoint_name(step), source_run_id=run.run_id,
                                           tags={"checkpoint.step": str(step), "checkpoint.metric": metric,
                                                 TRAINING_TAG: training},
                                           params={"step": str(step)}, model_type=MODEL_TYPE)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ADAPTER_FILES:
                shutil.copy2(ckpt / name, Path(tmp) / name)
            client.log_model_artifacts(model.model_id, tmp)
        client.finalize_logged_model(model.model_id, "READY")
    if rows is not None and dataset[0] is None:
        dataset[0] = slice_dataset(rows)
        from mlflow.entities import DatasetInput, InputTag

        # A run input too, so the run's Datasets column lists the slice beside the training and eval data.
        client.log_inputs(run.run_id, [DatasetInput(dataset[0]._to_mlflow_entity(),
                                                    [InputTag(key="mlflow.data.context", value="eval-during-training")])])
    ds = dataset[0]
    named = dict(dataset_name=ds.name, dataset_digest=ds.digest) if ds is not None else {}
    for key, value in ((f"during_eval/{metric}", record["value"]), ("during_eval/loss", record["eval_loss"])):
        client.log_metric(run.run_id, key, float(value), step=step, model_id=model.model_id, synchronous=True, **named)
    log.info("checkpoint %d logged to MLflow as LoggedModel %s (%s %.4f)", step, model.model_id, metric, record["value"])
    return model.model_id
