"""``--set dotted.key=value`` overrides and how a config validation error is told: the plumbing of
``qlora.config.load_config``, kept apart so the config module holds the config itself."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from qlora.errors import ConfigError


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/demo.yaml for the known keys)"
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.max_steps=5`` -> (["train", "max_steps"], 5); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected dotted.key=value, e.g. --set train.max_steps=5")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item}: empty key")
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote it") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw
