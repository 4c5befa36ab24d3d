"""MLflow plumbing: which store, which experiment, and one run per flow run shared by all tasks."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from qlora import locks
from qlora.config.schema import TrackingConfig
from qlora.errors import TrackingUnavailable, is_transient
from qlora.refs import MlflowRun
from qlora.tracking.names import filter_literal
from qlora.tracking.outage import mark_up

log = logging.getLogger("qlora.tracking")

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextlib.contextmanager
def using_tracking_uri(uri: str | None):
    """``uri`` as MLflow's tracking (and default registry) URI inside the block; the caller's own setting, or none,
    is back afterwards. For code other programs call (``registry.consumer``): a consumer logging to its own
    server must not find its later runs in the registry it loaded a model from. ``None``: the caller's as it is."""
    if not uri:
        yield
        return
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


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


def _run_id_file(workdir: str | Path, key: str) -> Path:
    return Path(workdir) / "mlflow-runs" / f"{key}.json"


def _saved_run(saved: Path) -> MlflowRun | None:
    """The run id an earlier attempt of this config saved, or None; a record that does not parse (cut short,
    edited) is said once and replaced by a new run's, never a traceback."""
    if not saved.is_file():
        return None
    try:
        return MlflowRun.model_validate_json(saved.read_text())
    except (ValueError, OSError) as e:
        log.warning("run record %s is broken (%s): starting a new MLflow run and saving its id there", saved, type(e).__name__)
        return None


def release_run_record(workdir: str | Path, key: str) -> None:
    """At the end of a flow run: let a later run of the same config continue or replace its MLflow run."""
    locks.release_run_record(_run_id_file(workdir, key))


def start_or_resume_run(
    cfg: TrackingConfig, workdir: str | Path, key: str, run_name: str | None, tags: dict[str, str] | None = None
) -> MlflowRun:
    """The MLflow run of config ``key``: the unfinished one a killed or failed attempt left, else a new one.

    The run id is kept under ``workdir`` next to the checkpoints, so a re-run that resumes training
    also continues the same MLflow run and the loss curve stays one curve. Only a run whose owner is
    gone is continued: the flow holds ``<key>.lock`` until ``release_run_record``.
    """
    try:
        run = _start_or_resume_run(cfg, workdir, key, run_name, tags)
        mark_up(run)  # answering again: stages log into it again
        return run
    except Exception as e:  # noqa: BLE001 - re-raised, transient ones with a message a user can act on
        if not is_transient(e):
            raise
        raise TrackingUnavailable(
            f"MLflow tracking server at {resolve_uri(cfg)} is unreachable ({str(e).splitlines()[0][:200]}). "
            "Nothing was registered. Trained adapters and checkpoints are kept under "
            f"{workdir}: re-run the same command once the server is back (tracking.uri / $MLFLOW_TRACKING_URI) "
            "and nothing is retrained."
        ) from e


def _start_or_resume_run(cfg, workdir, key, run_name, tags) -> MlflowRun:
    import mlflow

    uri = resolve_uri(cfg)
    client = mlflow.MlflowClient(uri)
    saved = _run_id_file(workdir, key)
    if not locks.own_run_record(saved, (tags or {}).get("prefect.flow_run_id")):
        log.info("another run of this config is in progress (it holds %s): this one gets its own MLflow run",
                 saved.with_suffix(".lock"))
        return start_run(cfg, run_name, tags)
    prev = _saved_run(saved)
    if prev is not None:
        try:
            info = client.get_run(prev.run_id).info if prev.tracking_uri == uri else None
        except mlflow.exceptions.MlflowException as e:
            if is_transient(e):
                raise
            info = None  # deleted run or another store: start afresh
        if info is not None and info.status != "FINISHED" and info.lifecycle_stage == "active":
            client.update_run(prev.run_id, status="RUNNING")
            for k, v in (tags or {}).items():
                client.set_tag(prev.run_id, k, v)
            log.info("continuing MLflow run %s (was %s) of an interrupted attempt", prev.run_id, info.status)
            return prev
    run = start_run(cfg, run_name, tags)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(run.model_dump_json())
    return run


def fail_runs_of_flow_run(cfg: TrackingConfig, flow_run_id: str) -> list[str]:
    """Mark every still-RUNNING MLflow run of this Prefect flow run FAILED; returns their ids."""
    import mlflow

    client = mlflow.MlflowClient(resolve_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`prefect.flow_run_id` = {filter_literal(flow_run_id)} and attributes.status = 'RUNNING'"
    )
    for r in runs:
        client.set_terminated(r.info.run_id, status="FAILED")
    return [r.info.run_id for r in runs]


def end_run(run: MlflowRun, status: str = "FINISHED", required: bool = False) -> None:
    """Mark ``run`` ``status``. A tracking server that does not answer is one warning (the run stays RUNNING until
    a re-run continues it), unless ``required``: then the error is raised, for the caller to retry."""
    import mlflow

    try:
        mlflow.MlflowClient(run.tracking_uri).set_terminated(run.run_id, status=status)
    except Exception as e:  # noqa: BLE001 - must not hide the flow's own outcome or error
        if required or not is_transient(e):
            raise
        log.warning("could not mark MLflow run %s %s (%s); it stays RUNNING until a re-run continues it", run.run_id, status, e)


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
