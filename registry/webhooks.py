"""Create, idempotently, the MLflow webhooks that tell the bridge (``registry/events.py``) about a registered model.

MLflow's webhooks are global (they fire for every model), so there is one webhook per model, named
``qlora-bridge-<model>``, whose URL names the model (``.../mlflow?model=<model>``); the bridge drops other models'
deliveries. Running the registration again updates URL, events, secret and status in place: no second webhook.

MLflow refuses webhook URLs that are not https or that resolve to a private or loopback address; a laptop setup
(bridge on 127.0.0.1, plain http) needs ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and
``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` in the *server's* environment (both exist to stop SSRF: not for production).
"""

from __future__ import annotations

from urllib.parse import quote

# What the bridge forwards: a new version, an alias set or removed (champion/challenger moves), a version tag set.
EVENTS = ("model_version.created", "model_version_alias.created", "model_version_alias.deleted", "model_version_tag.set")


def webhook_name(model: str) -> str:
    return f"qlora-bridge-{model}"


def webhook_url(bridge_url: str, model: str) -> str:
    return f"{bridge_url.rstrip('/')}/mlflow?model={quote(model, safe='')}"


def register_webhook(client, model: str, bridge_url: str, secret: str) -> tuple[str, bool]:
    """(webhook id, created?) for ``model``'s webhook to the bridge at ``bridge_url`` (e.g. http://127.0.0.1:8765)."""
    name, url = webhook_name(model), webhook_url(bridge_url, model)
    page = client.list_webhooks(max_results=1000)
    found = [w for w in page if w.name == name]
    while page.token and not found:
        page = client.list_webhooks(max_results=1000, page_token=page.token)
        found = [w for w in page if w.name == name]
    if found:
        hook = client.update_webhook(found[0].webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE",
                                     description=f"qlora events bridge for {model}")
        return hook.webhook_id, False
    hook = client.create_webhook(name=name, url=url, events=list(EVENTS), secret=secret,
                                 description=f"qlora events bridge for {model}")
    return hook.webhook_id, True
