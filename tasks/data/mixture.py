"""Dataset mixtures (``data.sources``): several sources, each in its own format, mixed by weight.

Every source goes through the single-source path on its own (read, validate, render, tokenize), so
its drops are counted and held against ``data.max_drop_fraction`` per source, with its own file:line
reasons. Each source then holds out ``data.eval_fraction`` of its usable rows for the eval split
(unless ``data.eval_path`` is given), and the training rows are drawn by weight:

- the mixture has N = the sources' usable training rows together (mixing changes proportions, not size);
- source i contributes round(weight_i * N) rows (largest remainder, so they add up to N exactly);
- a source with more rows than that is subsampled without replacement; one with fewer gives every row
  once and the rest as seeded draws with replacement (reported as ``repeated_rows``).

Everything is seeded by ``data.seed``, so the same files and config give the same mixture (and the same
content key). ``validate_data`` / ``prepare_data`` dispatch between one source and a mixture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from qlora.config.schema import DataConfig, DataSource, stable_hash
from qlora.template import prompt_template_for
from tasks.data.encode import Prepared, encode_source, hold_out, prepare, select_rows
from tasks.data.report import DataReport, SourceStats
from tasks.data.sources import LocalContent
from tasks.data.validate import Parsed, parse, validate


@dataclass
class MixParsed:
    """Every source parsed and checked for structure (no tokenizer yet), plus the optional eval file."""

    sources: list[Parsed]
    eval: Parsed | None = None


def source_view(data: DataConfig, src: DataSource) -> DataConfig:
    """The data section as one source sees it: its path, format, columns and split; shared rules otherwise."""
    return data.model_copy(update={"path": src.path, "format": src.format, "columns": src.columns, "split": src.split,
                                   "subset": src.subset, "revision": src.revision, "sources": []})


def validate_data(data: DataConfig, local: tuple[list[LocalContent | None], LocalContent | None] | None = None):
    """Structure checks before any tokenizer: (train Parsed, eval Parsed | None) for data.path, MixParsed for a
    mixture. ``local``: contents the caller already read (one per source, and the eval file)."""
    train_local, eval_local = local if local is not None else ([None] * max(1, len(data.sources)), None)
    if not data.sources:
        return validate(data, (train_local[0], eval_local))
    parsed = [parse(s.path, source_view(data, s), local=lc) for s, lc in zip(data.sources, train_local)]
    return MixParsed(parsed, parse(data.eval_path, data, local=eval_local) if data.eval_path else None)


def parsed_digests(data: DataConfig, parsed) -> tuple[str, str]:
    """(train content, eval content) for the cache key, from what ``validate_data`` returned."""
    if not data.sources:
        return parsed[0].src.digest, parsed[1].src.digest if parsed[1] else ""
    return mixture_digest(data, [p.src.digest for p in parsed.sources]), parsed.eval.src.digest if parsed.eval else ""


def mixture_digest(data: DataConfig, digests: list[str]) -> str:
    """Every source's content and how it is read and weighted; not its path (a moved file is the same data)."""
    return "mix:" + stable_hash([{"content": d, **s.model_dump(exclude={"path"})} for s, d in zip(data.sources, digests)])


def prepare_data(data: DataConfig, tok, parsed=None) -> Prepared:
    return prepare_mixture(data, tok, parsed) if data.sources else prepare(data, tok, parsed)


def shares(weights: list[float], total: int) -> list[int]:
    """Rows per source: weight * total, rounded by largest remainder so the counts add up to ``total``."""
    raw = [w * total for w in weights]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: list[int], want: int, rng: random.Random) -> tuple[list[int], int]:
    """``want`` of ``rows``: a seeded subsample, or every row once plus draws with replacement; (rows, repeats)."""
    if want <= len(rows):
        return sorted(rng.sample(rows, want)), 0
    return rows + rng.choices(rows, k=want - len(rows)), want - len(rows)


def prepare_mixture(data: DataConfig, tok, parsed: MixParsed | None = None) -> Prepared:
    """Tokenize every source, hold out each one's eval rows, draw the training rows by weight; writes nothing."""
    from datasets import concatenate_datasets

    parsed = parsed or validate_data(data)
    encoded = []
    for src, p in zip(data.sources, parsed.sources):
        view = source_view(data, src)
        rendered, ds, keep = encode_source(p, view, tok)
        train_idx, eval_idx = hold_out(keep, rendered.items, view, p.src.name) if parsed.eval is None else (keep, [])
        encoded.append((rendered, ds, train_idx, eval_idx))
    wanted = shares([s.weight for s in data.sources], sum(len(e[2]) for e in encoded))

    trains, evals, train_items, eval_items, stats = [], [], [], [], []
    problems, rows_read = [], 0
    for i, (src, p, (rendered, ds, train_idx, eval_idx)) in enumerate(zip(data.sources, parsed.sources, encoded)):
        # One stream per source, so adding a source does not reshuffle the others' draws.
        chosen, repeated = draw(train_idx, wanted[i], random.Random(f"{data.seed}/{i}"))
        trains.append(select_rows(rendered.items, ds, chosen, with_text=False))
        train_items += [rendered.items[j] for j in chosen]
        if eval_idx:
            evals.append(select_rows(rendered.items, ds, eval_idx, with_text=True))
            eval_items += [rendered.items[j] for j in eval_idx]
        problems += rendered.problems
        rows_read += rendered.rows_read
        stats.append(SourceStats(
            path=p.src.name, format=p.fmt, weight=src.weight, digest=p.src.digest, rows_read=rendered.rows_read,
            rows_dropped=len(rendered.problems), train_rows_available=len(train_idx), rows_used=len(chosen),
            repeated_rows=repeated, eval_rows=len(eval_idx)))
    if parsed.eval is not None:
        rendered, ds, keep = encode_source(parsed.eval, data, tok)
        evals, eval_items = [select_rows(rendered.items, ds, keep, with_text=True)], [rendered.items[j] for j in keep]
        problems += rendered.problems
        rows_read += rendered.rows_read

    train, evaluation = concatenate_datasets(trains), concatenate_datasets(evals)
    # Sources were appended one after another; evaluation reads the first eval.max_samples rows, which
    # must be a mix too, not the first source alone.
    order = list(range(len(evaluation)))
    random.Random(data.seed).shuffle(order)
    evaluation, eval_items = evaluation.select(order), [eval_items[k] for k in order]

    name = " + ".join(f"{s.path} ({s.weight:g})" for s in stats)
    fmt = "+".join(dict.fromkeys(s.format for s in stats))
    report = DataReport.build(f"mixture of {name}", fmt, data, rows_read, problems, train, evaluation,
                              train_items, eval_items, tok)
    report.sources = stats
    train, evaluation = train.remove_columns(["n_tokens_full"]), evaluation.remove_columns(["n_tokens_full"])
    template = "{prompt}" if all(s.format == "text" for s in stats) else prompt_template_for(tok, data.chat_template)
    return Prepared(train, evaluation, report, template)
