"""Fixtures for the registry tests: one tiny trained adapter and a real ``mlflow server`` on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qlora.config.schema import DataConfig, EvalConfig, LoraSection, ModelConfig, QuantizationConfig, TrainConfig
from tests.conftest import REPO

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what: str, limit_s: float, every_s: float = 1.0):
    """Poll until ``pred()`` is truthy and return it; the limit only keeps a broken run from hanging CI."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if got := pred():
            return got
        time.sleep(every_s)
    pytest.fail(f"gave up waiting for {what} after {limit_s:.0f} s")


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | extra
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH even when not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start_mlflow_server(backend_uri: str, artifacts: Path, log: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """In its own process group, so ``stop`` ends uvicorn too. With several workers, uvicorn's supervisor kills one
    that does not answer its health ping within 5 s (its default), and on a loaded machine (xdist workers beside
    it) a worker still importing mlflow never did: the server restarted workers forever. Hence 120 s."""
    port = free_port()
    proc = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         "--uvicorn-opts", "--timeout-worker-healthcheck 120"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc)
    except Exception:
        stop(proc)
        raise RuntimeError(log.read_text()[-3000:])
    return proc, url


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """End the process and, when it leads its own process group, what it started (``mlflow server`` runs uvicorn
    as a child: killing only the parent left uvicorn serving): SIGTERM, ``grace_s`` for the leader to exit, then
    SIGKILL to whatever is left in the group, even when the leader has exited. A member can outlive its leader: a
    Prefect worker whose server died at the same moment hangs in its own shutdown (before `make team` stopped its
    own processes on exit, every run of test_registry_events left one, PPID 1, polling a dead port)."""
    try:
        group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:  # the leader is gone (reaped): its group may live on, and killpg finds it or nothing
        group = True
    try:
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
    except ProcessLookupError:  # the group is empty
        pass
    proc.wait(30)


@pytest.fixture(scope="session")  # shared by the registry test modules: training is the slow part
def trained(tiny_base, tmp_path_factory):
    """(base, adapter, report): a real 4-bit base, a 4-step adapter and its real evaluation on 6 prompts."""
    from demo.build import write_demo_data
    from tasks.evaluate import evaluate_adapter
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_adapter

    work = tmp_path_factory.mktemp("registry-work")
    rows = write_demo_data(work / "rows.jsonl", n=400)  # same task as the demo, fewer rows to tokenize
    model = ModelConfig(name_or_path=str(tiny_base))
    data = tokenize_dataset(DataConfig(path=str(rows), max_length=64, eval_fraction=0.015), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    train = TrainConfig(max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=2e-3,
                        logging_steps=1, save_steps=100)
    adapter = train_adapter(base, data, LoraSection(r=8, alpha=16), train, work)
    report = evaluate_adapter(base, adapter, data, EvalConfig(max_samples=6, max_new_tokens=5, batch_size=6))
    return base, adapter, report


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_store):
    """A real ``mlflow server`` process (sqlite backend, proxied artifacts) on a free loopback port."""
    d = tmp_path_factory.mktemp("mlflow-server")
    proc, url = start_mlflow_server(mlflow_store(d / "mlflow.db"), d / "artifacts", d / "server.log")
    yield url
    stop(proc)
