"""Row formats -> conversation turns, with one clear reason per bad row.

Formats: ``alpaca`` (instruction/input/output), ``sharegpt`` (conversations of {from, value}),
``messages`` (OpenAI-style {role, content}), ``prompt_completion`` and plain ``text``. All but
``text`` become turns (system|user|assistant) that ``qlora.template.render_turns`` renders, so a
prompt/completion row is trained exactly as a consumer will prompt it. ``text`` is trained whole.
Pure Python: importable without torch or Prefect.
"""

from __future__ import annotations

from qlora.errors import DataError
from qlora.template import Turn

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
# Canonical field names per format; data.columns maps these to the user's names.
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowProblem(Exception):
    """One row is unusable; ``reason`` is the counted category."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.reason = where, reason


def map_columns(row: dict, columns: dict[str, str]) -> dict:
    """The row with the user's column names replaced by the canonical ones."""
    if not columns:
        return row
    out = dict(row)
    for canonical, theirs in columns.items():
        if theirs in row:
            out[canonical] = out.pop(theirs)
    return out


def detect_format(row: object, where: str, columns: dict[str, str]) -> str:
    keys = set(map_columns(row, columns)) if isinstance(row, dict) else set()
    for fmt, test in (
        ("sharegpt", {"conversations"}),
        ("messages", {"messages"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
    ):
        if test <= keys:
            return fmt
    raise DataError(
        f"{where}: cannot tell the format from keys {sorted(keys)}; expected alpaca (instruction, input, output), "
        "sharegpt (conversations), messages, prompt_completion (prompt, completion) or text. "
        "Set data.format, and data.columns to map differently named fields"
    )


def _text(row: dict, key: str, where: str, required: bool = True, label: str | None = None) -> str:
    label = label or f"field '{key}'"
    v = row.get(key)
    if v is None:
        if required:
            raise RowProblem(where, "missing_field", f"missing {label}")
        return ""
    if not isinstance(v, str):
        raise RowProblem(where, "not_string", f"{label} must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise RowProblem(where, "empty_field", f"empty {label}")
    return v


def row_turns(row: object, fmt: str, where: str, columns: dict[str, str]) -> list[Turn] | str:
    """Turns for conversational formats, or the raw string for ``text``; raises RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem(where, "not_object", f"expected a JSON object, got {type(row).__name__}")
    row = map_columns(row, columns)
    if fmt == "alpaca":
        instruction = _text(row, "instruction", where).strip()
        extra = _text(row, "input", where, required=False).strip()
        user = f"{instruction}\n{extra}" if extra else instruction  # same as qlora.template.user_message
        return [("user", user), ("assistant", _text(row, "output", where))]
    if fmt == "prompt_completion":
        return [("user", _text(row, "prompt", where)), ("assistant", _text(row, "completion", where))]
    if fmt == "text":
        return _text(row, "text", where)
    key, role_key, content_key = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    turns_raw = row.get(key)
    if turns_raw is None:
        raise RowProblem(where, "missing_field", f"missing field '{key}'")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise RowProblem(where, "empty_field" if turns_raw in ([], "") else "not_list", f"'{key}' must be a non-empty list")
    turns: list[Turn] = []
    for i, t in enumerate(turns_raw):
        label = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise RowProblem(where, "not_object", f"{label} must be an object, got {type(t).__name__}")
        who = t.get(role_key)
        role = SHAREGPT_ROLES.get(who) if fmt == "sharegpt" else (who if who in ("system", "user", "assistant") else None)
        if role is None:
            raise RowProblem(where, "bad_role", f"{label}.{role_key} is {who!r}; expected one of {sorted(SHAREGPT_ROLES) if fmt == 'sharegpt' else ['assistant', 'system', 'user']}")
        turns.append((role, _text(t, content_key, where, label=f"{label}.{content_key}")))
    check_order(turns, where, key)
    return turns


def check_order(turns: list[Turn], where: str, key: str) -> None:
    """Optional leading system turn, then user/assistant alternating, starting with user."""
    expect = "user"
    for i, (role, _) in enumerate(turns):
        if role == "system" and i == 0:
            continue
        if role != expect:
            raise RowProblem(where, "roles_out_of_order", f"{key}[{i}] is a '{role}' turn where a '{expect}' turn was expected")
        expect = "assistant" if role == "user" else "user"
    if not any(r == "assistant" for r, _ in turns):
        raise RowProblem(where, "no_assistant_turn", f"'{key}' has no assistant turn to train on")


def first_exchange(turns: list[Turn] | str) -> tuple[list[Turn], str]:
    """Conversation up to the first assistant answer and that answer (generation eval's prompt/reference)."""
    if isinstance(turns, str):
        # Plain text: continue the second half from the first, split at a space.
        cut = turns.rfind(" ", 0, max(1, len(turns) // 2))
        cut = cut if cut > 0 else len(turns) // 2
        return [("text", turns[:cut])], turns[cut:]
    k = next(i for i, (r, _) in enumerate(turns) if r == "assistant")
    return turns[:k], turns[k][1].strip()
