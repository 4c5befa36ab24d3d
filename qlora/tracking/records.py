"""What a flow leaves in its MLflow run beyond metrics, for whoever comes later: the full resolved config
(``config.json``, what ``qlora reproduce`` rebuilds a registered version from) and a trial's outcome
(``sweep/trial.json``, what a sweep reads back when the trial ran in another process or on another worker).
"""

from __future__ import annotations

import os

from qlora.config.schema import PipelineConfig
from qlora.refs import MlflowRun, Trained

CONFIG_ARTIFACT = "config.json"
TRIAL_ARTIFACT = "sweep/trial.json"
CWD_TAG = "qlora.cwd"  # relative paths in the config (workdir, data, base) are relative to this


def log_config(run: MlflowRun, config: PipelineConfig) -> None:
    """The resolved config as JSON (also valid YAML: `qlora run config.json` runs it again)."""
    import mlflow

    client = mlflow.MlflowClient(run.tracking_uri)
    client.log_dict(run.run_id, config.model_dump(mode="json"), CONFIG_ARTIFACT)
    client.set_tag(run.run_id, CWD_TAG, os.getcwd())


def read_config(run: MlflowRun) -> PipelineConfig | None:
    """The config a run logged, or None when it has none (runs from before configs were logged)."""
    raw = _load_dict(run, CONFIG_ARTIFACT)
    return None if raw is None else PipelineConfig.model_validate(raw)


def log_trial(run: MlflowRun, trained: Trained) -> None:
    import mlflow

    mlflow.MlflowClient(run.tracking_uri).log_dict(run.run_id, trained.model_dump(mode="json"), TRIAL_ARTIFACT)


def read_trial(run: MlflowRun) -> Trained | None:
    raw = _load_dict(run, TRIAL_ARTIFACT)
    return None if raw is None else Trained.model_validate(raw)


def _load_dict(run: MlflowRun, path: str) -> dict | None:
    import mlflow

    names = {f.path for f in mlflow.MlflowClient(run.tracking_uri).list_artifacts(run.run_id, os.path.dirname(path) or None)}
    if path not in names:
        return None
    mlflow.set_tracking_uri(run.tracking_uri)
    return mlflow.artifacts.load_dict(f"runs:/{run.run_id}/{path}")


def start_child_run(parent: MlflowRun, experiment_id: str, run_name: str, params: dict, tags: dict[str, str]) -> MlflowRun:
    """A run nested under ``parent`` (MLflow's ``mlflow.parentRunId`` tag: the UI shows it under the parent, and
    the parent's child runs compare in one parallel-coordinates view) with ``params`` logged."""
    import mlflow

    client = mlflow.MlflowClient(parent.tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent.run_id, **tags})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    return MlflowRun(tracking_uri=parent.tracking_uri, run_id=run.info.run_id)
