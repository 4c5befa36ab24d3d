"""Team mode for real: Prefect server on loopback, `make deploy` from prefect.yaml, `make worker`, and a
flow run created from the `manual` deployment through the REST API with custom parameters, which is
what the UI's "Run > Custom run" button does. The slowest test of the suite (a server, a worker, and
a flow-run subprocess that imports torch); it trains a tiny Llama for a few steps.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from qlora.config import PipelineConfig
from qlora.config_file import load_config

from .conftest import DEMO_DATA, REPO

BIN = Path(sys.executable).parent


def test_nightly_deployment_runs_the_demo_config():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert PipelineConfig.model_validate(deps["nightly"]["parameters"]["config"]) == load_config(REPO / "configs" / "demo.yaml")
    assert deps["manual"].get("schedules") is None
    assert {d["work_pool"]["name"] for d in deps.values()} == {"qlora-process"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, what: str, limit_s: float, every_s: float = 1.0):
    """Poll until ``pred()`` is truthy; the limit only keeps a broken run from hanging CI."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every_s)
    pytest.fail(f"gave up waiting for {what} after {limit_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.e2e
def test_manual_deployment_runs_on_a_worker(tiny_base, tmp_path, mlflow_uri):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    # The flow run must get these from the deployment's job variables, not from the worker's environment.
    worker_env = {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    make = ["make", "-C", str(REPO), "NO_INSTALL=1", f"BIN={BIN}"]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    try:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        http = httpx.Client(base_url=api, timeout=30)

        def healthy():
            assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
            try:
                return http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        t0 = time.monotonic()
        marks = {}
        _wait(healthy, "the Prefect server", 180)
        marks["server"] = round(time.monotonic() - t0, 1)

        deploy = subprocess.run([*make, "deploy", "QLORA_TIMEZONE=Europe/Berlin"], env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        marks["deploy"] = round(time.monotonic() - t0, 1)

        nightly = http.get("/deployments/name/qlora-finetune/nightly").json()
        (sched,) = nightly["schedules"]
        assert sched["active"] and sched["schedule"]["cron"] == "0 2 * * *"
        assert sched["schedule"]["timezone"] == "Europe/Berlin"
        manual = http.get("/deployments/name/qlora-finetune/manual").json()
        assert manual["schedules"] == [] and manual["work_pool_name"] == "qlora-process"
        assert manual["job_variables"]["env"]["MLFLOW_TRACKING_URI"] == mlflow_uri
        assert "train" in manual["parameter_openapi_schema"]["definitions"]["PipelineConfig"]["properties"]  # the UI form

        # Invalid input is refused by the API: no flow run is created for it.
        bad = http.post(f"/deployments/{manual['id']}/create_flow_run",
                        json={"parameters": {"config": {"train": {"learning_rate": -1}}}})
        assert bad.status_code == 409, bad.text  # "Error creating flow run: Validation failed ..."
        assert "learning_rate" in bad.text

        worker = subprocess.Popen([*make, "worker"], env=worker_env, stdout=open(logs / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        config = {
            "workdir": str(tmp_path / "work"),
            "model": {"name_or_path": str(tiny_base)},
            "data": {"path": str(DEMO_DATA), "max_length": 64, "eval_fraction": 0.01},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1},
            "eval": {"max_samples": 2, "max_new_tokens": 4},
            "registry": {"model_name": "tiny-deploy"},
            "tracking": {"artifact_location": str(tmp_path / "mlartifacts")},
        }
        created = http.post(f"/deployments/{manual['id']}/create_flow_run", json={"parameters": {"config": config}})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        marks["run created"] = round(time.monotonic() - t0, 1)

        def finished():
            assert worker.poll() is None, (logs / "worker.log").read_text()[-3000:]
            state = http.get(f"/flow_runs/{run_id}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(finished, "the flow run", 540, every_s=2)
        marks["run finished"] = round(time.monotonic() - t0, 1)
        assert state["type"] == "COMPLETED", (state, (logs / "worker.log").read_text()[-5000:])
        seen = [s["type"] for s in sorted(http.get("/flow_run_states/", params={"flow_run_id": run_id}).json(),
                                          key=lambda s: s["timestamp"])]
        # queued, picked up by the worker (worker and engine each record Pending), ran, done
        assert [k for k, _ in itertools.groupby(seen)] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"], seen
        print(f"phases (s): {marks}; states {seen}")

        # The registered version, in the store the job variables pointed the flow run at.
        (mv,) = mlflow.MlflowClient(mlflow_uri).search_model_versions("name='tiny-deploy'")
        run = mlflow.MlflowClient(mlflow_uri).get_run(mv.run_id)
        assert run.data.tags["prefect.flow_run_id"] == run_id
        arts = http.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
        assert {a["key"] for a in arts} >= {"tiny-deploy-report", "tiny-deploy-eval-examples"}
    finally:
        for p in reversed(procs):
            _stop(p)
