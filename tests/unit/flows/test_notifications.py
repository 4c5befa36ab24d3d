"""The notification automations as the Prefect server reads them, without a server: which events each trigger
covers (the server's own matching code), one bucket for one champion move reported twice, and the messages the
templates render (the server's own renderer). The server itself: tests/system/test_notifications.py."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import datetime, timezone

from flows.notifications import CHAMPION, FAILED, NOTIFIED_FLOWS, automations
from registry.events import CHAMPION_MOVED, PrefectEvent, champion_moved, translate
from tests.conftest import REPO

BLOCK = uuid.uuid4()


def _server_side() -> dict:
    """The automations as the server stores them (its schema validates the triggers and the Jinja templates)."""
    from prefect.server.events.schemas.automations import Automation

    return {a.name: Automation.model_validate(a.model_dump(mode="json")) for a in automations(BLOCK)}


def _received(e: PrefectEvent | dict):
    from prefect.server.events.schemas.events import ReceivedEvent

    raw = e.as_json(datetime.now(timezone.utc).isoformat()) if isinstance(e, PrefectEvent) else e
    return ReceivedEvent.model_validate({**raw, "id": str(uuid.uuid4())})  # the server keeps UUIDs (MLflow delivery ids are)


def _render(template: str, event) -> str:
    from prefect.server.utilities.user_templates import render_user_template

    return asyncio.run(render_user_template(template, {"event": event}))


def _flow_run_event(state: str, flow: str):
    return _received({"event": f"prefect.flow-run.{state}", "occurred": datetime.now(timezone.utc).isoformat(),
                      "resource": {"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}", "prefect.resource.name": "brave-fox",
                                   "prefect.state-name": state},
                      "related": [{"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow",
                                   "prefect.resource.name": flow}]})


def test_every_flow_but_the_trial_is_watched():
    source = "".join(p.read_text() for p in sorted((REPO / "flows").glob("*.py")))
    assert set(re.findall(r'@flow\(\s*name="([^"]+)"', source)) - {"qlora-trial"} == set(NOTIFIED_FLOWS)


def test_failed_crashed_and_timed_out_runs_of_the_project_are_notified():
    a = _server_side()[FAILED]
    (action,) = a.actions
    assert action.type == "send-notification" and action.block_document_id == BLOCK
    for state in ("Failed", "Crashed", "TimedOut"):
        assert a.trigger.covers(_flow_run_event(state, "qlora-finetune")), state
    assert a.trigger.covers(_flow_run_event("Crashed", "qlora-serving-bundle"))
    assert not a.trigger.covers(_flow_run_event("Completed", "qlora-finetune"))
    assert not a.trigger.covers(_flow_run_event("Cancelled", "qlora-sweep"))  # someone cancelled it: they know
    assert not a.trigger.covers(_flow_run_event("Failed", "qlora-trial"))  # a row of its sweep
    assert not a.trigger.covers(_flow_run_event("Failed", "someone-elses-flow"))
    assert a.trigger.within.total_seconds() == 0  # each run, at once


def test_a_champion_move_is_one_message_whoever_reports_it():
    a = _server_side()[CHAMPION]
    (action,) = a.actions
    assert action.block_document_id == BLOCK
    ours = _received(champion_moved("qlora-demo", "3", "2", "promotion gate", "tuned beats champion v2"))
    bridge = _received(translate("d-1", {"entity": "model_version_alias", "action": "created",
                                         "data": {"name": "qlora-demo", "alias": "champion", "version": "3"}}))
    challenger = _received(translate("d-2", {"entity": "model_version_alias", "action": "created",
                                             "data": {"name": "qlora-demo", "alias": "challenger", "version": "4"}}))
    next_move = _received(champion_moved("qlora-demo", "4", "3", "ann", "manual: better"))
    assert ours.event == CHAMPION_MOVED and a.trigger.covers(ours) and a.trigger.covers(bridge)
    assert not a.trigger.covers(challenger)
    # one bucket per model version: the second report of the same move falls in the bucket the first one fired
    assert a.trigger.bucketing_key(ours) == a.trigger.bucketing_key(bridge) != a.trigger.bucketing_key(next_move)

    assert _render(action.subject, ours) == "qlora: qlora-demo v3 is champion"
    assert _render(action.body, ours) == ("qlora-demo v3 is now the champion (was v2): models:/qlora-demo/3\n"
                                          "by promotion gate: tuned beats champion v2")
    assert _render(action.body, bridge) == ("qlora-demo v3 is now the champion: models:/qlora-demo/3\n"
                                            "moved in MLflow (mlflow.model_version_alias.created)")
