"""The tracking store misbehaving under a real flow (issue 13): a sqlite store locked by another writer,
two identical runs at once, the MLflow server dying mid-run, SIGTERM."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from qlora.config import TrackingConfig


def _hold_sqlite_lock(db, seconds: float) -> subprocess.Popen:
    """Another process holding an exclusive transaction on ``db`` (as a second writer mid-commit would)."""
    code = (f"import sqlite3, time; c = sqlite3.connect({str(db)!r}, isolation_level=None); c.execute('BEGIN EXCLUSIVE');"
            f"print('locked', flush=True); time.sleep({seconds}); c.execute('COMMIT')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_locked_sqlite_store_is_retried_when_opening_the_run(prefect_server, tmp_path):
    """MLflow waits 20 s (its sqlite busy_timeout) and then raises "database is locked": a transient fault,
    so the open-mlflow-run task retries it and gets its run once the other writer is done."""
    from prefect.client.orchestration import get_client

    from flows import stages
    from qlora.tracking import start_or_resume_run

    db = tmp_path / "mlflow.db"
    cfg = TrackingConfig(uri=f"sqlite:///{db}", artifact_location=str(tmp_path / "art"))
    start_or_resume_run(cfg, tmp_path / "work", "other-config", "first")  # the store exists, with its schema
    holder = _hold_sqlite_lock(db, seconds=22)
    try:
        state = stages.open_run.with_options(retry_delay_seconds=0)(cfg, str(tmp_path / "work"), "k", "locked", return_state=True)
    finally:
        holder.wait(60)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as c:
        assert c.read_task_run(state.state_details.task_run_id).run_count == 2  # failed once on the lock, then opened
    run = state.result()
    assert mlflow.MlflowClient(cfg.uri).get_run(run.run_id).info.status == "RUNNING"

