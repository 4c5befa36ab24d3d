"""The loop for real: `make team` (MLflow server with webhooks, Prefect server, deployments, the bridge, the webhook
registration, a process worker, all on 127.0.0.1), a registered version, `qlora promote` moving champion: the
batch-predict and serving-bundle deployments start within 60 s with that version, the predictions are that version's,
one per input row, and the bundle passes serve-check. Then the same bridge refuses a forged signature, a replayed
delivery, a stale timestamp and a 10 MB body, and none of them starts a flow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from flows.cli import main as cli
from qlora.config.schema import RegistryConfig, TrackingConfig
from qlora.tracking.runs import start_run
from registry.bundle import serve_check
from registry.events import signature
from registry.register import register_adapter
from tests.conftest import REPO
from tests.registry_fixtures import free_port, stop, trained, wait_for  # noqa: F401

BIN = Path(sys.executable).parent
NAME = "tiny-loop"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _runs(http: httpx.Client, deployment_id: str) -> list[dict]:
    r = http.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    r.raise_for_status()
    return r.json()


@pytest.mark.slow  # three servers, a worker and two flow-run subprocesses: ~3 min on 2 cores
@pytest.mark.e2e
def test_champion_moving_starts_batch_predict_and_bundle(trained, tmp_path, prefect_home):
    base, adapter, report = trained
    ports = {k: free_port() for k in ("PREFECT_PORT", "MLFLOW_PORT", "BRIDGE_PORT")}
    server_dir = tmp_path / "server"
    prefect_home(server_dir / "prefect")  # where `make server` keeps the Prefect server's data
    rows = [json.loads(line) for line in (REPO / "data/demo/batch_prompts.jsonl").read_text().splitlines()]
    out = tmp_path / "predictions" / "{name}-v{version}.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTHONPATH")}
    env |= {"PREFECT_UI_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["make", "-C", str(REPO), "team", "NO_INSTALL=1", f"BIN={BIN}", f"SERVER_DIR={server_dir}", f"MODEL_NAME={NAME}",
           f"QLORA_REPO_DIR={REPO}", f"QLORA_BATCH_INPUT={REPO / 'data/demo/batch_prompts.jsonl'}", f"QLORA_BATCH_OUTPUT={out}",
           f"QLORA_BUNDLE_DIR={tmp_path / 'bundles' / '{name}-v{version}'}", *(f"{k}={v}" for k, v in ports.items())]
    log = tmp_path / "team.log"
    team = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    mlflow_url, bridge = f"http://127.0.0.1:{ports['MLFLOW_PORT']}", f"http://127.0.0.1:{ports['BRIDGE_PORT']}"
    http = httpx.Client(base_url=f"http://127.0.0.1:{ports['PREFECT_PORT']}/api", timeout=30)
    try:
        wait_for(lambda: (team.poll() is None or pytest.fail(log.read_text()[-4000:])) and "team up" in log.read_text(),
              "make team", 300)
        batch_dep = http.get("/deployments/name/qlora-batch-predict/batch-predict").json()
        bundle_dep = http.get("/deployments/name/qlora-serving-bundle/serving-bundle").json()

        run = start_run(TrackingConfig(uri=mlflow_url, experiment_name="loop"), run_name="loop")
        v = register_adapter(base, adapter, report, RegistryConfig(model_name=NAME, bootstrap_resamples=100), run)
        assert "champion" not in v.aliases, "the 4-step adapter was not expected to pass the gate"
        assert _runs(http, batch_dep["id"]) == []  # challenger moving starts nothing

        t0 = datetime.now().astimezone()
        assert cli(["promote", NAME, v.version, "--why", "loop test", "--tracking-uri", mlflow_url]) == 0
        started = wait_for(lambda: [r for r in _runs(http, batch_dep["id"]) if r["start_time"]], "the batch-predict run", 60, 0.5)
        (fr,) = started
        delay = (datetime.fromisoformat(fr["start_time"]) - t0).total_seconds()
        created = (datetime.fromisoformat(fr["created"]) - t0).total_seconds()
        print(f"champion moved -> batch-predict flow run created after {created:.1f} s, started after {delay:.1f} s")
        assert fr["parameters"]["model_uri"] == f"models:/{NAME}/{v.version}"
        (bundle_run,) = wait_for(lambda: _runs(http, bundle_dep["id"]), "the serving-bundle run", 60)
        assert bundle_run["parameters"]["model_uri"] == f"models:/{NAME}/{v.version}"

        def done(run_id):
            state = http.get(f"/flow_runs/{run_id}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        for r in (fr, bundle_run):
            state = wait_for(lambda: done(r["id"]), f"flow run {r['name']}", 420, 2)
            assert state["type"] == "COMPLETED", (state, (server_dir / "logs/worker.log").read_text()[-4000:])
        preds = [json.loads(line) for line in Path(str(out).format(name=NAME, version=v.version)).read_text().splitlines()]
        assert [p["prompt"] for p in preds] == [r["prompt"] for r in rows]
        assert {(p["model"], p["version"]) for p in preds} == {(NAME, v.version)}
        bundle = tmp_path / "bundles" / f"{NAME}-v{v.version}"
        m = serve_check(bundle, str(base.base), 8, json.loads((bundle / "manifest.json").read_text())["base"]["revision"])
        assert m["model"]["version"] == v.version

        # The same bridge, attacked. The MLflow delivery that moved champion is the Prefect event's id.
        events = http.post("/events/filter", json={"filter": {"resource": {"id": [f"mlflow.registered_model.{NAME}"]},
                                                              "event": {"name": ["mlflow.model_version_alias.created"]}}}).json()["events"]
        (moved,) = [e for e in events if e["resource"].get("mlflow.model.alias") == "champion"]
        secret = (server_dir / "webhook-secret").read_text().strip()
        body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "",
                           "data": {"name": NAME, "alias": "champion", "version": v.version}}).encode()

        def send(delivery_id, key=secret, stamp=None, payload=body):
            stamp = str(int(time.time()) if stamp is None else stamp)
            return httpx.post(f"{bridge}/mlflow?model={NAME}", content=payload, timeout=30, headers={
                "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
                "X-MLflow-Signature": signature(key, delivery_id, stamp, payload)}).status_code

        assert send(str(uuid.uuid4()), key="forged" * 8) == 401
        assert send(moved["id"]) == 409  # MLflow's own delivery again: a replay
        assert send(str(uuid.uuid4()), stamp=int(time.time()) - 600) == 401
        assert send(str(uuid.uuid4()), payload=body + b" " * (10 * 1024 * 1024)) == 413
        time.sleep(10)  # long enough for a trigger to have fired
        assert len(_runs(http, batch_dep["id"])) == 1 and len(_runs(http, bundle_dep["id"])) == 1
        bridge_log = (server_dir / "logs/bridge.log").read_text()
        assert secret not in bridge_log and "refused a delivery" in bridge_log

        # SIGTERM to `make team` (what systemd or a closed terminal sends) ends everything it started: the Prefect
        # worker, its server gone at the same moment, used to hang in its own shutdown and outlive make as an orphan.
        t_stop = time.monotonic()
        os.killpg(team.pid, signal.SIGTERM)
        team.wait(60)
        end = time.monotonic() + 30  # the recipe gives them 10 s after SIGTERM, then SIGKILL
        while _group_alive(team.pid) and time.monotonic() < end:
            time.sleep(0.2)
        left = subprocess.run(["ps", "-o", "pid,ppid,cmd", "-g", str(team.pid)], capture_output=True, text=True).stdout
        assert not _group_alive(team.pid), f"still running 30 s after make team exited:\n{left}"
        print(f"make team and all it started gone {time.monotonic() - t_stop:.1f} s after SIGTERM")
    finally:
        stop(team, grace_s=60)
