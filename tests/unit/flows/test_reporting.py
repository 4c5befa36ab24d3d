"""Run report pieces without training: Markdown, examples table, loss PNG in MLflow, webhook."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import mlflow

from qlora.config.schema import ReportConfig, TrackingConfig
from qlora.refs import Adapter, EvalReport, RegisteredVersion
from qlora.tracking.runs import start_run
from tasks.reporting import artifact_key, example_rows, log_loss_plot, mlflow_links, notify, render_report

REPORT = EvalReport(
    metrics={"eval/base/exact_match": 0.0, "eval/tuned/exact_match": 0.75, "eval/base/loss": 5.1, "eval/tuned/loss": 0.4,
             "eval/base/perplexity": 164.0, "eval/tuned/perplexity": 1.49},
    samples=[{"prompt": f"p{i}", "reference": f"r{i}", "base": "x", "tuned": f"r{i}", "base_exact_match": 0.0, "tuned_exact_match": 1.0}
             for i in range(8)],
)
ADAPTER = Adapter(path="/a", run_dir="/r", global_step=12, train_loss=1.0, first_loss=5.0, last_loss=0.5)
VERSION = RegisteredVersion(name="tiny_Model", version="3", model_uri="models:/m-1", aliases=["challenger", "champion"])


def test_report_markdown_and_examples(mlflow_uri):
    run = start_run(TrackingConfig(), run_name="r")
    links = mlflow_links(run, VERSION, ReportConfig(mlflow_ui_url="http://127.0.0.1:5000/"))
    md = render_report(REPORT, ADAPTER, VERSION, "promoted to champion", links)
    assert "| exact_match | 0.0000 | 0.7500 | +0.7500 |" in md
    assert "**Promotion:** promoted to champion" in md
    assert f"(http://127.0.0.1:5000/#/experiments/1/runs/{run.run_id})" in md
    assert "(http://127.0.0.1:5000/#/models/tiny_Model/versions/3)" in md
    assert "loss 5.0000 -> 0.5000" in md
    # sqlite store, no UI URL: plain URIs instead of dead links
    assert mlflow_links(run, VERSION, ReportConfig()) == {"run": f"runs:/{run.run_id}", "model version": "models:/tiny_Model/3"}
    assert example_rows(REPORT, 3) == [{"prompt": f"p{i}", "reference": f"r{i}", "base": "x", "tuned": f"r{i}"} for i in range(3)]
    assert artifact_key("tiny_Model", "eval-examples") == "tiny-model-eval-examples"


def test_loss_plot_is_a_png_in_the_run(mlflow_uri, tmp_path):
    run = start_run(TrackingConfig(artifact_location=str(tmp_path / "art")), run_name="r")
    client = mlflow.MlflowClient(mlflow_uri)
    for step, v in enumerate([5.0, 3.0, 1.5, 0.9], start=1):
        client.log_metric(run.run_id, "loss", v, step=step)
    path = log_loss_plot(run, REPORT)
    local = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path=path, tracking_uri=mlflow_uri)
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_webhook_notification_posts_json():
    hook = _Hook()
    try:
        notify(ReportConfig(webhook_url=hook.url), "promotion", "tiny v3 promoted", model_uri="models:/m-1")
        # An unreachable hook is logged, never raised: a finished run must not fail on a chat outage.
        notify(ReportConfig(webhook_url="http://127.0.0.1:9/nothing"), "failure", "x")
    finally:
        hook.srv.shutdown()
    assert hook.got == [{"event": "promotion", "text": "tiny v3 promoted", "model_uri": "models:/m-1"}]


class _Hook:
    """A tiny webhook receiver on 127.0.0.1 (a real HTTP server, no mocks)."""

    def __init__(self):
        got = self.got = []

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()


def test_failed_flow_run_notifies_the_webhook(prefect_server, tiny_base, tmp_path, mlflow_uri):
    from flows.finetune import qlora_finetune
    from qlora.config.files import load_config

    hook = _Hook()
    try:
        cfg = load_config(None, [f"model.name_or_path={tiny_base}", f"data.path={tmp_path / 'missing.jsonl'}", f"workdir={tmp_path / 'work'}",
                                 f"report.webhook_url={hook.url}", f"tracking.artifact_location={tmp_path / 'art'}"])
        state = qlora_finetune(config=cfg, return_state=True)
    finally:
        hook.srv.shutdown()
    assert state.is_failed()
    (msg,) = hook.got
    assert msg["event"] == "failure" and msg["flow_run_id"] == str(state.state_details.flow_run_id)
    assert "missing.jsonl" in msg["text"]  # the user-facing error travels into the notification
