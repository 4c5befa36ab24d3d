"""Prefect task wrappers for the five stages: retries, names and logging only.

The work is in the plain functions (``tasks.tokenize`` ... ``registry.register``), which import and
test without Prefect. A task retries transient faults (I/O, network, a tracking server blip) and
never a ``UserError``: bad input fails at once with its message.
"""

from __future__ import annotations

from prefect import task

from qlora.errors import UserError
from registry.register import register_adapter
from tasks.evaluate import evaluate_adapter
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.distributed import launch_training


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is the user's input."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, UserError)


# Stages pass only small references (paths, ids), so they are cheap to hash and safe to retry.
_common = dict(retry_condition_fn=retry_unless_user_error, retry_jitter_factor=0.5, log_prints=True)

tokenize = task(tokenize_dataset, name="tokenize", retries=2, retry_delay_seconds=5, **_common)
quantize = task(prepare_quantized_model, name="quantize", retries=2, retry_delay_seconds=10, **_common)
train = task(launch_training, name="train", retries=1, retry_delay_seconds=30, **_common)
evaluate = task(evaluate_adapter, name="evaluate", retries=2, retry_delay_seconds=10, **_common)
register = task(register_adapter, name="register", retries=3, retry_delay_seconds=[5, 20, 60], **_common)
