"""Notifications through Prefect: two automations on the Prefect server send a message through a notification block
(Slack, Microsoft Teams, a custom webhook, email: any Prefect block that can ``notify``) when

- a flow run of this project ends Failed, Crashed or TimedOut (Prefect's own ``prefect.flow-run.<state>`` events);
- ``champion`` moves: ``qlora.champion.moved``, which whoever moved it emits (the gate, an approval, ``qlora promote``,
  ``qlora rollback``: ``registry/aliases.py``), or the bridge's ``mlflow.model_version_alias.created`` for
  ``champion`` (a move made in MLflow itself, when ``make team`` runs the bridge). One move seen both ways is one
  message.

The block keeps its URL or token on the server: nothing of it is in a run's config, parameters or logs.
``qlora notifications setup --block TYPE/NAME`` creates both automations or updates them in place (by name: running
it again changes nothing else); ``make team`` runs it when ``QLORA_NOTIFY_BLOCK`` names a block. ``prefect.yaml``
cannot hold them: ``prefect deploy`` makes automations of deployment triggers only, which start that deployment.
A bare ``qlora run`` (Prefect's temporary server) has no automations: it notifies nobody.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from qlora.errors import ConfigError
from registry.events import CHAMPION_MOVED, RESOURCE_PREFIX

FAILED, CHAMPION = "qlora: flow run failed", "qlora: champion moved"
# Not qlora-trial: a failed trial is a row of its sweep's table; the sweep fails (and is notified) when all trials did.
NOTIFIED_FLOWS = ("qlora-finetune", "qlora-sweep", "qlora-reproduce", "qlora-batch-predict", "qlora-serving-bundle")
FAILED_STATES = ("Failed", "Crashed", "TimedOut")  # TimedOut: a Failed-type state with its own name (and event)
BRIDGE_ALIAS_EVENT = "mlflow.model_version_alias.created"
# The bridge's copy of a move the promoting process announced comes seconds later: the second event of one
# model version within this window is dropped (a real second move of the same version that fast is dropped too).
SAME_MOVE = timedelta(seconds=60)

# Jinja, rendered by the server when the automation fires (flow, flow_run: read from the API; event: the trigger's).
FAILED_SUBJECT = "qlora: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "flow run id: {{ flow_run.id }}"
    # The UI link where the server knows its UI's address (PREFECT_UI_URL, else from its PREFECT_API_URL).
    "{% set url = flow_run|ui_url %}{% if url %}\n{{ url }}{% endif %}"
)
CHAMPION_SUBJECT = ("qlora: {{ event.resource['mlflow.model.name'] }} v{{ event.resource['mlflow.model.version'] }} "
                    "is champion")
CHAMPION_BODY = (
    "{% set name = event.resource['mlflow.model.name'] %}{% set version = event.resource['mlflow.model.version'] %}"
    "{{ name }} v{{ version }} is now the champion"
    "{% if event.payload.previous %} (was v{{ event.payload.previous }}){% endif %}: models:/{{ name }}/{{ version }}\n"
    "{% if event.payload.by %}by {{ event.payload.by }}: {{ event.payload.why }}"
    "{% else %}moved in MLflow ({{ event.event }}){% endif %}"
)


def automations(block_id: UUID) -> list:
    """The two automations (``prefect.automations.AutomationCore``), both notifying the block ``block_id``."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    failed = EventTrigger(
        expect={f"prefect.flow-run.{s}" for s in FAILED_STATES},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(NOTIFIED_FLOWS)},
        posture=Posture.Reactive, threshold=1, within=timedelta(0),  # every failed run, at once
    )
    moved = EventTrigger(
        expect={CHAMPION_MOVED, BRIDGE_ALIAS_EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*", "mlflow.model.alias": "champion"},
        for_each={"mlflow.model.name", "mlflow.model.version"},
        posture=Posture.Reactive, threshold=1, within=SAME_MOVE,
    )
    return [
        AutomationCore(name=FAILED, description=f"A flow run of {', '.join(NOTIFIED_FLOWS)} ended "
                       f"{', '.join(FAILED_STATES)}: tell people (qlora notifications setup).", trigger=failed,
                       actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)]),
        AutomationCore(name=CHAMPION, description="The champion alias of a registered model moved: tell people "
                       "(qlora notifications setup).", trigger=moved,
                       actions=[SendNotification(block_document_id=block_id, subject=CHAMPION_SUBJECT, body=CHAMPION_BODY)]),
    ]


def block_id(client, block: str) -> UUID:
    """The id of the notification block ``TYPE/NAME`` (e.g. slack-webhook/ml-team) on the server ``client`` talks to."""
    from prefect.exceptions import PrefectHTTPStatusError

    slug, _, name = block.partition("/")
    if not slug or not name:
        raise ConfigError(f"--block {block}: expected TYPE/NAME, e.g. slack-webhook/ml-team or custom-webhook/ops "
                          "(`prefect block ls` lists them)")
    try:
        r = client.request("GET", "/block_types/slug/{slug}/block_documents/name/{block_document_name}",
                           path_params={"slug": slug, "block_document_name": name}, params={"include_secrets": False})
        r.raise_for_status()
    except PrefectHTTPStatusError as e:
        if e.response.status_code != 404:
            raise
        raise ConfigError(f"--block {block}: no such block on {client.api_url}; create it first (the UI's Blocks "
                          f"page, or `prefect block create {slug}`), then run this again") from None
    doc = r.json()
    if "notify" not in (doc.get("block_schema") or {}).get("capabilities", []):
        raise ConfigError(f"--block {block}: a {slug} block cannot send notifications; name a notification block "
                          "(slack-webhook, ms-teams-webhook, custom-webhook, email, ...)")
    return UUID(doc["id"])


def setup(block: str) -> list[str]:
    """Create both automations, or update the ones of the same name in place, to notify ``block``; a line each."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigError("qlora notifications setup: PREFECT_API_URL is unset; automations live on a Prefect server "
                          "(e.g. PREFECT_API_URL=http://127.0.0.1:4200/api, which `make team` sets)")
    lines = []
    with get_client(sync_client=True) as client:
        target = block_id(client, block)
        for automation in automations(target):
            found = client.read_automations_by_name(automation.name)
            if found:
                client.update_automation(found[0].id, automation)
                for extra in found[1:]:  # made by hand, or by two setups at once: one of each is enough
                    client.delete_automation(extra.id)
                lines.append(f"automation '{automation.name}' updated ({found[0].id}) -> {block}")
            else:
                lines.append(f"automation '{automation.name}' created ({client.create_automation(automation)}) -> {block}")
    return lines
