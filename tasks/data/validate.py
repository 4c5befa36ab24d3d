"""Rows checked for structure before any tokenizer: fields, types, roles, and drop accounting.

A problem confined to one row is counted by reason and the row dropped; too many dropped rows (more
than ``data.max_drop_fraction``, or all of them) fail the run with the offending file:line list.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from qlora.config.schema import DataConfig
from qlora.errors import DataError
from qlora.template import Turn
from tasks.data.formats import RowProblem, detect_format, row_turns
from tasks.data.sources import LocalContent, Source, read_source

log = logging.getLogger("qlora.tokenize")
MAX_LINES = 20  # problem lines shown in an error; the rest are counted
Problem = tuple[str, str, str]  # (where, reason, message line)


@dataclass
class Parsed:
    """Rows checked for structure (fields, types, roles): everything that needs no tokenizer."""

    src: Source
    fmt: str
    rows: list[tuple[str, list[Turn] | str]] = field(default_factory=list)  # (where, turns or plain text)
    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0


def parse(path: str, data: DataConfig, fmt: str | None = None, local: LocalContent | None = None) -> Parsed:
    """Read ``path`` and check every row's structure; fails when too many rows are already unusable."""
    src = read_source(path, data.split, data.subset, data.revision, local)
    fmt = fmt or first_format(src, data)
    out = Parsed(src=src, fmt=fmt, problems=list(src.problems), rows_read=len(src.rows) + len(src.problems))
    for where, row in src.rows:
        try:
            out.rows.append((where, row_turns(row, fmt, where, data.columns)))
        except RowProblem as e:
            out.problems.append((e.where, e.reason, str(e)))
    check_drops(out.problems, out.rows_read, src.name, data.max_drop_fraction, log_them=False, hint=_format_hint(src, fmt, data))
    return out


def validate(data: DataConfig, local: tuple[LocalContent | None, LocalContent | None] = (None, None)) -> tuple[Parsed, Parsed | None]:
    """Train (and eval) rows parsed and checked: the part of validation that runs before any tokenizer.
    ``local`` passes the content of files the caller already read (the cache probe), so none is read twice."""
    train = parse(data.path, data, local=local[0])
    return train, parse(data.eval_path, data, train.fmt, local=local[1]) if data.eval_path else None


def first_format(src: Source, data: DataConfig) -> str:
    if data.format != "auto":
        return data.format
    first = next(((w, r) for w, r in src.rows if isinstance(r, dict)), None)
    if first is None:
        raise DataError(f"{src.name}: no row is a JSON object; cannot detect the format")
    return detect_format(first[1], first[0], data.columns)


def _format_hint(src: Source, fmt: str, data: DataConfig) -> str:
    """When an explicit data.format does not match the rows, say which format they look like."""
    first = next((r for _, r in src.rows if isinstance(r, dict)), None)
    if data.format == "auto" or first is None:
        return ""
    try:
        seen = detect_format(first, src.name, data.columns)
    except DataError:
        return ""
    return f" (data.format is {fmt}, but the rows look like {seen}: set data.format={seen} or auto)" if seen != fmt else ""


def shown_lines(lines: list[str]) -> str:
    shown = lines[:MAX_LINES]
    return "\n".join(shown) + (f"\n... and {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else "")


def _position(problem: Problem) -> tuple[str, int]:
    """(file, line/row number) of a problem's ``where``, so problems are listed in file order."""
    m = re.search(r"^(.*?)(?::| item | row )(\d+)$", problem[0])
    return (m.group(1), int(m.group(2))) if m else (problem[0], 0)


def check_drops(problems: list[Problem], total: int, name: str, max_drop_fraction: float, log_them: bool = True,
                hint: str = "") -> None:
    """Fail when every row, or more than ``max_drop_fraction`` of them, is unusable."""
    bad = len(problems)
    if not bad:
        return
    problems.sort(key=_position)
    lines = [line for _, _, line in problems]
    if bad >= total:
        raise DataError(shown_lines(lines) + f"\n{name}: all {total} rows dropped; nothing to train on{hint}")
    if bad / total > max_drop_fraction:
        raise DataError(
            shown_lines(lines) + f"\n{name}: {bad} of {total} rows unusable, more than data.max_drop_fraction="
            f"{max_drop_fraction}; fix the rows above or raise data.max_drop_fraction{hint}"
        )
    for line in lines if log_them else []:
        log.warning("dropped row: %s", line)
