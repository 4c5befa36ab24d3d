"""The ``qlora-sweep`` flow: one flow run per trial, one MLflow child run per trial, one registered version.

Stages:
1. plan          - the grid's combinations (or Optuna TPE's picks), each a validated config; a bad key or
                   value fails here, before anything runs
2. open-sweep-run - the parent MLflow run (base config, sweep spec)
3. trials        - each trial is its own flow run ``qlora-trial`` (tokenize -> quantize -> train -> evaluate
                   into its child MLflow run), ``sweep.max_parallel`` at a time:
                   - a subflow in this process (the CLI, or a deployment without trial_deployment), or
                   - a flow run of ``sweep.trial_deployment`` (``run_deployment``), which the work pool's
                     workers pick up, so trials spread over machines.
                   Trials share tokenize/quantize through the content-keyed caches under ``workdir`` (the
                   first writes, the others wait and hit), and train + evaluate one at a time per device
                   (``qlora/locks.py``)
4. sweep-report  - comparison table (Prefect table artifact, MLflow table on the parent run)
5. register      - only the best trial (by the gate metric on the eval split) goes through the same
                   register stage and promotion gate as ``qlora run``; the other trials stay runs

Why both ways of running a trial: ``run_deployment`` is what spreads trials over a pool's workers, but
needs a server, a deployment and a worker; a bare ``qlora sweep`` has none of those (Prefect's temporary
server only), and subflows need nothing. Both are real flow runs, linked to the sweep's flow run in the UI.
A worker running trials needs the same ``workdir`` as the sweep (registering reads the best adapter there).

Prefect tasks of a sweep: the parent MLflow run, each trial's child run and its record, and the
comparison table. Thin wrappers (the work is in ``qlora/tracking/records.py`` and ``flows/sweep_plan.py``), retried on
transient faults like every stage (``flows/stages.py``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, runtime, task
from prefect.artifacts import create_table_artifact

from flows import stages
from flows.finetune import _fail_mlflow_runs, register_and_report, train_and_evaluate
from flows.sweep_plan import SweepConfig, SweepResult, Trial, TrialOutcome, best, grid_trials, ranking_metric, table
from qlora.config.schema import PipelineConfig
from qlora.errors import ConfigError, UserError, retry_transient
from qlora.refs import MlflowRun, Trained
from qlora.tracking.records import log_config, log_trial, read_trial, start_child_run
from qlora.tracking.runs import end_run, ensure_experiment, start_run
from registry.gate import gate_metric
from tasks.reporting import artifact_key

log = logging.getLogger("qlora.sweep")


@flow(name="qlora-trial", log_prints=True, on_failure=[_fail_mlflow_runs], on_crashed=[_fail_mlflow_runs])
def qlora_trial(config: PipelineConfig = PipelineConfig(), run: MlflowRun | None = None) -> Trained:
    """One sweep trial: tokenize -> quantize -> train -> evaluate into the child MLflow run ``run``; never registers."""
    status = "FAILED"
    if run is not None:
        attach_trial_run(run, config, str(runtime.flow_run.id))
    try:
        trained = train_and_evaluate(config, run)
        if run is not None:
            record_trial(run, trained)  # read back by a sweep in another process
        status = "FINISHED"
        return trained
    finally:
        if run is not None:
            end_run(run, status)


@flow(name="qlora-sweep", log_prints=True, on_failure=[_fail_mlflow_runs], on_crashed=[_fail_mlflow_runs])
def qlora_sweep(config: PipelineConfig = PipelineConfig(), sweep: SweepConfig = SweepConfig(grid={"train.learning_rate": [1e-4, 2e-4]})) -> SweepResult:
    """Train ``config`` once per point of ``sweep.grid`` and register only the best trial."""
    search = _search(config, sweep)  # every trial config validated before anything starts
    if sweep.trial_deployment:
        _check_deployment(sweep.trial_deployment)
    me = runtime.flow_run
    parent = open_parent_run(config, sweep, me.name, str(me.id))
    status = "FAILED"
    try:
        outcomes = _run_all(search, config, sweep, parent, me.name, str(me.id))
        metric = _ranking(config, outcomes)
        winner = best(outcomes, metric)
        rows = table(outcomes, metric, winner)
        publish_sweep(parent, rows, metric, config.registry.model_name, winner.run if winner else None)
        if winner is None:
            raise UserError(f"all {len(outcomes)} trials failed, nothing to register: "
                            + "; ".join(f"trial {o.index}: {o.message}" for o in outcomes))
        log.info("best trial %d (%s) by %s = %s", winner.index, winner.values, metric, winner.metrics.get(metric))
        version = register_and_report(winner.config, winner.trained, winner.run)
        stages.close_run(winner.run, version)  # registering re-opened it; retried like the flow's own close
        stages.close_run(parent, version)  # the same for the parent: a one-try end_run only warned in an outage
        status = "FINISHED"
        return SweepResult(version=version, best_trial=winner.index, metric=metric, rows=rows)
    finally:
        if status != "FINISHED":  # FINISHED: close_run has marked it
            end_run(parent, status)


def _ranking(config: PipelineConfig, outcomes: list[TrialOutcome]) -> str:
    """Trials are ranked by the metric the promotion gate would compare for them (same eval rows in every trial)."""
    done = [o for o in outcomes if o.trained]
    gate = gate_metric(config.registry.gate_metric, done[0].trained.report.samples) if done else "exact_match"
    return ranking_metric(gate, outcomes)


def _search(config: PipelineConfig, sweep: SweepConfig):
    if sweep.sampler == "tpe":
        from flows.sweep_plan import TpeSearch

        return TpeSearch(config, sweep)
    return grid_trials(config, sweep)


def _run_all(search, config, sweep, parent, name, sweep_id) -> list[TrialOutcome]:
    """All trials, ``sweep.max_parallel`` at a time: the whole grid through one pool, TPE in asked batches."""
    with ThreadPoolExecutor(sweep.max_parallel, thread_name_prefix="trial") as pool:
        def start(trials: list[Trial]):
            # Each thread runs in a copy of this flow run's context, so its trial is linked as a child flow run.
            return [pool.submit(contextvars.copy_context().run, _run_trial, t, config, sweep, parent, name, sweep_id)
                    for t in trials]

        if isinstance(search, list):
            return [f.result() for f in start(search)]
        outcomes = []
        while not search.done:
            batch = [f.result() for f in start(search.ask(sweep.max_parallel))]
            for o in batch:
                search.tell(o, _ranking(config, batch))
            outcomes += batch
        return outcomes


def _run_trial(trial: Trial, config, sweep: SweepConfig, parent: MlflowRun, name: str, sweep_id: str) -> TrialOutcome:
    run_name = f"{name}-trial-{trial.index}"
    run = open_trial_run(parent, config, trial, run_name, sweep_id)
    t0 = time.perf_counter()
    if sweep.trial_deployment:
        from prefect.deployments import run_deployment

        fr = run_deployment(sweep.trial_deployment, parameters={"config": trial.config.model_dump(mode="json"),
                            "run": run.model_dump()}, flow_run_name=run_name, timeout=None, poll_interval=2)
        state, flow_run_id = fr.state, str(fr.id)
        trained = read_trial_record(run) if state.is_completed() else None
    else:
        state = qlora_trial.with_options(flow_run_name=run_name)(config=trial.config, run=run, return_state=True)
        flow_run_id = str(state.state_details.flow_run_id)
        trained = state.result() if state.is_completed() else None
    outcome = TrialOutcome(index=trial.index, values=trial.values, config=trial.config, status=state.type.value,
                           message=state.message or "", run=run, flow_run_id=flow_run_id,
                           duration_s=time.perf_counter() - t0, trained=trained)
    log.info("trial %d %s in %.1f s: %s", trial.index, outcome.status, outcome.duration_s, trial.values)
    return outcome


def _check_deployment(name: str) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ConfigError(f"sweep.trial_deployment: no deployment '{name}' on this Prefect server "
                          "(`make deploy` creates qlora-trial/trial)") from None


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
