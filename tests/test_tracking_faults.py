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



def test_a_live_runs_mlflow_run_is_never_continued_by_a_second_run(tmp_path):
    """Run A (another process) opened the config's MLflow run and is still alive: an identical run B gets
    its own MLflow run and leaves A's alone. Once A is killed, a re-run C continues A's run."""
    import os
    import signal

    from qlora.tracking import release_run_record, start_or_resume_run

    from .conftest import REPO

    uri, work = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "work"
    cfg = TrackingConfig(uri=uri, artifact_location=str(tmp_path / "art"))
    code = (
        "import sys, time\n"
        "from qlora.config import TrackingConfig\n"
        "from qlora.tracking import start_or_resume_run\n"
        f"cfg = TrackingConfig(uri={uri!r}, artifact_location={str(tmp_path / 'art')!r})\n"
        f"r = start_or_resume_run(cfg, {str(work)!r}, 'key', 'A', {{'prefect.flow_run_id': 'flow-A'}})\n"
        "print(r.run_id, flush=True)\n"
        "time.sleep(600)\n"
    )
    a = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        run_a = a.stdout.readline().strip()
        assert len(run_a) == 32, run_a
        b = start_or_resume_run(cfg, work, "key", "B", {"prefect.flow_run_id": "flow-B"})
        assert b.run_id != run_a  # its own run ...
        client = mlflow.MlflowClient(uri)
        assert client.get_run(run_a).data.tags["prefect.flow_run_id"] == "flow-A"  # ... and A's run untouched
        assert client.get_run(b.run_id).data.tags["prefect.flow_run_id"] == "flow-B"
        assert run_a in (work / "mlflow-runs" / "key.json").read_text()  # the record still names A's run
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(30)
    c = start_or_resume_run(cfg, work, "key", "C", {"prefect.flow_run_id": "flow-C"})
    try:
        assert c.run_id == run_a  # A is gone (SIGKILL released its lock): the re-run continues A's run
        assert mlflow.MlflowClient(uri).get_run(run_a).data.tags["prefect.flow_run_id"] == "flow-C"
    finally:
        release_run_record(work, "key")
