"""MLflow plumbing: which store, which experiment, and one run per flow run shared by all tasks."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qlora.config import TrackingConfig
from qlora.refs import MlflowRun

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Experiment id for ``cfg.experiment_name``, created on first use (artifacts under ./mlartifacts locally)."""
    import mlflow

    uri = resolve_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is not None:
        return exp.experiment_id
    location = Path(cfg.artifact_location).resolve().as_uri() if _is_local(uri) else None
    try:
        return client.create_experiment(cfg.experiment_name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another run created it between our lookup and create.
        return client.get_experiment_by_name(cfg.experiment_name).experiment_id


def start_run(cfg: TrackingConfig, run_name: str | None, tags: dict[str, str] | None = None) -> MlflowRun:
    """Create the flow's MLflow run (status RUNNING); tasks attach to it by id."""
    import mlflow

    exp_id = ensure_experiment(cfg)
    run = mlflow.MlflowClient(resolve_uri(cfg)).create_run(exp_id, run_name=run_name, tags=tags or {})
    return MlflowRun(tracking_uri=resolve_uri(cfg), run_id=run.info.run_id)


def end_run(run: MlflowRun, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient(run.tracking_uri).set_terminated(run.run_id, status=status)


@contextlib.contextmanager
def active_run(run: MlflowRun | None):
    """Make ``run`` the active fluent run in this thread (Trainer's MLflow callback logs into it)."""
    if run is None:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    r = mlflow.start_run(run_id=run.run_id)
    try:
        yield r
    finally:
        # Detach without closing: the run belongs to the flow, which ends it (FINISHED or FAILED).
        mlflow.end_run(status="RUNNING")
