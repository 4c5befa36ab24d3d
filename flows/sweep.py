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
                   (``flows/device_slot.py``)
4. sweep-report  - comparison table (Prefect table artifact, MLflow table on the parent run)
5. register      - only the best trial (by the gate metric on the eval split) goes through the same
                   register stage and promotion gate as ``qlora run``; the other trials stay runs

Why both ways of running a trial: ``run_deployment`` is what spreads trials over a pool's workers, but
needs a server, a deployment and a worker; a bare ``qlora sweep`` has none of those (Prefect's temporary
server only), and subflows need nothing. Both are real flow runs, linked to the sweep's flow run in the UI.
A worker running trials needs the same ``workdir`` as the sweep (registering reads the best adapter there).
"""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from prefect import flow, runtime

from flows import sweep_stages
from flows.device_slot import ensure_device_limit
from flows.finetune import _fail_mlflow_runs, _notify_failure, register_and_report, train_and_evaluate
from qlora.config.schema import PipelineConfig
from qlora.errors import ConfigError, UserError
from qlora.refs import MlflowRun, Trained
from flows.sweep_plan import SweepConfig, SweepResult, Trial, TrialOutcome, best, grid_trials, ranking_metric, table
from qlora.tracking.runs import end_run
from registry.gate import gate_metric

log = logging.getLogger("qlora.sweep")


@flow(name="qlora-trial", log_prints=True, on_failure=[_fail_mlflow_runs], on_crashed=[_fail_mlflow_runs])
def qlora_trial(config: PipelineConfig = PipelineConfig(), run: MlflowRun | None = None) -> Trained:
    """One sweep trial: tokenize -> quantize -> train -> evaluate into the child MLflow run ``run``; never registers."""
    ensure_device_limit()  # this worker's trainings queue on its own device
    status = "FAILED"
    if run is not None:
        sweep_stages.attach_trial_run(run, config, str(runtime.flow_run.id))
    try:
        trained = train_and_evaluate(config, run)
        if run is not None:
            sweep_stages.record_trial(run, trained)  # read back by a sweep in another process
        status = "FINISHED"
        return trained
    finally:
        if run is not None:
            end_run(run, status)


@flow(name="qlora-sweep", log_prints=True, on_failure=[_fail_mlflow_runs, _notify_failure],
      on_crashed=[_fail_mlflow_runs, _notify_failure])
def qlora_sweep(config: PipelineConfig = PipelineConfig(), sweep: SweepConfig = SweepConfig(grid={"train.learning_rate": [1e-4, 2e-4]})) -> SweepResult:
    """Train ``config`` once per point of ``sweep.grid`` and register only the best trial."""
    search = _search(config, sweep)  # every trial config validated before anything starts
    if sweep.trial_deployment:
        _check_deployment(sweep.trial_deployment)
    else:
        ensure_device_limit()
    me = runtime.flow_run
    parent = sweep_stages.open_parent_run(config, sweep, me.name, str(me.id))
    status = "FAILED"
    try:
        outcomes = _run_all(search, config, sweep, parent, me.name, str(me.id))
        metric = _ranking(config, outcomes)
        winner = best(outcomes, metric)
        rows = table(outcomes, metric, winner)
        sweep_stages.publish_sweep(parent, rows, metric, config.registry.model_name, winner.run if winner else None)
        if winner is None:
            raise UserError(f"all {len(outcomes)} trials failed, nothing to register: "
                            + "; ".join(f"trial {o.index}: {o.message}" for o in outcomes))
        log.info("best trial %d (%s) by %s = %s", winner.index, winner.values, metric, winner.metrics.get(metric))
        version = register_and_report(winner.config, winner.trained, winner.run)
        end_run(winner.run, "FINISHED")  # registering re-opened it
        status = "FINISHED"
        return SweepResult(version=version, best_trial=winner.index, metric=metric, rows=rows)
    finally:
        end_run(parent, status)


def _ranking(config: PipelineConfig, outcomes: list[TrialOutcome]) -> str:
    """Trials are ranked by the metric the promotion gate would compare for them (same eval rows in every trial)."""
    done = [o for o in outcomes if o.trained]
    gate = gate_metric(config.registry.gate_metric, done[0].trained.report.samples) if done else "exact_match"
    return ranking_metric(gate, outcomes)


def _search(config: PipelineConfig, sweep: SweepConfig):
    if sweep.sampler == "tpe":
        from flows.tpe import TpeSearch

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
    run = sweep_stages.open_trial_run(parent, config, trial, run_name, sweep_id)
    t0 = time.perf_counter()
    if sweep.trial_deployment:
        from prefect.deployments import run_deployment

        fr = run_deployment(sweep.trial_deployment, parameters={"config": trial.config.model_dump(mode="json"),
                            "run": run.model_dump()}, flow_run_name=run_name, timeout=None, poll_interval=2)
        state, flow_run_id = fr.state, str(fr.id)
        trained = sweep_stages.read_trial_record(run) if state.is_completed() else None
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
