"""Prefect task wrappers for the five stages: retries, names and logging only.

The work is in the plain functions (``tasks.tokenize`` ... ``registry.register``), which import and
test without Prefect. A task retries transient faults (I/O, network, a tracking server blip) and
never a ``UserError`` or a bug: bad input fails at once with its message.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from qlora.failures import retry_transient
from qlora.tracking import start_or_resume_run
from registry.register import register_adapter
from tasks.evaluate import evaluate_adapter
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.distributed import launch_training


# Stages pass only small references (paths, ids), so they are cheap to hash and safe to retry.
# Only transient faults are retried (qlora.failures.is_transient): never a UserError, a diverged
# run or a code bug. Training's CUDA OOM is handled inside train_adapter (smaller micro-batch).
_common = dict(retry_condition_fn=retry_transient, retry_jitter_factor=0.5, log_prints=True)



def _tokenize_with_report(data, model, workdir, run=None):
    """Tokenize, then show the data report (drops by reason, lengths, examples) in the Prefect UI."""
    ref = tokenize_dataset(data, model, workdir, run)
    if ref.report_path:
        create_markdown_artifact(markdown=Path(ref.report_path).read_text(), key="data-report", description="tokenize: data report")
    return ref


tokenize = task(_tokenize_with_report, name="tokenize", retries=2, retry_delay_seconds=5, **_common)
quantize = task(prepare_quantized_model, name="quantize", retries=2, retry_delay_seconds=10, **_common)
train = task(launch_training, name="train", retries=1, retry_delay_seconds=30, **_common)
evaluate = task(evaluate_adapter, name="evaluate", retries=2, retry_delay_seconds=10, **_common)
register = task(register_adapter, name="register", retries=3, retry_delay_seconds=[5, 20, 60], **_common)
open_run = task(start_or_resume_run, name="open-mlflow-run", retries=2, retry_delay_seconds=[2, 10], **_common)
