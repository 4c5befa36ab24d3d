"""The ``qlora-finetune`` flow: five retriable tasks wired together, one MLflow run per flow run.

Stages:
0. open-mlflow-run - the config's unfinished MLflow run if a killed attempt left one, else a new run
1. tokenize  - dataset -> templated, completion-only-labelled tokens on disk
2. quantize  - base model -> pre-quantized 4-bit NF4 checkpoint on disk
3. train     - QLoRA with transformers.Trainer -> adapter on disk (metrics autologged to MLflow)
4. evaluate  - base vs tuned on the held-out split -> eval/base/* and eval/tuned/* in MLflow
5. register  - adapter -> MLflow Model Registry version (lineage tags); challenger always, champion when
               the promotion gate and the consumer check pass (and, if required, a human approves)
6. report    - loss plot to MLflow; Prefect artifacts (run report, eval examples)
A failed run and a moved champion reach people through Prefect automations (``flows/notifications.py``).

Failure semantics (issues 4, 13): an MLflow server that is down at the start or dies mid-run does not
stop training or evaluation (one warning, requests bounded by qlora/tracking/outage.py); the run is opened again
(with retries) before registering, which fails with TrackingUnavailable if the server stays away. A
failed or crashed flow run marks its MLflow run FAILED (hooks below), a SIGTERM'd one KILLED; a
SIGKILLed one leaves it RUNNING until the re-run continues it. A successful one ends with the close-mlflow-run
task (FINISHED, retried): a flow run never ends COMPLETED with its MLflow run left RUNNING (issue 29's chaos run).
"""

from __future__ import annotations

import logging

from prefect import flow, runtime

from flows import stages
from flows.approval import await_approval
from qlora.config.schema import PipelineConfig, config_warnings
from qlora.locks import device_slot, set_threads
from qlora.models import ModelCache
from qlora.refs import MlflowRun, RegisteredVersion, Trained
from qlora.tracking.outage import bounded_requests, hurry, is_down_at
from qlora.tracking.runs import end_run, fail_runs_of_flow_run, release_run_record, resolve_uri

log = logging.getLogger("qlora.flow")


def _fail_mlflow_runs(flow, flow_run, state) -> None:
    """on_failure / on_crashed: no MLflow run of this flow run is left RUNNING (if the server answers)."""
    cfg = PipelineConfig.model_validate(flow_run.parameters.get("config") or {})
    if is_down_at(resolve_uri(cfg.tracking)):
        return  # the flow's own end_run has just failed on the same server, and said so
    try:
        with bounded_requests():
            failed = fail_runs_of_flow_run(cfg.tracking, str(flow_run.id))
    except Exception as e:  # noqa: BLE001 - a hook must not fail over an unreachable server (issue 13, item 2)
        log.warning("flow run %s ended %s; its MLflow run could not be marked FAILED (%s: %s): it stays RUNNING "
                    "until a re-run of the same config continues it", flow_run.name, state.type.value, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
        return
    if failed:
        log.warning("flow run %s ended %s: MLflow run(s) %s marked FAILED", flow_run.name, state.type.value, failed)


@flow(
    name="qlora-finetune", log_prints=True,
    on_failure=[_fail_mlflow_runs], on_crashed=[_fail_mlflow_runs],
)
def qlora_finetune(config: PipelineConfig = PipelineConfig()) -> RegisteredVersion:
    """Fine-tune ``config.model`` with QLoRA on ``config.data``, evaluate it and register the adapter."""
    with bounded_requests():  # a dead tracking server costs seconds per call, not MLflow's default minutes
        return _run(config)


def _run(config: PipelineConfig) -> RegisteredVersion:
    for warning in config_warnings(config):  # legal but suspicious values (qlora/config/schema.py)
        log.warning(warning)
    set_threads(config.train.slots_per_worker)  # cores available / training slots of this worker (qlora/locks.py)
    opening = dict(
        cfg=config.tracking, workdir=config.workdir, key=config.fingerprint(), run_name=runtime.flow_run.name,
        tags={"prefect.flow_run_id": str(runtime.flow_run.id), "config_hash": config.fingerprint()}, config=config,
    )
    opened = stages.open_run(**opening, return_state=True)
    run = opened.result() if opened.is_completed() else None  # tracking down: train anyway, untracked
    status = "FAILED"
    models = ModelCache()  # the tuned model evaluate loads, reused by register in this process
    try:
        trained = train_and_evaluate(config, run, models)
        run = run or stages.open_run(**opening)  # registering needs the server: retried, then a clear error
        version = register_and_report(config, trained, run, models)
        stages.close_run(run, version)  # retried; a server that stays away fails the flow run (re-run finishes it)
        status = "FINISHED"
        return version
    except BaseException as e:
        if not isinstance(e, Exception):  # SIGTERM (Prefect's TerminationSignal) or Ctrl-C: stopped, not failed
            status = "KILLED"
            hurry()  # what is left to tell MLflow gets one short attempt: the process has seconds to live
        raise
    finally:
        models.release()
        try:
            if run is not None and status != "FINISHED":  # FINISHED: close_run has marked it
                end_run(run, status)  # never leave the MLflow run RUNNING, whatever happened
        finally:
            release_run_record(config.workdir, opening["key"])  # a later run of this config may now continue it


def train_and_evaluate(config: PipelineConfig, run: MlflowRun | None, models: ModelCache | None = None) -> Trained:
    """Stages 1-4, what one sweep trial runs too (``flows/sweep.py``). Training and evaluation hold this
    machine's device slot (``qlora/locks.py``): concurrent flow runs queue there instead of sharing a GPU."""
    limit = config.timeouts
    data = stages.tokenize(config.data, config.model, config.workdir, run, limit=limit.tokenize, evaluation=config.eval)
    base = stages.quantize(config.model, config.quantization, config.workdir, limit=limit.quantize)
    with device_slot():
        adapter = stages.train(base, data, config.lora, config.train, config.workdir, run, limit=limit.train,
                               evaluation=config.eval, gate_choice=config.registry.gate_metric)
        report = stages.evaluate(base, adapter, data, config.eval, run, models, limit=limit.evaluate)
    return Trained(data=data, base=base, adapter=adapter, report=report)


def register_and_report(config: PipelineConfig, trained: Trained, run: MlflowRun, models: ModelCache | None = None) -> RegisteredVersion:
    """Stages 5-6: the registry (gate, consumer check, approval) and the run report; a sweep's best trial too."""
    version = stages.register(trained.base, trained.adapter, trained.report, config.registry, run, trained.data, models,
                              limit=config.timeouts.registry)
    if version.awaiting_approval:  # registry.require_approval: pause for a human (must run in the flow)
        version = await_approval(version, config.registry, run)
    stages.publish_report(trained.report, trained.adapter, version, run, config.report)
    return version
