"""Prefect task wrappers for the stages: names, retries and artifacts, and the train stage's generation-eval settings
resolved from the config sections it is handed (``generation_eval``); nothing else.

The work is in the plain functions (``tasks.tokenize`` ... ``registry.register``), which import and
test without Prefect. A task retries transient faults (I/O, network, a tracking server blip) and
never a ``UserError`` or a bug: bad input fails at once with its message. Stages pass only small
references (paths, ids), so they are cheap to hash and safe to retry; the one exception, the flow
run's ``ModelCache`` handed from evaluate to register, is left out of the cache key.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import DEFAULT
from prefect.utilities.timeout import timeout

from qlora.config.schema import (
    DataConfig,
    EvalConfig,
    LoraSection,
    ModelConfig,
    PipelineConfig,
    QuantizationConfig,
    RegistryConfig,
    ReportConfig,
    TrackingConfig,
    TrainConfig,
)
from qlora.errors import StageTimeout, retry_transient
from qlora.models import ModelCache
from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel, RegisteredVersion, TokenizedData
from qlora.tracking.outage import required
from qlora.tracking.records import log_config
from qlora.tracking.runs import end_run, start_or_resume_run
from registry.gate import gate_metric
from registry.register import register_adapter
from tasks import reporting
from tasks.evaluate import evaluate_adapter
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter
from tasks.training.selection import GenerationEval, row_roles

# Only transient faults are retried (qlora.errors.is_transient): never a UserError, a diverged run or a
# code bug. Training's CUDA OOM is handled inside train_adapter (smaller micro-batch).
_common = dict(retry_condition_fn=retry_transient, retry_jitter_factor=0.5, log_prints=True)
_WITHOUT_MODELS = DEFAULT - "models"  # a loaded model is no cache-key material


def _markdown(key: str, markdown: str) -> None:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    create_markdown_artifact(markdown=markdown, key=reporting.artifact_key(key, ""))


class _ProgressArtifact:
    """``progress(step, max_steps, line)`` for the trainer: one Prefect progress artifact of this task run (the UI
    shows the bar and the latest line while training runs). Updates go out from a thread, latest value wins:
    training never waits on the Prefect API (measured: with the server gone, an inline update blocked the
    training loop for minutes in the client's retries). ``close`` sends the last value."""

    def __init__(self, key: str):
        self.artifact = create_progress_artifact(0.0, key=key, description="training starts")
        self.latest: tuple[int, int, str] | None = None
        self.wake, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._push, name=f"prefect-{key}", daemon=True)
        self.thread.start()

    def __call__(self, step: int, max_steps: int, line: str) -> None:
        self.latest = (step, max_steps, line)
        self.wake.set()

    def _push(self) -> None:
        while not (self.done.is_set() and not self.wake.is_set()):
            if not self.wake.wait(timeout=1.0):
                continue
            self.wake.clear()
            step, max_steps, line = self.latest
            try:
                update_progress_artifact(self.artifact, 100.0 * step / max(max_steps, 1), description=line)
            except Exception as e:  # noqa: BLE001 - a live view that fails must not fail the stage
                logging.getLogger("qlora.train").warning("progress artifact not updated (%s: %s); training goes on",
                                                         type(e).__name__, str(e)[:200])
                return

    def close(self, timeout: float = 10.0) -> None:
        self.done.set()
        self.thread.join(timeout)


@contextlib.contextmanager
def _time_limit(stage: str, seconds: float | None):
    """The stage's ``timeouts.<key>``, on each try afresh (Prefect's own timeout scope: a signal in the main
    thread, so a read from a server that never answers is interrupted too); past it, a ``StageTimeout``
    naming the stage and the key. Retried like any fault, then the flow fails with this message."""
    key = "registry" if stage == "register" else stage  # a field named register would shadow pydantic's
    try:
        with timeout(seconds, StageTimeout):
            yield
    except StageTimeout:
        raise StageTimeout(
            f"stage {stage} did not finish within timeouts.{key}={seconds:g} s (on every try): something it waited for "
            "hung (a hub download, a server that accepts the connection and never answers, a collective waiting for "
            f"a dead rank); its log says what it was doing last. Raise timeouts.{key} if the stage is only slow; "
            "finished stages are reused on a re-run"
        ) from None


@task(name="open-mlflow-run", retries=2, retry_delay_seconds=[2, 10], **_common)
def open_run(cfg: TrackingConfig, workdir: str, key: str, run_name: str | None, tags: dict[str, str] | None = None,
             config: PipelineConfig | None = None) -> MlflowRun:
    """The flow's MLflow run, with the full config as ``config.json`` (what ``qlora reproduce`` rebuilds from)."""
    run = start_or_resume_run(cfg, workdir, key, run_name, tags)
    if config is not None:
        log_config(run, config)
    return run


@task(name="close-mlflow-run", retries=3, retry_delay_seconds=[2, 10, 30], **_common)
def close_run(run: MlflowRun, version: RegisteredVersion | None = None) -> None:
    """Mark the flow's MLflow run FINISHED, the last thing a successful flow run does. A tracking server restarting
    just then is waited for (retries, ~45 s); one that stays away fails the flow run with TrackingUnavailable
    rather than let it end COMPLETED over a run left RUNNING. Its re-run continues that run, reuses every stage
    and the registered version, and finishes it."""
    done = f"{version.name} v{version.version} is registered and" if version else "Everything"
    with required(run.tracking_uri, f"marking MLflow run {run.run_id} FINISHED",
                  f"{done} the adapter and its checkpoints are kept"):
        end_run(run, "FINISHED", required=True)


