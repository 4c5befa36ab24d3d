"""MLflow names: which registered-model names MLflow accepts, and how a name goes into a search filter.

MLflow checks a registered model's name only when something is registered, which here is after
training; ``registry.model_name`` is checked against the same rules when the config loads
(``tests/unit/qlora/test_names.py`` compares them with MLflow's own ``_validate_model_name``).

MLflow's filter grammar has no escape character: a string literal is quoted with ``'`` or ``"``
and may contain the other quote only (``name = "it's"`` works, ``'it''s'`` and ``'it\\'s'`` match
nothing). So a name holding both quote characters can never be searched for, and is refused.
"""

from __future__ import annotations

import posixpath

# MLflow's registered_models.name column is String(256); registry.register_merged adds "-merged".
MERGED_SUFFIX = "-merged"
MAX_MODEL_NAME = 256 - len(MERGED_SUFFIX)


def model_name_problem(name: str) -> str | None:
    """Why MLflow (or a search filter) would refuse ``name`` as a registered model name, else None."""
    if not name or not name.strip():
        return "must not be empty"
    if name != name.strip():
        return "must not start or end with whitespace"
    bad = [c for c in ("/", ":") if c in name]
    if bad:
        return f"MLflow refuses {' and '.join(repr(c) for c in bad)} in model names (use '-' or '_')"
    if posixpath.normpath(name) != name or name == "." or name.startswith(".."):
        return "MLflow refuses names that resolve to another path ('.', '..', '..x')"
    if "'" in name and '"' in name:
        return "must not contain both ' and \" (an MLflow search filter cannot quote such a name)"
    if len(name) > MAX_MODEL_NAME:
        return f"at most {MAX_MODEL_NAME} characters (MLflow stores 256, and '{MERGED_SUFFIX}' may be appended)"
    return None


def filter_literal(value: str) -> str:
    """``value`` as a string literal for an MLflow search filter: quoted with the quote it does not contain."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} contains both quote characters and cannot be used in an MLflow search filter")
