"""Drop accounting, once per source, after it is encoded: every step before it (read, parse, render,
encode) only carries its unusable rows along as problems.

A problem confined to one row is counted by reason and the row dropped; a row longer than
``data.max_length`` under ``data.overlength=error``, or too many dropped rows (more than
``data.max_drop_fraction``, or all of them), fail the run with the offending file:line list.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from qlora.config.schema import DataConfig
from qlora.errors import DataError
from tasks.data.read import Problem

if TYPE_CHECKING:
    from tasks.data.render import Rendered

log = logging.getLogger("qlora.tokenize")
MAX_LINES = 20  # problem lines shown in an error; the rest are counted


def account(rendered: Rendered, data: DataConfig) -> None:
    """Refuse the source, or log what is dropped and what was cut before tokenizing. ``rendered.problems`` (every
    step's, encode's included) is sorted into file order in place: the report lists them so."""
    problems, rows_read, name, hint, cap = rendered.problems, rendered.rows_read, rendered.name, rendered.hint, rendered.cap
    cut = list(dict.fromkeys(f"{it.where}: {it.chars_cut:,} characters in one text" for it in rendered.items if it.chars_cut))
    if cut:
        log.warning("%s\n%d rows hold a text longer than data.max_length=%d tokens can hold: only its first %s characters "
                    "were tokenized (data.overlength=%s)", shown_lines(cut), len(cut), data.max_length, f"{cap:,}", data.overlength)
    problems.sort(key=_position)
    lines = [line for _, _, line in problems]
    too_long = [line for _, reason, line in problems if reason == "too_long"]
    if too_long and data.overlength == "error":
        raise DataError(shown_lines(too_long) + f"\n{len(too_long)} rows longer than data.max_length={data.max_length}; "
                        "raise data.max_length or set data.overlength to truncate or drop")
    refuse(problems, rows_read, name, hint, data)
    for line in lines:
        log.warning("dropped row: %s", line)


def refuse(problems: list[Problem], rows_read: int, name: str, hint: str, data: DataConfig) -> None:
    """Refuse a source whose unusable rows are all of them, or more than ``data.max_drop_fraction``, listing
    them with their file:line. ``account`` runs it once per source after encoding; stage 1 also runs it on
    the parse problems alone when the tokenizer cannot load, so broken data is said before a broken model."""
    bad, lines = len(problems), [line for _, _, line in problems]
    if bad and bad >= rows_read:
        raise DataError(shown_lines(lines) + f"\n{name}: all {rows_read} rows dropped; nothing to train on{hint}")
    if bad and bad / rows_read > data.max_drop_fraction:
        raise DataError(
            shown_lines(lines) + f"\n{name}: {bad} of {rows_read} rows unusable, more than data.max_drop_fraction="
            f"{data.max_drop_fraction}; fix the rows above or raise data.max_drop_fraction{hint}"
        )


def shown_lines(lines: list[str]) -> str:
    shown = lines[:MAX_LINES]
    return "\n".join(shown) + (f"\n... and {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else "")


def _position(problem: Problem) -> tuple[str, int]:
    """(file, line/row number) of a problem's ``where``, so problems are listed in file order."""
    m = re.search(r"^(.*?)(?::| item | row )(\d+)$", problem[0])
    return (m.group(1), int(m.group(2))) if m else (problem[0], 0)
