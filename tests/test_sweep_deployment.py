"""The `sweep` deployment for real: Prefect server on loopback, `make deploy`, one `make worker`, and a sweep
flow run created through the REST API (what the UI's "Custom run" does) whose trials are flow runs of the
`trial` deployment on the same work pool. As cheap as it gets: tiny Llama, 2 steps, 2 eval prompts."""

from __future__ import annotations

import subprocess
import time

import httpx
import mlflow
import pytest

from .conftest import DEMO_DATA, REPO
from .test_deployments import BIN, _free_port, _stop, _wait

pytestmark = pytest.mark.e2e


def test_sweep_deployment_spreads_trials_over_the_pool(tiny_base, tmp_path, mlflow_uri):
    import os

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
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

        _wait(healthy, "the Prefect server", 180)
        deploy = subprocess.run([*make, "deploy"], env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

        sweep = http.get("/deployments/name/qlora-sweep/sweep").json()
        trial = http.get("/deployments/name/qlora-trial/trial").json()
        schema = sweep["parameter_openapi_schema"]
        assert {"config", "sweep"} <= set(schema["properties"])  # the UI form: base config and grid
        assert "grid" in schema["definitions"]["SweepConfig"]["properties"]
        assert sweep["parameters"]["sweep"]["trial_deployment"] == "qlora-trial/trial"
        assert trial["work_pool_name"] == sweep["work_pool_name"] == "qlora-process"

        # A grid key that does not exist is refused by the API, before any flow run exists.
        bad = http.post(f"/deployments/{sweep['id']}/create_flow_run",
                        json={"parameters": {"sweep": {"grid": {"train.learnig_rate": [1e-4]}}}})
        assert bad.status_code == 409 and "'train.learnig_rate' is not one of" in bad.text, bad.text[:500]

        worker = subprocess.Popen([*make, "worker"], env=worker_env, stdout=open(logs / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        config = {
            "workdir": str(tmp_path / "work"),
            "model": {"name_or_path": str(tiny_base)},
            "data": {"path": str(DEMO_DATA), "max_length": 64, "eval_fraction": 0.01},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1},
            "eval": {"max_samples": 2, "max_new_tokens": 4},
            "registry": {"model_name": "tiny-sweep-deploy", "consumer_check_prompts": 1},
            "tracking": {"artifact_location": str(tmp_path / "mlartifacts")},
        }
        grid = {"train.learning_rate": [1e-4, 1e-3], "lora.r": [4, 8]}
        t0 = time.monotonic()
        created = http.post(f"/deployments/{sweep['id']}/create_flow_run", json={"parameters": {
            "config": config, "sweep": {"grid": grid, "max_parallel": 2, "trial_deployment": "qlora-trial/trial"}}})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]

        def finished():
            assert worker.poll() is None, (logs / "worker.log").read_text()[-3000:]
            state = http.get(f"/flow_runs/{run_id}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(finished, "the sweep flow run", 580, every_s=2)
        wall = time.monotonic() - t0
        assert state["type"] == "COMPLETED", (state, (logs / "worker.log").read_text()[-6000:])

        # Four trial flow runs of the `trial` deployment, picked up by the worker, linked to the sweep run.
        children = http.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()
        assert len(children) == 4 and {c["deployment_id"] for c in children} == {trial["id"]}
        assert all(c["state"]["type"] == "COMPLETED" for c in children)
        print(f"deployment sweep: {wall:.0f} s from create to completed; trials "
              f"{sorted(round(c['total_run_time'], 1) for c in children)} s")

        client = mlflow.MlflowClient(mlflow_uri)
        runs = client.search_runs([client.get_experiment_by_name("qlora-finetune").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        assert parent.data.tags["prefect.flow_run_id"] == run_id
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(kids) == 4 and {r.data.tags["prefect.flow_run_id"] for r in kids} == {c["id"] for c in children}
        (mv,) = client.search_model_versions("name='tiny-sweep-deploy'")
        assert mv.run_id == parent.data.tags["sweep.best_run_id"]
    finally:
        for p in reversed(procs):
            _stop(p)
