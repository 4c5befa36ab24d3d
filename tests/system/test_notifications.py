"""Notifications for real: a `prefect server start` on 127.0.0.1, a custom-webhook notification block pointing at a
receiver in this test, the automations `qlora notifications setup` makes (twice: still two), then a qlora-finetune
flow run that fails and a champion moved by `qlora promote`: each reaches the receiver as one message that says what
happened. The bridge's report of the same move adds nothing; its report of another move is one more message."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlflow
import pytest

from flows.cli import main as cli
from flows.notifications import CHAMPION, FAILED
from qlora.config.files import load_config
from registry.events import emit_to_prefect, translate
from tests.registry_fixtures import wait_for
from tests.system.test_deployments import Team

NAME = "tiny-notify"


class Receiver:
    """What a chat service's incoming webhook is: an HTTP server on 127.0.0.1 that keeps every JSON body."""

    def __init__(self):
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def about(self, text: str) -> list[dict]:
        return [m for m in self.got if text in m["subject"]]


@pytest.mark.slow  # a Prefect server subprocess: ~1 min on 2 cores
def test_a_failed_run_and_a_moved_champion_reach_the_notification_block(tmp_path, mlflow_uri, capsys, prefect_home):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.finetune import qlora_finetune

    team, hook = Team(tmp_path, prefect_home), Receiver()
    marks, t0 = {}, time.monotonic()
    try:
        team.start_server()
        marks["server"] = round(time.monotonic() - t0, 1)
        with temporary_settings(updates={PREFECT_API_URL: team.api}):
            CustomWebhookNotificationBlock(name="ops", url=hook.url,
                                           json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("ops")
            Secret(value="not a notifier").save("plain")
            assert cli(["notifications", "setup", "--block", "custom-webhook/nope"]) == 1
            assert "--block custom-webhook/nope: no such block on" in capsys.readouterr().err
            assert cli(["notifications", "setup", "--block", "secret/plain"]) == 1
            assert "a secret block cannot send notifications" in capsys.readouterr().err
            for verb in ("created", "updated"):
                assert cli(["notifications", "setup", "--block", "custom-webhook/ops"]) == 0
                assert capsys.readouterr().out.count(f"' {verb} (") == 2
            with get_client(sync_client=True) as c:
                assert sorted(a.name for a in c.read_automations()) == sorted([FAILED, CHAMPION])

            # A run that fails: the user's error reaches people, with the run's name and id.
            cfg = load_config(None, [f"data.path={tmp_path / 'missing.jsonl'}", f"workdir={tmp_path / 'work'}",
                                     f"tracking.artifact_location={tmp_path / 'art'}"])
            state = qlora_finetune(config=cfg, return_state=True)
            assert state.is_failed()
            t = time.monotonic()
            (failed,) = wait_for(lambda: hook.about("qlora-finetune"), "the failure notification", 60, 0.2)
            marks["failure notified after"] = round(time.monotonic() - t, 1)
            with get_client(sync_client=True) as c:
                run = c.read_flow_run(state.state_details.flow_run_id)
            assert failed["subject"] == f"qlora: qlora-finetune run {run.name} Failed"
            assert failed["body"].startswith(f"Flow run {run.name} of qlora-finetune ended Failed: ")
            assert "missing.jsonl: data file not found" in failed["body"]
            assert failed["body"].endswith(f"flow run id: {run.id}\n{team.api.removesuffix('/api')}/runs/flow-run/{run.id}")

            # `qlora promote` moves champion: the event it emits reaches people, no bridge needed.
            client = mlflow.MlflowClient(mlflow_uri)
            client.create_registered_model(NAME)
            client.create_model_version(NAME, source=str(tmp_path / "v1"))
            t = time.monotonic()
            assert cli(["promote", NAME, "1", "--why", "ready", "--by", "ann", "--tracking-uri", mlflow_uri]) == 0
            (moved,) = wait_for(lambda: hook.about(NAME), "the champion notification", 60, 0.2)
            marks["champion notified after"] = round(time.monotonic() - t, 1)
            assert moved == {"subject": f"qlora: {NAME} v1 is champion",
                             "body": f"{NAME} v1 is now the champion: models:/{NAME}/1\nby ann: manual: ready"}

            # The bridge reports the same move (MLflow's webhook): no second message. A move made in MLflow: one.
            for version in ("1", "2"):
                emit_to_prefect(translate(str(uuid.uuid4()), {"entity": "model_version_alias", "action": "created",
                                                              "data": {"name": NAME, "alias": "champion", "version": version}}))
            wait_for(lambda: len(hook.about(NAME)) > 1, "the second champion notification", 60, 0.2)
            time.sleep(1)  # a duplicate would have been evaluated before the second move: give its message time too
            assert [m["subject"] for m in hook.about(NAME)] == [f"qlora: {NAME} v1 is champion", f"qlora: {NAME} v2 is champion"]
            assert hook.about(NAME)[1]["body"] == (f"{NAME} v2 is now the champion: models:/{NAME}/2\n"
                                                   "moved in MLflow (mlflow.model_version_alias.created)")
            assert len(hook.about("qlora-finetune")) == 1
        print(f"phases (s): {marks}")
    finally:
        hook.srv.shutdown()
        team.stop()
