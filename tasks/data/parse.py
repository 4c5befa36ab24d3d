"""Parse: a source's rows -> conversation turns, with one clear reason per bad row (no tokenizer yet).

Formats: ``alpaca`` (instruction/input/output), ``sharegpt`` (conversations of {from, value}),
``messages`` (OpenAI-style {role, content}), ``prompt_completion`` and plain ``text``. All but
``text`` become turns (system|user|assistant) that ``qlora.template.render_turns`` renders, so a
prompt/completion row is trained exactly as a consumer will prompt it. ``text`` is trained whole.
Pure Python: importable without torch or Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.config.schema import DataConfig
from qlora.errors import DataError
from qlora.template import Turn
from tasks.data.read import Problem, Source

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


@dataclass
class Parsed:
    """One source's rows checked for structure (fields, types, roles): everything that needs no tokenizer.
    Unusable rows are carried as problems; they are counted once, after tokenizing (``tasks/data/drops.py``)."""

    src: Source
    fmt: str
    rows: list[tuple[str, list[Turn] | str]] = field(default_factory=list)  # (where, turns or plain text)
    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0
    hint: str = ""  # said when rows are dropped: the format the rows look like when data.format does not match


def parse(src: Source, data: DataConfig, fmt: str | None = None) -> Parsed:
    """Every row of ``src`` as turns in ``fmt`` (detected from the first row when data.format is auto)."""
    fmt = fmt or first_format(src, data)
    out = Parsed(src=src, fmt=fmt, problems=list(src.problems), rows_read=len(src.rows) + len(src.problems),
                 hint=format_hint(src, fmt, data))
    for where, row in src.rows:
        try:
            out.rows.append((where, row_turns(row, fmt, where, data.columns)))
        except RowProblem as e:
            out.problems.append((e.where, e.reason, str(e)))
    return out


def first_format(src: Source, data: DataConfig) -> str:
    if data.format != "auto":
        return data.format
    first = next(((w, r) for w, r in src.rows if isinstance(r, dict)), None)
    if first is None:
        raise DataError(f"{src.name}: no row is a JSON object; cannot detect the format")
    return detect_format(first[1], first[0], data.columns)


def format_hint(src: Source, fmt: str, data: DataConfig) -> str:
    """When an explicit data.format does not match the rows, say which format they look like."""
    first = next((r for _, r in src.rows if isinstance(r, dict)), None)
    if data.format == "auto" or first is None:
        return ""
    try:
        seen = detect_format(first, src.name, data.columns)
    except DataError:
        return ""
    return f" (data.format is {fmt}, but the rows look like {seen}: set data.format={seen} or auto)" if seen != fmt else ""
