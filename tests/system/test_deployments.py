"""Team mode for real: Prefect server on loopback, `make deploy` from prefect.yaml, `make worker`, and a
flow run created from the `manual` deployment through the REST API with custom parameters, which is
what the UI's "Run > Custom run" button does. The slowest test of the suite (a server, a worker, and
a flow-run subprocess that imports torch); it trains a tiny Llama for a few steps.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from qlora.config.files import load_config
from qlora.config.schema import PipelineConfig
from tests.conftest import DEMO_DATA, REPO
from tests.registry_fixtures import free_port, stop, wait_for

BIN = Path(sys.executable).parent


def test_nightly_deployment_runs_the_demo_config():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert PipelineConfig.model_validate(deps["nightly"]["parameters"]["config"]) == load_config(REPO / "configs" / "demo.yaml")
    assert deps["manual"].get("schedules") is None
    assert {d["work_pool"]["name"] for d in deps.values()} == {"qlora-process"}


class Team:
    """A Prefect server on loopback (own PREFECT_HOME), `make deploy`, `make worker`: what a team runs."""

    def __init__(self, tmp_path: Path, prefect_home):
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "prefect-home"), PREFECT_API_URL=self.api,
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
        # Flow runs must get these from the deployment's job variables, not from the worker's environment.
        self.worker_env = {k: v for k, v in self.env.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
        self.make = ["make", "-C", str(REPO), "NO_INSTALL=1", f"BIN={BIN}"]
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.http = httpx.Client(base_url=self.api, timeout=30)
        self.worker = None
        self.port = port

    def start_server(self) -> None:
        server = self._spawn("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], self.env)

        def healthy():
            assert server.poll() is None, (self.logs / "server.log").read_text()[-3000:]
            try:
                return self.http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "the Prefect server", 180)

    def deploy(self, *args: str) -> None:
        deploy = subprocess.run([*self.make, "deploy", *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", [*self.make, "worker"], self.worker_env)

    def wait_done(self, run_id: str, what: str, limit_s: float) -> dict:
        def finished():
            assert self.worker.poll() is None, (self.logs / "worker.log").read_text()[-3000:]
            r = self.http.get(f"/flow_runs/{run_id}")
            if r.status_code in (502, 503):  # a busy server; ask again at the next poll
                return None
            state = r.json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        return wait_for(finished, what, limit_s, every_s=2)

    def create_flow_run(self, deployment_id: str, parameters: dict) -> httpx.Response:
        """What the UI's Custom run sends. A busy server answers 503 now and then (its database under load):
        Prefect's own client retries those, and so does this; any other answer is returned as it is."""
        for attempt in range(6):
            r = self.http.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
            if r.status_code not in (502, 503):
                return r
            time.sleep(2 ** attempt)
        return r

    def worker_log(self, chars: int) -> str:
        return (self.logs / "worker.log").read_text()[-chars:]

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, stdout=open(self.logs / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)


def tiny_config(tmp_path: Path, tiny_base: Path, model_name: str, steps: int, **registry) -> dict:
    """A flow-run config as the UI's form would send it: tiny Llama, a few steps, two eval prompts."""
    return {
        "workdir": str(tmp_path / "work"),
        "model": {"name_or_path": str(tiny_base)},
        "data": {"path": str(DEMO_DATA), "max_length": 64, "eval_fraction": 0.01},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": steps, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1},
        "eval": {"max_samples": 2, "max_new_tokens": 4},
        "registry": {"model_name": model_name, **registry},
        "tracking": {"artifact_location": str(tmp_path / "mlartifacts")},
    }



@pytest.mark.slow  # Prefect server + worker subprocesses: ~45 s
@pytest.mark.e2e
def test_manual_deployment_runs_on_a_worker(tiny_base, tmp_path, mlflow_uri, prefect_home):
    team = Team(tmp_path, prefect_home)
    http = team.http
    try:
        t0 = time.monotonic()
        marks = {}
        team.start_server()
        marks["server"] = round(time.monotonic() - t0, 1)

        team.deploy("QLORA_TIMEZONE=Europe/Berlin")
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
        bad = team.create_flow_run(manual["id"], {"config": {"train": {"learning_rate": -1}}})
        assert bad.status_code == 409, bad.text  # "Error creating flow run: Validation failed ..."
        assert "learning_rate" in bad.text

        team.start_worker()
        config = tiny_config(tmp_path, tiny_base, "tiny-deploy", 3)
        created = team.create_flow_run(manual["id"], {"config": config})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        marks["run created"] = round(time.monotonic() - t0, 1)

        state = team.wait_done(run_id, "the flow run", 540)
        marks["run finished"] = round(time.monotonic() - t0, 1)
        assert state["type"] == "COMPLETED", (state, team.worker_log(5000))
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
        team.stop()
