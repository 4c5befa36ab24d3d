"""``qlora events serve`` and ``qlora events register``: the bridge from MLflow webhooks to Prefect events, wired.

``registry/events.py`` verifies, translates and sends the events to the Prefect API (``POST /api/events``, the
events API behind ``emit_event``, answered synchronously so a delivery is acknowledged to MLflow only once Prefect
has it); here the secret comes from the environment or a Prefect Secret block, and uvicorn serves the app.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qlora.errors import ConfigError
from registry.events import MAX_BODY_BYTES, SeenDeliveries, create_app, emit_to_prefect

log = logging.getLogger("qlora.events")
SECRET_ENV = "QLORA_WEBHOOK_SECRET"


def webhook_secret(block: str | None = None) -> str:
    """The shared webhook secret: the Prefect Secret block ``block`` when named, else ``$QLORA_WEBHOOK_SECRET``."""
    if block:
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(block).get())
        except ValueError as e:
            raise ConfigError(f"--secret-block: no Prefect Secret block named '{block}' (create it with "
                              "`prefect block create secret`, or set $QLORA_WEBHOOK_SECRET instead)") from e
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise ConfigError(f"${SECRET_ENV} is {'unset' if not secret else 'shorter than 16 characters'}: set it to a "
                          "random string (e.g. `openssl rand -hex 32`) or name a Prefect Secret block with --secret-block")
    return secret


def app(secret: str, state_dir: Path | str, max_body: int = MAX_BODY_BYTES, models: set[str] | None = None):
    return create_app(secret, SeenDeliveries(Path(state_dir) / "deliveries.sqlite"), emit_to_prefect, max_body, models)


def serve(host: str, port: int, secret: str, state_dir: Path | str, max_body: int = MAX_BODY_BYTES,
          models: set[str] | None = None) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the bridge listens on %s: put TLS in front of it (the signature authenticates, it does not encrypt)", host)
    log.info("bridge on http://%s:%d/mlflow -> Prefect %s; delivery ids in %s", host, port,
             os.environ.get("PREFECT_API_URL", "(no PREFECT_API_URL: Prefect's default profile)"), state_dir)
    # access_log off: an access line holds the query string (model name) only, but nothing from the body either way.
    uvicorn.run(app(secret, state_dir, max_body, models), host=host, port=port, log_level="info", access_log=False)


def register(tracking_uri: str | None, model: str, bridge_url: str, secret: str) -> str:
    import mlflow

    from qlora.config.schema import TrackingConfig
    from qlora.tracking.runs import resolve_uri
    from registry.webhooks import register_webhook

    client = mlflow.MlflowClient(resolve_uri(TrackingConfig(uri=tracking_uri)))
    hook, created = register_webhook(client, model, bridge_url, secret)
    return f"{model}: webhook {hook} {'created' if created else 'updated'} -> {bridge_url}"
