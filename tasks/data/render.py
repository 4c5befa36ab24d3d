"""Render: parsed turns -> template segments, (text, trained?) per piece, with each example's eval prompt.

The template is the tokenizer's chat template, else ``data.chat_template``, else the built-in one
(``qlora.template``), with ``data.chat_template_kwargs``; the consumer's prompt template is rendered
here too, by the same function and with the same kwargs, so what is registered is what was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from qlora.config.schema import DataConfig
from qlora.refs import ChatContract
from qlora.template import Segment, TemplateError, chat_template_of, prompt_template_for, render_examples, template_kwargs
from tasks.data.parse import Parsed
from tasks.data.read import Problem


@dataclass
class Item:
    where: str
    segments: list[Segment]
    prompt: str  # rendered prompt up to the answer scored by generation eval
    reference: str  # that answer
    message: str = ""  # the user message a consumer sends for it (the logged prompt template makes the prompt)
    standalone: bool = True  # ``prompt`` is what a consumer gets for ``message`` alone (no history, no system turn)
    group: int = -1  # index of the row's first item: a row split into several examples stays in one split
    chars_cut: int = 0  # length of the longest text cut to the character cap before tokenizing, else 0
    conversation: str = ""  # JSON [{role, content}, ...]: the turns before the scored answer, as a chat consumer sends them
    system: str | None = None  # the row's system prompt (None: it has none; plain text rows: None)


@dataclass
class Rendered:
    """One source rendered: its items, every problem so far, and what the drop accounting needs."""

    name: str
    fmt: str
    prompt_template: str  # what a consumer's message becomes ("{prompt}" for plain text)
    cap: int  # characters of one text kept before tokenizing (``char_cap``)
    hint: str = ""  # carried from parse for the drop accounting
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0
    rows_expanded: int = 0  # conversations split into one example per assistant turn
    chat_template: str | None = None  # the template that rendered the rows: the tokenizer's, else data.chat_template
    kwargs: dict = field(default_factory=dict)  # the chat template kwargs it was rendered with


def char_cap(tok, max_length: int) -> int:
    """Characters of one text that can matter for ``max_length`` tokens: beyond them a row is too long for sure.

    No token covers more characters than the longest string in the vocabulary (byte-level BPE spells each
    byte as one character, so it over-counts multi-byte characters: still a bound), hence a text longer than
    ``max_length * longest`` has more than ``max_length`` tokens. Cutting there before tokenizing keeps every
    token that truncation keeps; the factor 2 leaves room for normalizers that drop characters and for BPE
    merges across the cut. Without the cap, one 50 MB row was tokenized whole: 5 GB of memory here, 15.5 GB
    with the reporter's tokenizer (issue 13, item 1).
    """
    longest = max((len(t) for t in tok.get_vocab()), default=1)
    return 2 * max_length * max(longest, 1) + 64


def _capped(text: str, cap: int) -> tuple[str, int]:
    return (text, 0) if len(text) <= cap else (text[:cap], len(text))


def _cap_row(turns, cap: int):
    """(turns or text cut to ``cap`` characters, the longest cut text's length or 0)."""
    if isinstance(turns, str):
        return _capped(turns, cap)
    capped = [(role, *_capped(text, cap)) for role, text in turns]
    return [(role, text) for role, text, _ in capped], max(c for _, _, c in capped)


def _text_halves(text: str) -> tuple[str, str]:
    """Plain text's eval prompt and reference: continue the second half from the first, split at a space."""
    cut = text.rfind(" ", 0, max(1, len(text) // 2))
    cut = cut if cut > 0 else len(text) // 2
    return text[:cut], text[cut:]


def render(parsed: Parsed, data: DataConfig, tok) -> Rendered:
    """Render every parsed row with the template; problems so far are carried over. A row the template
    cannot render is dropped with its reason (``template_error``), like any other broken row."""
    cap = char_cap(tok, data.max_length)
    rows = [(where, *_cap_row(turns, cap)) for where, turns in parsed.rows]
    halves = [_text_halves(turns) if isinstance(turns, str) else None for _, turns, _ in rows]  # plain text's eval prompt
    kwargs = template_kwargs(tok, data.chat_template, data.chat_template_kwargs)
    template = "{prompt}" if parsed.fmt == "text" else prompt_template_for(tok, data.chat_template, kwargs)
    out = Rendered(name=parsed.src.name, fmt=parsed.fmt, prompt_template=template, cap=cap, hint=parsed.hint,
                   problems=list(parsed.problems), rows_read=parsed.rows_read,
                   chat_template=chat_template_of(tok, data.chat_template), kwargs=kwargs)
    for (where, turns, cut), half in zip(rows, halves):
        group = len(out.items)
        if half is not None:
            prompt, reference = half
            out.items.append(Item(where, [(turns, True)], prompt, reference, prompt, True, group, cut))
            continue
        try:
            examples = render_examples(turns, tok, data.chat_template, kwargs)
        except TemplateError as e:
            out.problems.append((where, "template_error", f"{where}: {e}"))
            continue
        out.rows_expanded += len(examples) > 1
        system = turns[0][1] if turns[0][0] == "system" else None
        for ex in examples:
            sent = json.dumps([{"role": r, "content": c} for r, c in turns[: ex.answer_turn]], ensure_ascii=False)
            out.items.append(Item(where, ex.segments, ex.prompt, turns[ex.answer_turn][1].strip(), ex.message,
                                  ex.standalone, group, cut, sent, system))
    return out


def chat_contract(rendered: list[Rendered], data: DataConfig, tok) -> ChatContract | None:
    """The consumer contract of what was rendered: conversations when the rows were chat data (``messages``,
    ``sharegpt``) or a chat template rendered them; None (bare prompts through the prompt template) for
    instruction data on the built-in template, as the demo. The system prompt a consumer gets by default is
    the one every row had; when rows differ (another prompt, or none) no default is applied. The template and
    its kwargs are those ``render`` used (every source is rendered by the same tokenizer and data section)."""
    formats = {r.fmt for r in rendered} - {"text"}
    if not formats or (rendered[0].chat_template is None and not formats & {"messages", "sharegpt"}):
        return None
    rows = {(r.name, i.group): i.system for r in rendered if r.fmt != "text" for i in r.items}
    systems = {s for s in rows.values() if s is not None}
    without = sum(s is None for s in rows.values())
    return ChatContract(chat_template=None if getattr(tok, "chat_template", None) else data.chat_template,
                        kwargs=dict(rendered[0].kwargs),
                        system=next(iter(systems)) if len(systems) == 1 and not without else None,
                        systems=len(systems), rows_without_system=without if systems else 0)
