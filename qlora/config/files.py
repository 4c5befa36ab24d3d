"""A YAML file plus ``--set dotted.key=value`` overrides, validated into ``qlora.config.schema.PipelineConfig``;
every problem is reported as ``file: key: message`` (a ``ConfigError``, exit 1, never retried)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qlora.config.schema import REMOVED_KEYS, PipelineConfig
from qlora.errors import ConfigError


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = REMOVED_KEYS.get(key, "unknown key (check the spelling; see configs/demo.yaml for the known keys)")
        # The root, or a rule over a whole section, names its keys in the message: echoing that input adds nothing.
        whole = not e["loc"] or (e["type"] == "value_error" and isinstance(e.get("input"), (dict, list)))
        got = "" if e["type"] == "extra_forbidden" or whole else f" (got {e.get('input')!r})"
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults), apply ``--set`` overrides, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (run from the repo root; configs live in configs/)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config file ({getattr(e, 'strerror', None) or e}); expected a UTF-8 YAML file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, train: ...), got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + --set"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
