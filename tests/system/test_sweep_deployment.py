"""The `sweep` deployment for real: Prefect server on loopback, `make deploy`, one `make worker`, and a sweep
flow run created through the REST API (what the UI's "Custom run" does) whose trials are flow runs of the
`trial` deployment on the same work pool. As cheap as it gets: tiny Llama, 2 steps, 2 eval prompts, two trials
(the 2x2 grid's expansion into four trials is tests/system/test_sweep.py's, from the CLI)."""

from __future__ import annotations

import time

import mlflow
import pytest

from tests.system.test_deployments import Team, tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # server, make deploy, a worker, two trial flow runs: ~70 s


def test_sweep_deployment_spreads_trials_over_the_pool(tiny_base, tmp_path, mlflow_uri, prefect_home):
    team = Team(tmp_path, prefect_home)
    http = team.http
    try:
        team.start_server()
        team.deploy()

        sweep = http.get("/deployments/name/qlora-sweep/sweep").json()
        trial = http.get("/deployments/name/qlora-trial/trial").json()
        schema = sweep["parameter_openapi_schema"]
        assert {"config", "sweep"} <= set(schema["properties"])  # the UI form: base config and grid
        assert "grid" in schema["definitions"]["SweepConfig"]["properties"]
        assert sweep["parameters"]["sweep"]["trial_deployment"] == "qlora-trial/trial"
        assert trial["work_pool_name"] == sweep["work_pool_name"] == "qlora-process"

        # A grid key that does not exist is refused by the API, before any flow run exists.
        bad = team.create_flow_run(sweep["id"], {"sweep": {"grid": {"train.learnig_rate": [1e-4]}}})
        assert bad.status_code == 409 and "'train.learnig_rate' is not one of" in bad.text, bad.text[:500]

        team.start_worker()
        config = tiny_config(tmp_path, tiny_base, "tiny-sweep-deploy", 2, consumer_check_prompts=1)
        grid = {"train.learning_rate": [1e-4, 1e-3]}
        t0 = time.monotonic()
        created = team.create_flow_run(sweep["id"], {
            "config": config, "sweep": {"grid": grid, "max_parallel": 2, "trial_deployment": "qlora-trial/trial"}})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]

        state = team.wait_done(run_id, "the sweep flow run", 580)
        wall = time.monotonic() - t0
        assert state["type"] == "COMPLETED", (state, team.worker_log(6000))

        # Two trial flow runs of the `trial` deployment, picked up by the worker, linked to the sweep run.
        children = http.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}).json()
        assert len(children) == 2 and {c["deployment_id"] for c in children} == {trial["id"]}
        assert all(c["state"]["type"] == "COMPLETED" for c in children)
        print(f"deployment sweep: {wall:.0f} s from create to completed; trials "
              f"{sorted(round(c['total_run_time'], 1) for c in children)} s")

        client = mlflow.MlflowClient(mlflow_uri)
        runs = client.search_runs([client.get_experiment_by_name("qlora-finetune").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        assert parent.data.tags["prefect.flow_run_id"] == run_id
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(kids) == 2 and {r.data.tags["prefect.flow_run_id"] for r in kids} == {c["id"] for c in children}
        (mv,) = client.search_model_versions("name='tiny-sweep-deploy'")
        assert mv.run_id == parent.data.tags["sweep.best_run_id"]
    finally:
        team.stop()
