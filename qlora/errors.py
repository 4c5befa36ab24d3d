"""What failed, and is it worth another try? The error types and the one retry classifier.

A ``UserError`` is bad input: a config value, a data row, a missing path. It names the file, line or
config key at fault and says what to do, and it is never retried (re-running bad input wastes compute
and hides the message). Every stage's Prefect task retries only what ``is_transient`` accepts
(``flows/stages.py`` passes ``retry_transient`` as the tasks' ``retry_condition_fn``).

Transient: the network, an I/O error, a tracking server answering 5xx or not at all, a hub timeout.
A full disk is not: the same write fails again until someone frees space (``DiskFull``).
Retrying these is cheap because every stage is content-keyed and resumes.
Not transient: the user's input (``UserError``, which includes a diverged training run), and code
bugs (ValueError, TypeError, AssertionError, ...): a retry would fail the same way and hide the message.
A CUDA out-of-memory is handled inside training (smaller micro-batch), not by a blind task retry.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input from the user: a config value, a data row, a missing path. Not retried."""


class ConfigError(UserError):
    """A config file or override that does not load into the typed config."""


class DataError(UserError):
    """A dataset that cannot be read or tokenized as configured."""


class ModelError(UserError):
    """A base model or adapter that cannot be found or loaded as configured."""


class TrainingDiverged(UserError):
    """Loss or gradient norm became NaN/inf: the same config would diverge again, so it is never retried."""


class DiskFull(UserError):
    """The disk filled up while writing an output. Not retried: the same write fails again until someone frees space."""


class StageTimeout(TimeoutError):
    """A stage ran past its ``timeouts.<stage>`` limit: something it waited for hung. Retried like any fault."""


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached; transient, so the task that needs it retries."""


def _http_status(exc: BaseException) -> int | None:
    fn = getattr(exc, "get_http_status_code", None)  # MlflowException / RestException
    if callable(fn):
        try:
            return int(fn())
        except (TypeError, ValueError):
            return None
    resp = getattr(exc, "response", None)  # requests / httpx / huggingface_hub
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads when a library did not keep the OSError: safetensors' Rust writer
# ("IoError(Os { code: 28, kind: StorageFull, ...})"), pyarrow, and the C library's own text.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull")


_BUSY_OR_GONE = ("database is locked", "database table is locked", "database is busy", "could not connect",
                 "connection refused", "server closed the connection", "connection reset", "timeout expired")


def is_disk_full(exc: BaseException | None) -> bool:
    """A full disk or exhausted quota anywhere in ``exc``'s cause chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_transient(exc: BaseException | None) -> bool:
    """True when a retry of the same inputs can succeed."""
    if exc is None or isinstance(exc, UserError) or is_disk_full(exc):
        return False
    if isinstance(exc, (TrackingUnavailable, ConnectionError, TimeoutError, OSError)):
        # OSError covers IOError, a vanished NFS handle, a reset connection (not a full disk: above).
        return True
    mod = type(exc).__module__
    if type(exc).__name__ == "OperationalError" and mod.startswith(("sqlite3", "sqlalchemy", "psycopg")):
        # A store busy with another writer ("database is locked": sqlite's 20 s busy wait, as MLflow sets
        # it, ran out) or a database connection that dropped. Not "no such table" or a bad path.
        return any(s in str(exc).lower() for s in _BUSY_OR_GONE)
    if mod.startswith(("requests", "urllib3", "httpx", "huggingface_hub")):
        # Connection resets, read timeouts, hub 5xx: all network-shaped.
        code = _http_status(exc)
        return code is None or code >= 500 or code == 429
    if mod.startswith("mlflow"):
        # A RestException carries the server's real HTTP status: 5xx/429 is the server blipping, 4xx is
        # bad input or a bug. A plain MlflowException defaults to INTERNAL_ERROR (500) for anything, so
        # only what it wraps (e.g. a refused connection) decides.
        if type(exc).__name__ == "RestException":
            code = _http_status(exc)
            return code is not None and (code >= 500 or code == 429)
        cause = exc.__cause__ or exc.__context__
        return cause is not None and cause is not exc and is_transient(cause)
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient faults only (see ``is_transient``)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)
