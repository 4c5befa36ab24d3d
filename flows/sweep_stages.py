"""Prefect tasks of a sweep: the parent MLflow run, each trial's child run and its record, and the
comparison table. Thin wrappers (the work is in ``qlora/tracking/records.py`` and ``flows/sweep_plan.py``), retried on
transient faults like every stage (``flows/stages.py``).
"""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_table_artifact

from qlora.config.schema import PipelineConfig
from qlora.errors import retry_transient
from qlora.tracking.records import log_config, log_trial, read_trial, start_child_run
from qlora.refs import MlflowRun, Trained
from flows.sweep_plan import SweepConfig, Trial
from qlora.tracking.runs import ensure_experiment, start_run
from tasks.reporting import artifact_key

_common = dict(retry_condition_fn=retry_transient, retry_jitter_factor=0.5, retries=2, retry_delay_seconds=[2, 10])


@task(name="open-sweep-run", **_common)
def open_parent_run(config: PipelineConfig, sweep: SweepConfig, run_name: str | None, flow_run_id: str) -> MlflowRun:
    """The sweep's MLflow run: the base config, the sweep spec, and later the comparison table and the winner."""
    import mlflow

    tags = {"prefect.flow_run_id": flow_run_id, "sweep.role": "parent", "sweep.sampler": sweep.sampler,
            "sweep.grid": json.dumps(sweep.grid)[:5000]}
    run = start_run(config.tracking, run_name, tags)
    log_config(run, config)
    mlflow.MlflowClient(run.tracking_uri).log_dict(run.run_id, sweep.model_dump(mode="json"), "sweep.json")
    return run


@task(name="open-trial-run", **_common)
def open_trial_run(parent: MlflowRun, config: PipelineConfig, trial: Trial, run_name: str, sweep_flow_run_id: str) -> MlflowRun:
    """A child run per trial, its swept values as flat ``sweep.<key>`` params (MLflow's parallel coordinates)."""
    params = {f"sweep.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in trial.values.items()}
    tags = {"sweep.role": "trial", "sweep.trial": str(trial.index), "prefect.sweep_flow_run_id": sweep_flow_run_id,
            "config_hash": trial.config.fingerprint()}
    return start_child_run(parent, ensure_experiment(config.tracking), run_name, params | {"sweep.trial": trial.index}, tags)


@task(name="attach-trial-run", **_common)
def attach_trial_run(run: MlflowRun, config: PipelineConfig, flow_run_id: str) -> None:
    """The trial flow run takes its child run: its id (failure hooks find the run by it) and its config."""
    import mlflow

    mlflow.MlflowClient(run.tracking_uri).set_tag(run.run_id, "prefect.flow_run_id", flow_run_id)
    log_config(run, config)


@task(name="record-trial", **_common)
def record_trial(run: MlflowRun, trained: Trained) -> None:
    log_trial(run, trained)


@task(name="read-trial", **_common)
def read_trial_record(run: MlflowRun) -> Trained | None:
    """What a trial that ran in another process (a deployment's flow run) recorded in its child run."""
    return read_trial(run)


@task(name="sweep-report", **_common)
def publish_sweep(parent: MlflowRun, rows: list[dict], metric: str, model_name: str, best_run: MlflowRun | None) -> str:
    """The comparison table as a Prefect table artifact and as an MLflow table on the parent run, plus its counts."""
    import mlflow

    from qlora.tracking.runs import active_run

    key = artifact_key(model_name, "sweep")
    create_table_artifact(rows, key=key, description=f"sweep trials, best by {metric} on the eval split")
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    with active_run(parent):
        mlflow.log_table({c: [r[c] for r in rows] for c in rows[0]}, artifact_file="sweep/trials.json")
        mlflow.log_metrics({"sweep/trials": len(rows), "sweep/completed": len(completed), "sweep/failed": len(rows) - len(completed)})
        if best_run is not None:
            mlflow.log_metric(f"best/{metric}", next(r[metric] for r in rows if r["best"]))
            mlflow.set_tags({"sweep.best_run_id": best_run.run_id, "sweep.metric": metric})
    return key