@task(name="tokenize", retries=2, retry_delay_seconds=5, **_common)
def tokenize(data: DataConfig, model: ModelConfig, workdir: str, run: MlflowRun | None = None, limit: float | None = None,
             evaluation: EvalConfig | None = None) -> TokenizedData:
    """Tokenize, then show the data report (drops by reason, lengths, examples) in the Prefect UI, with which eval
    rows the final evaluation and the gate score and which choose the checkpoint (``evaluation``: the eval section)."""
    with _time_limit("tokenize", limit):
        ref = tokenize_dataset(data, model, workdir, run)
    if ref.report_path:
        roles = "" if evaluation is None else "\n\n## Eval rows\n\n" + row_roles(ref.eval_rows, evaluation)
        create_markdown_artifact(markdown=Path(ref.report_path).read_text() + roles, key="data-report",
                                 description="tokenize: data report")
    return ref


@task(name="quantize", retries=2, retry_delay_seconds=10, **_common)
def quantize(model: ModelConfig, quant: QuantizationConfig, workdir: str, limit: float | None = None) -> QuantizedModel:
    with _time_limit("quantize", limit):
        return prepare_quantized_model(model, quant, workdir)


@task(name="train", retries=1, retry_delay_seconds=30, **_common)
def train(base: QuantizedModel, data: TokenizedData, lora: LoraSection, cfg: TrainConfig, workdir: str,
          run: MlflowRun | None = None, limit: float | None = None, evaluation: EvalConfig | None = None,
          gate_choice: str = "auto") -> Adapter:
    """``evaluation`` (the eval section) and ``gate_choice`` (``registry.gate_metric``) decide generation eval during
    training (``eval.every_steps``): every flow that trains (``qlora run``, ``qlora reproduce``) passes them, so
    the same config trains the same steps and selects the same checkpoint. The training slots are taken inside
    ``train_adapter``, once it knows the adapter is not already trained (``qlora/locks.py``)."""
    progress = _ProgressArtifact("train-progress")
    try:
        with _time_limit("train", limit):
            during = generation_eval(cfg, evaluation, gate_choice, data)
            return train_adapter(base, data, lora, cfg, workdir, run, during=during, progress=progress)
    finally:
        progress.close()


def generation_eval(train: TrainConfig, evaluation: EvalConfig | None, gate_choice: str,
                    data: TokenizedData) -> GenerationEval | None:
    """``eval.every_steps``'s settings for training, scored with the promotion gate's metric resolved on the gate's
    own rows (``registry.gate_metric`` auto: exact_match for short references, else rouge); None when off."""
    if evaluation is None or evaluation.every_steps is None:
        return None
    from datasets import load_from_disk

    references = load_from_disk(data.path)["eval"]["reference"][: evaluation.max_samples]
    metric = gate_metric(gate_choice, [{"reference": r} for r in references])
    return GenerationEval.of(train, evaluation, metric)


@task(name="evaluate", retries=2, retry_delay_seconds=10, cache_policy=_WITHOUT_MODELS, **_common)
def evaluate(base: QuantizedModel, adapter: Adapter, data: TokenizedData, cfg: EvalConfig, run: MlflowRun | None = None,
             models: ModelCache | None = None, limit: float | None = None) -> EvalReport:
    with _time_limit("evaluate", limit):
        return evaluate_adapter(base, adapter, data, cfg, run, models)


@task(name="register", retries=3, retry_delay_seconds=[5, 20, 60], cache_policy=_WITHOUT_MODELS, **_common)
def register(base: QuantizedModel, adapter: Adapter, report: EvalReport, cfg: RegistryConfig, run: MlflowRun,
             data: TokenizedData | None = None, models: ModelCache | None = None, limit: float | None = None) -> RegisteredVersion:
    """A tracking server that stays down through the retries ends as one TrackingUnavailable (exit 75)."""
    with _time_limit("register", limit), required(run.tracking_uri, "registering", f"Nothing new is lost: the adapter ({adapter.path}) and its checkpoints are kept"):
        return register_adapter(base, adapter, report, cfg, run, data, models, publish=_markdown)


@task(name="report", retries=2, retry_delay_seconds=5, log_prints=True)
def publish_report(report: EvalReport, adapter: Adapter, version: RegisteredVersion, run: MlflowRun,
                   cfg: ReportConfig) -> list[str]:
    """Loss plot to MLflow; Markdown report + eval examples table as Prefect artifacts."""
    md, decision = reporting.build_report(report, adapter, version, run, cfg)
    keys = [reporting.artifact_key(version.name, "report"), reporting.artifact_key(version.name, "eval-examples")]
    create_markdown_artifact(md, key=keys[0], description=f"{version.name} v{version.version}: {decision}")
    create_table_artifact(reporting.example_rows(report, cfg.examples), key=keys[1], description="held-out prompts, base vs tuned")
    return keys
