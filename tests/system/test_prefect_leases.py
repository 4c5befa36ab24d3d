"""A Prefect server restarted while a run holds a training slot (the train stage's global concurrency limit,
qlora/locks.py). With Prefect's default lease storage (the server's memory) the restarted server no longer knew the
lease: the slot stayed taken for good and every later training on the worker waited. Started as `make server`
starts it (``SERVER_LEASE_STORAGE``), the slot is free again when the holder lets go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qlora.locks import SERVER_LEASE_STORAGE
from tests.registry_fixtures import free_port

pytestmark = pytest.mark.slow  # a Prefect server started twice: ~40 s


def _server(env: dict, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 600  # a loaded 2-core machine took up to 300 s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # not left behind
    pytest.fail("the Prefect server did not start")


def test_a_slot_held_across_a_server_restart_is_freed(tmp_path, prefect_home):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "home"), PREFECT_API_URL=api, PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=SERVER_LEASE_STORAGE)
    server = _server(env, port, tmp_path / "server.log")
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as c:
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="train-slot", limit=1))
            with concurrency("train-slot", occupy=1, strict=False, lease_duration=60):
                os.killpg(server.pid, signal.SIGKILL)  # as the OOM killer or a host reboot would
                server.wait(30)
                server = _server(env, port, tmp_path / "server.log")  # the operator starts it again
            with get_client(sync_client=True) as c:
                assert c.read_global_concurrency_limit_by_name("train-slot").active_slots == 0
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
