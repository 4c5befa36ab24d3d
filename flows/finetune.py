"""The ``qlora-finetune`` flow: five retriable tasks wired together, one MLflow run per flow run.

Stages:
1. tokenize  - dataset -> templated, completion-only-labelled tokens on disk
2. quantize  - base model -> pre-quantized 4-bit NF4 checkpoint on disk
3. train     - QLoRA with transformers.Trainer -> adapter on disk (metrics autologged to MLflow)
4. evaluate  - base vs tuned on the held-out split -> eval/base/* and eval/tuned/* in MLflow
5. register  - adapter -> MLflow Model Registry version with aliases challenger / champion
6. report    - loss plot to MLflow; Prefect artifacts (run report, eval examples); notifications
"""

from __future__ import annotations

from prefect import flow, runtime

from qlora.config import PipelineConfig
from qlora.refs import RegisteredVersion
from qlora.tracking import end_run, start_run
from tasks import reporting, stages


@flow(name="qlora-finetune", log_prints=True, on_failure=[reporting.notify_failure])
def qlora_finetune(config: PipelineConfig = PipelineConfig()) -> RegisteredVersion:
    """Fine-tune ``config.model`` with QLoRA on ``config.data``, evaluate it and register the adapter."""
    run = start_run(
        config.tracking,
        run_name=runtime.flow_run.name,
        tags={"prefect.flow_run_id": str(runtime.flow_run.id), "config_hash": config.fingerprint()},
    )
    status = "FAILED"
    try:
        data = stages.tokenize(config.data, config.model, config.workdir)
        base = stages.quantize(config.model, config.quantization, config.workdir)
        adapter = stages.train(base, data, config.lora, config.train, config.workdir, run)
        report = stages.evaluate(base, adapter, data, config.eval, run)
        version = stages.register(base, adapter, report, config.registry, run)
        reporting.publish_report(report, adapter, version, run, config.report)
        status = "FINISHED"
        return version
    finally:
        end_run(run, status)  # never leave the MLflow run RUNNING, whatever happened
