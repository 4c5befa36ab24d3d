"""A tracking server that stops answering mid-run: bounded requests, one warning, stages that go on untracked,
and a registration that fails with a message instead of a traceback (issue 13, item 2).

With MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) one log call against a dead server
blocked training for ~4.4 minutes, the failure hook spent as long again, and a SIGTERM'd run ran on for
minutes. Requests are bounded for the run (unless the user set these variables), a stage that only logs
(tokenize's report, evaluation's metrics, the training curve) skips tracking once the server has failed,
and the flow marks its MLflow run KILLED on SIGTERM with one quick attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os

from qlora.errors import TrackingUnavailable, is_transient
from qlora.refs import MlflowRun

log = logging.getLogger("qlora.tracking")

# Per request: 10 s to connect or between bytes (an artifact upload streams, so a large model is fine), then
# 2 retries 1 s and 2 s apart: a refused connection fails in ~3-5 s, an unreachable host in ~35 s.
BOUNDED = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# After SIGTERM: the process has seconds left (Kubernetes' default grace period is 30 s).
HURRIED = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}

_down: dict[tuple[str, str], str] = {}  # (tracking uri, run id) -> the first error, for this process
_hurried = False


@contextlib.contextmanager
def bounded_requests():
    """Bounded MLflow HTTP timeouts and retries (unless the user chose their own) for the block: the flow body
    and its hooks. MLflow reads these variables at every request. Restored after, so a process that goes on
    (a test session, a notebook) keeps its own settings."""
    values = HURRIED if _hurried else BOUNDED
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if _hurried or saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hurry() -> None:
    """The run was stopped (SIGTERM): whatever MLflow call is left, in the flow and its hooks, gets one short
    attempt, whatever the user chose: the process has seconds to live."""
    global _hurried
    _hurried = True
    os.environ.update(HURRIED)


def is_tracking_fault(exc: BaseException) -> bool:
    return is_transient(exc) or type(exc).__module__.startswith("mlflow")


def mark_down(run: MlflowRun, exc: BaseException) -> None:
    """Record that ``run``'s server failed; the first time only, say so (the one warning of an outage)."""
    key = (run.tracking_uri, run.run_id)
    if key in _down:
        return
    _down[key] = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    log.warning("MLflow tracking at %s failed (%s: %s); the run goes on untracked: training and evaluation finish, "
                "their metrics are not logged, and registering retries the server", run.tracking_uri,
                type(exc).__name__, _down[key])


def is_down(run: MlflowRun | None) -> bool:
    return run is not None and (run.tracking_uri, run.run_id) in _down


def is_down_at(uri: str) -> bool:
    """Some run of this process lost the server at ``uri`` and has not seen it answer since."""
    return any(u == uri for u, _ in _down)


def mark_up(run: MlflowRun) -> None:
    """The server answered again (the run was re-opened for registering)."""
    _down.pop((run.tracking_uri, run.run_id), None)


@contextlib.contextmanager
def logging_to(run: MlflowRun | None, swallow: bool = True):
    """Make ``run`` the active run for logging that is worth having but not worth failing for: yields the run,
    or None when there is none or its server is down (now, or earlier in this process). ``swallow``: a tracking
    fault inside the block ends the block (the rest of its logging is skipped), marks the server down and is
    not raised; off, faults inside are the caller's (training's MLflow callback handles its own)."""
    if run is None or is_down(run):
        yield None
        return
    import mlflow

    try:
        mlflow.set_tracking_uri(run.tracking_uri)
        active = mlflow.start_run(run_id=run.run_id)
    except Exception as e:  # noqa: BLE001 - re-raised unless a tracking fault
        if not is_tracking_fault(e):
            raise
        mark_down(run, e)  # the outage's one warning
        yield None
        return
    try:
        yield active
    except Exception as e:  # noqa: BLE001 - re-raised unless a tracking fault we may swallow
        if not swallow or not is_tracking_fault(e):
            raise
        mark_down(run, e)
    finally:
        try:
            mlflow.end_run(status="RUNNING")  # detach only (the flow ends the run); flushes MLflow's async logging
        except Exception as e:  # noqa: BLE001
            if not is_down(run):  # else the outage's one warning has said it
                log.warning("MLflow flush of run %s failed (%s); its metrics may be incomplete", run.run_id, e)


@contextlib.contextmanager
def required(uri: str, what: str, kept: str):
    """Around work that needs the tracking server (registering): its transient faults become one
    ``TrackingUnavailable`` (still transient: the task retries it) that says what was kept and what to do."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised, transient ones with a message a user can act on
        if isinstance(e, TrackingUnavailable) or not is_transient(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TrackingUnavailable(
            f"MLflow tracking server at {uri} is unreachable while {what} ({first}). {kept}: re-run the same command "
            "once the server is back (tracking.uri / $MLFLOW_TRACKING_URI) and nothing is retrained."
        ) from e
