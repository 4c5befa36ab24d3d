"""Run report pieces without training: Markdown, examples table, loss PNG in MLflow."""

import mlflow

from qlora.config.schema import ReportConfig, TrackingConfig
from qlora.refs import Adapter, EvalReport, RegisteredVersion
from qlora.tracking.runs import start_run
from tasks.reporting import artifact_key, example_rows, log_loss_plot, mlflow_links, render_report

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
