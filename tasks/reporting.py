"""What people look at after a run: the run report, the eval examples table, the loss plot in MLflow.

Builders only: no Prefect task or flow here. ``flows/stages.py`` turns them into artifacts per flow run
(keys are stable, so the Artifacts page shows their history across runs):
- ``<model>-report``         Markdown: base vs tuned metrics, promotion decision, MLflow links
- ``<model>-eval-examples``  table: prompt, reference, base output, tuned output
- ``data-report``            Markdown data validation report (the tokenize task)
Notifications (a failed flow run, a moved champion) are Prefect automations on the server: ``flows/notifications.py``.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from qlora.config.schema import ReportConfig
from qlora.refs import Adapter, EvalReport, MlflowRun, RegisteredVersion

log = logging.getLogger("qlora.report")
LOSS_PLOT = "plots/loss.png"


def artifact_key(model_name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{what}".lower()).strip("-")


def mlflow_links(run: MlflowRun, version: RegisteredVersion | None, cfg: ReportConfig) -> dict[str, str]:
    """Clickable MLflow UI links when a UI URL is known, else the plain URIs people can paste."""
    import mlflow

    base = cfg.mlflow_ui_url or (run.tracking_uri if run.tracking_uri.startswith(("http://", "https://")) else None)
    exp_id = mlflow.MlflowClient(run.tracking_uri).get_run(run.run_id).info.experiment_id
    links = {"run": f"runs:/{run.run_id}"}
    if version is not None:
        links["model version"] = f"models:/{version.name}/{version.version}"
    if base:
        base = base.rstrip("/")
        links["run"] = f"[{run.run_id}]({base}/#/experiments/{exp_id}/runs/{run.run_id})"
        if version is not None:
            links["model version"] = f"[{version.name} v{version.version}]({base}/#/models/{version.name}/versions/{version.version})"
    return links


def promotion_decision(version: RegisteredVersion, run: MlflowRun) -> str:
    """The registry's own record of the decision (model-version tag), so report and registry agree."""
    import mlflow

    mv = mlflow.MlflowClient(run.tracking_uri).get_model_version(version.name, version.version)
    head = mv.tags.get("promotion") or ("promoted to champion" if "champion" in version.aliases else "kept as challenger")
    why = version.decision or mv.tags.get("promotion.reason")  # the gate's reason, with its evidence
    return f"{head}: {why}" if why else head


def render_report(report: EvalReport, adapter: Adapter, version: RegisteredVersion, decision: str, links: dict[str, str]) -> str:
    names = sorted({k.split("/", 2)[2] for k in report.metrics})
    rows = ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    for m in names:
        b, t = report.metrics.get(f"eval/base/{m}"), report.metrics.get(f"eval/tuned/{m}")
        delta = f"{t - b:+.4f}" if b is not None and t is not None else ""
        rows.append(f"| {m} | {b:.4f} | {t:.4f} | {delta} |")
    loss = f"{adapter.first_loss:.4f} -> {adapter.last_loss:.4f}" if adapter.first_loss is not None else f"{adapter.train_loss:.4f}"
    return "\n".join([
        f"# QLoRA fine-tune: {version.name} v{version.version}",
        "",
        f"**Promotion:** {decision} (aliases: {', '.join(version.aliases)})",
        "",
        "## Base vs tuned (held-out split)",
        *rows,
        "",
        f"Training: {adapter.global_step} optimizer steps, loss {loss}"
        + (f", resumed from step {adapter.resumed_from_step}" if adapter.resumed_from_step else ""),
        "",
        "## Links",
        *[f"- MLflow {k}: {v}" for k, v in links.items()],
        f"- loss plot: `{LOSS_PLOT}` in the MLflow run's artifacts",
    ])


def example_rows(report: EvalReport, n: int) -> list[dict]:
    return [{k: s[k] for k in ("prompt", "reference", "base", "tuned")} for s in report.samples[:n]]


def log_loss_plot(run: MlflowRun, report: EvalReport) -> str:
    """Train loss curve (from the run's autologged ``loss`` history) with the base/tuned eval losses as lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(run.tracking_uri)
    hist = sorted(client.get_metric_history(run.run_id, "loss"), key=lambda h: h.step)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h.step for h in hist], [h.value for h in hist], marker=".", label="train loss")
    for who, style in (("base", ":"), ("tuned", "--")):
        v = report.metrics.get(f"eval/{who}/loss")
        if v is not None:
            ax.axhline(v, linestyle=style, color="gray" if who == "base" else "green", label=f"eval loss ({who})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / Path(LOSS_PLOT).name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        client.log_artifact(run.run_id, str(path), artifact_path=str(Path(LOSS_PLOT).parent))
    return LOSS_PLOT


def build_report(report: EvalReport, adapter: Adapter, version: RegisteredVersion, run: MlflowRun,
                 cfg: ReportConfig) -> tuple[str, str]:
    """Loss plot logged to MLflow; returns (run report Markdown, promotion decision line)."""
    plot = log_loss_plot(run, report)
    decision = promotion_decision(version, run)
    log.info("loss plot %s in MLflow run %s", plot, run.run_id)
    return render_report(report, adapter, version, decision, mlflow_links(run, version, cfg)), decision

