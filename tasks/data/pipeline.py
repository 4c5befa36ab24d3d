"""The data path of stage 1, straight through: read -> parse -> render -> encode -> drops -> split -> mix -> report.

A dataset is a mixture of sources (``data.sources``), each in its own format, mixed by weight; a single
``data.path`` is a mixture of one at weight 1, so both end the same way, with one report. Every source
is read, parsed, rendered and encoded on its own, so its drops are counted and held against
``data.max_drop_fraction`` per source, with its own file:line reasons. Each source then holds out
``data.eval_fraction`` of its usable rows for the eval split (unless ``data.eval_path`` is given), and
the training rows are drawn by weight (``tasks/data/split.py``). Plain functions: no model, no Prefect;
``tasks/tokenize.py`` caches what ``prepare_data`` returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from qlora.config.schema import DataConfig
from qlora.refs import ChatContract
from tasks.data.drops import account
from tasks.data.encode import encode_rendered
from tasks.data.parse import Parsed, parse
from tasks.data.read import LocalContent, read_source
from tasks.data.render import chat_contract, render
from tasks.data.report import DataReport, SourceStats
from tasks.data.split import draw, hold_out, select_rows, shares


@dataclass
class Inputs:
    """Every source read and parsed (no tokenizer yet), in data.sources order, plus the optional eval file."""

    sources: list[Parsed]
    eval: Parsed | None = None


@dataclass
class Prepared:
    train: object  # datasets.Dataset
    eval: object
    report: DataReport
    prompt_template: str
    chat: ChatContract | None = None  # what consumers send: conversations (chat data or template), else bare prompts


def source_views(data: DataConfig) -> list[tuple[DataConfig, float]]:
    """(the data section as one source sees it, its weight): its path, format, columns and split; shared rules
    otherwise. ``data.path`` is the one source of weight 1, seen as the data section itself."""
    if not data.sources:
        return [(data, 1.0)]
    return [(data.model_copy(update={"path": s.path, "format": s.format, "columns": s.columns, "split": s.split,
                                     "subset": s.subset, "revision": s.revision, "sources": []}), s.weight)
            for s in data.sources]


def validate_data(data: DataConfig, local: tuple[list[LocalContent | None], LocalContent | None] | None = None) -> Inputs:
    """Read and parse every input: structure only, before any tokenizer. ``local``: contents the caller already
    read (``tasks.data.read.local_inputs``), so no file is read twice."""
    views = [v for v, _ in source_views(data)]
    train_local, eval_local = local if local is not None else ([None] * len(views), None)
    inputs = list(zip(views, train_local))
    if data.eval_path:  # read with the shared rules; one source's eval file has that source's format
        inputs.append((data.model_copy(update={"path": data.eval_path, "sources": []}), eval_local))
    parsed: list[Parsed] = []
    for view, lc in inputs:
        src = read_source(view.path, view.split, view.subset, view.revision, lc)
        parsed.append(parse(src, view, parsed[0].fmt if parsed and not data.sources else None))
    return Inputs(parsed[:len(views)], parsed[len(views)] if data.eval_path else None)


def prepare_data(data: DataConfig, tok, inputs: Inputs | None = None, local=None) -> Prepared:
    """Render, encode, account, split, mix and report every input (read and parsed here unless ``inputs`` are
    given; ``local`` as for ``validate_data``); writes nothing."""
    from datasets import concatenate_datasets

    inputs = inputs or validate_data(data, local)
    views = source_views(data)
    encoded = []
    for (view, _), parsed in zip(views + [(data, 1.0)], inputs.sources + [inputs.eval] * bool(inputs.eval)):
        enc = encode_rendered(render(parsed, view, tok), view, tok)
        account(enc.rendered, view)  # every drop of this source, once: before anything is split or mixed
        encoded.append(enc)
    sources, extra = encoded[:len(views)], encoded[len(views):]  # extra: the data.eval_path file, if any

    held = [hold_out(e.keep, e.rendered.items, v, e.rendered.name) if not extra else (e.keep, [])
            for e, (v, _) in zip(sources, views)]
    wanted = shares([w for _, w in views], sum(len(t) for t, _ in held))
    # One stream per source, so adding a source does not reshuffle the others' draws.
    drawn = [draw(t, n, random.Random(f"{data.seed}/{i}")) for i, ((t, _), n) in enumerate(zip(held, wanted))]
    eval_parts = [(e, e.keep) for e in extra] or [(e, ev) for e, (_, ev) in zip(sources, held) if ev]
    train_items = [e.rendered.items[j] for e, (chosen, _) in zip(sources, drawn) for j in chosen]
    eval_items = [e.rendered.items[j] for e, idx in eval_parts for j in idx]
    train = concatenate_datasets([select_rows(e.rendered.items, e.ds, c, with_text=False) for e, (c, _) in zip(sources, drawn)])
    evaluation = concatenate_datasets([select_rows(e.rendered.items, e.ds, idx, with_text=True) for e, idx in eval_parts])
    if data.sources:
        # Sources were appended one after another; evaluation reads the first eval.max_samples rows, which
        # must be a mix too, not the first source alone.
        order = list(range(len(evaluation)))
        random.Random(data.seed).shuffle(order)
        evaluation, eval_items = evaluation.select(order), [eval_items[k] for k in order]

    stats = [SourceStats(
        path=e.rendered.name, format=e.rendered.fmt, weight=w, digest=p.src.digest, rows_read=e.rendered.rows_read,
        rows_dropped=len(e.rendered.problems), train_rows_available=len(t), rows_used=len(c), repeated_rows=r,
        eval_rows=len(ev)) for e, (_, w), p, (t, ev), (c, r) in zip(sources, views, inputs.sources, held, drawn)]
    name = " + ".join(f"{s.path} ({s.weight:g})" for s in stats)
    report = DataReport.build(
        f"mixture of {name}" if data.sources else stats[0].path, "+".join(dict.fromkeys(s.format for s in stats)), data,
        sum(e.rendered.rows_read for e in encoded), [p for e in encoded for p in e.rendered.problems], train, evaluation,
        train_items, eval_items, tok, sum(e.rendered.rows_expanded for e in encoded),
        sources=stats if data.sources else [])
    template = next((e.rendered.prompt_template for e in sources if e.rendered.fmt != "text"), "{prompt}")
    chat = chat_contract([e.rendered for e in encoded], data, tok)
    return Prepared(train.remove_columns(["n_tokens_full"]), evaluation.remove_columns(["n_tokens_full"]), report, template,
                    chat)
