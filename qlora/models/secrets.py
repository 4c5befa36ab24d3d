"""Secrets: where a hub token comes from (a Prefect Secret block named in the config, else the environment).

The token is handed to ``from_pretrained`` only. It is never a config value, an MLflow param/tag or a
log line; ``tests/unit/tasks/test_failures.py`` plants one and greps the MLflow store and the logs for it.
"""

from __future__ import annotations

import os

from qlora.config.schema import ModelConfig
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
