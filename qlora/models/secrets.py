"""Secrets: where a hub token and a webhook URL come from (a Prefect Secret block named in the config,
else the environment / the plain config value), and how a URL is shown in logs.

The token is handed to ``from_pretrained`` only. It is never a config value, an MLflow param/tag or a
log line; ``tests/unit/tasks/test_failures.py`` plants one and greps the MLflow store and the logs for it.
A webhook URL carries its own token (Slack, Teams, Discord put it in the path): logs show its scheme
and host only, and ``report.webhook_secret`` keeps it out of the flow run's parameters.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from qlora.config.schema import ModelConfig, ReportConfig
from qlora.errors import ConfigError


def hf_token(model: ModelConfig) -> str | None:
    if model.hf_token_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(model.hf_token_secret).get()
        except ValueError as e:
            raise ConfigError(
                f"model.hf_token_secret: no Prefect Secret block named '{model.hf_token_secret}' "
                "(create it with `prefect block create secret` or unset the key to use $HF_TOKEN)"
            ) from e
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def redact_url(url: str) -> str:
    """``https://hooks.slack.com/services/T0/B0/XYZ`` -> ``https://hooks.slack.com/...``: no path, query or user."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or "?"
    return f"{parts.scheme or '?'}://{host}{f':{parts.port}' if parts.port else ''}/..."


def webhook_url(cfg: ReportConfig) -> str | None:
    """The webhook URL: from the Prefect Secret block ``report.webhook_secret`` when set, else ``report.webhook_url``."""
    if cfg.webhook_secret:
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(cfg.webhook_secret).get())
        except ValueError as e:
            raise ConfigError(
                f"report.webhook_secret: no Prefect Secret block named '{cfg.webhook_secret}' "
                "(create it with `prefect block create secret`)"
            ) from e
    return cfg.webhook_url
