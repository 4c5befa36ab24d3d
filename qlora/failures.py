"""What failed, and is it worth another try? One classifier for every task's ``retry_condition_fn``.

Transient: the network, the disk, a tracking server answering 5xx or not at all, a hub timeout.
Retrying these is cheap because every stage is content-keyed and resumes (see issue 4).
Not transient: the user's input (``UserError``, which includes a diverged training run), and code
bugs (ValueError, TypeError, AssertionError, ...): a retry would fail the same way and hide the message.
A CUDA out-of-memory is handled inside training (smaller micro-batch), not by a blind task retry.
"""

from __future__ import annotations

from qlora.errors import UserError


class TrainingDiverged(UserError):
    """Loss or gradient norm became NaN/inf: the same config would diverge again, so it is never retried."""


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached; transient, so the task that needs it retries."""


def _http_status(exc: BaseException) -> int | None:
    for attr in ("get_http_status_code",):
        fn = getattr(exc, attr, None)
        if callable(fn):
            try:
                return int(fn())
            except Exception:  # noqa: BLE001 - a malformed error code is simply "unknown"
                return None
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None


def is_transient(exc: BaseException | None) -> bool:
    """True when a retry of the same inputs can succeed."""
    if exc is None or isinstance(exc, UserError):
        return False
    if isinstance(exc, (TrackingUnavailable, ConnectionError, TimeoutError, OSError)):
        # OSError covers IOError, a full disk, a vanished NFS handle; ConnectionError is one of them too.
        return True
    mod = type(exc).__module__
    if mod.startswith(("requests", "urllib3", "httpx", "huggingface_hub")):
        # Connection resets, read timeouts, hub 5xx: all network-shaped.
        code = _http_status(exc)
        return code is None or code >= 500 or code == 429
    if mod.startswith("mlflow"):
        code = _http_status(exc)
        # MlflowException for a RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER is a bug or bad input (4xx);
        # a 5xx or a wrapped connection failure is the server blipping.
        if code is not None and code >= 500:
            return True
        cause = exc.__cause__ or exc.__context__
        return cause is not None and cause is not exc and is_transient(cause)
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient faults only (see ``is_transient``)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)
