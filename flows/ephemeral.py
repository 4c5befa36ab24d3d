"""Prefect's temporary API server for a bare ``qlora run`` (no PREFECT_API_URL): started early, and tied to
this process's life.

Prefect starts it as a ``uvicorn`` subprocess and stops it from an ``atexit`` handler, which never runs
when the run is SIGKILLed (or when Prefect re-raises SIGTERM with the default handler): each such kill
left a uvicorn process (~200 MB and a port, parent 1) behind (issue 13, item 6). Here the server runs under
a small guard that polls its parent and stops the server once the parent is gone. A polling thread in the
child, not PR_SET_PDEATHSIG: that signal fires when the *thread* that forked the child exits, and the
server is started from a short-lived thread (below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# Runs in the server process: a daemon thread watches the parent, then uvicorn runs as `python -m uvicorn`.
GUARD = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, name="parent-watch", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""
POLL_S = 0.5
STARTUP_TIMEOUT_S = 120


def _tied_server_class():
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class TiedSubprocessASGIServer(SubprocessASGIServer):
        """Prefect's server, started under ``GUARD``. Prefect looks the server up by port in the class's shared
        ``_instances``, so the flow's own ``SubprocessASGIServer()`` finds this one and never starts another."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # The command and environment of prefect 3.8's SubprocessASGIServer._run_uvicorn_command.
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            # Its own log, not the run's terminal: stopped while the run exits (a failed run exits early),
            # uvicorn logs the cancelled lifespan as an error with a traceback, which users took for the
            # run's failure. The file is there when the server itself is what failed.
            home = Path(get_current_settings().home)
            home.mkdir(parents=True, exist_ok=True)
            log = open(home / "ephemeral-server.log", "ab")
            return subprocess.Popen(
                stdout=log, stderr=subprocess.STDOUT,
                args=[sys.executable, "-c", GUARD, str(os.getpid()),
                      "--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                      "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
            )

    return TiedSubprocessASGIServer


def start_ephemeral_prefect_server() -> threading.Thread | None:
    """A bare ``qlora run`` (no PREFECT_API_URL) has Prefect start its temporary server when the flow
    begins: 3.5 s, about 10 s the first time (it creates its database). Starting it in a thread now lets it
    come up while this process imports the libraries the tasks need anyway (5.5 s here); the flow's
    ``get_client()`` then finds it running. If the start fails, the server is marked not running and the
    flow's own start raises the error as before."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    server = _tied_server_class()()
    t0 = time.perf_counter()
    # Prefect waits 20 s by default; a first start creates the database, and on a busy 2-core machine (CI,
    # 2026-12-02) that took longer, so the run failed before doing anything. A larger setting of the user's wins.
    timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), STARTUP_TIMEOUT_S)

    def start() -> None:
        try:
            server.start(timeout=timeout)
            thread.up_s = time.perf_counter() - t0
        except Exception:  # reported by the flow's own start, in the main thread
            pass

    thread = threading.Thread(target=start, name="prefect-ephemeral-server", daemon=True)
    thread.up_s = None
    thread.server = server
    thread.start()
    return thread
