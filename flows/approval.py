"""Human approval before ``champion`` moves (``registry.require_approval``).

The flow pauses with a typed input form (shown in the Prefect UI on the paused flow run); the run
resumes when someone submits it. ``pause_flow_run`` must be called from the flow itself, not from a
task, which is why the flow calls this after the register task.
"""

from __future__ import annotations

from prefect.input import RunInput
from pydantic import Field

from qlora.config.schema import RegistryConfig
from qlora.refs import MlflowRun, RegisteredVersion
from registry import aliases


class Approval(RunInput):
    approve: bool = Field(description="Move the champion alias to this version.")
    approver: str = Field(description="Who decides (recorded in the version's tags).")
    reason: str = Field("", description="Why (recorded in the version's tags).")


def await_approval(version: RegisteredVersion, cfg: RegistryConfig, run: MlflowRun) -> RegisteredVersion:
    """Pause until approved or rejected; promote on approval. A timeout fails the flow (Prefect's FlowPauseTimeout)."""
    import mlflow
    from prefect.flow_runs import pause_flow_run

    answer = pause_flow_run(
        wait_for_input=Approval.with_initial_data(
            description=f"Promote **{version.name} v{version.version}** to champion?\n\nGate: {version.decision}",
            approve=False, approver=""),
        timeout=cfg.approval_timeout_s,
        poll_interval=2,  # seconds between checks of the run state: cheap, and approval feels immediate
    )
    client = mlflow.MlflowClient(run.tracking_uri)
    if not answer.approve:
        client.set_model_version_tag(version.name, version.version, "promotion",
                                     f"rejected by {answer.approver}: {answer.reason}")
        return version.model_copy(update={"awaiting_approval": False})
    champion = aliases.set_champion(client, version.name, version.version, who=answer.approver,
                                    why=f"approved: {answer.reason} (gate: {version.decision})")
    held = [aliases.CHAMPION] if champion == version.version else []  # else a later concurrent promotion holds it
    return version.model_copy(update={"aliases": version.aliases + held, "awaiting_approval": False})
