"""Split and draw: which usable rows of a source are held out for eval, and which (how often) are trained.

Everything is seeded by ``data.seed``, so the same files and config give the same rows (and the same
content key). The training draw of a mixture (``data.sources``):

- the mixture has N = the sources' usable training rows together (mixing changes proportions, not size);
- source i contributes round(weight_i * N) rows (largest remainder, so they add up to N exactly);
- a source with more rows than that is subsampled without replacement; one with fewer gives every row
  once and the rest as seeded draws with replacement (reported as ``repeated_rows``).

A single ``data.path`` is a mixture of one at weight 1: it draws every training row once, in order.
"""

from __future__ import annotations

import random

from qlora.config.schema import DataConfig
from qlora.errors import DataError
from tasks.data.render import Item


def hold_out(keep: list[int], items: list[Item], data: DataConfig, name: str) -> tuple[list[int], list[int]]:
    """Seeded hold-out of ``data.eval_fraction`` of the usable rows: (train indices, eval indices). A row
    split into one example per assistant turn is held out whole: its later examples contain the earlier
    answers as history, which must not be trained on while the eval scores them."""
    groups = list(dict.fromkeys(items[i].group for i in keep))  # rows, in order (a row's first item index)
    random.Random(data.seed).shuffle(groups)
    n_eval = max(1, round(len(groups) * data.eval_fraction))
    if n_eval >= len(groups):
        raise DataError(f"{name}: {len(groups)} usable rows leave nothing to train on with data.eval_fraction={data.eval_fraction}")
    held = set(groups[:n_eval])
    return [i for i in keep if items[i].group not in held], [i for i in keep if items[i].group in held]


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


def select_rows(items: list[Item], ds, keep: list[int], with_text: bool):
    """The chosen rows as a Dataset; eval rows also carry what generation eval scores and the consumer check sends."""
    ds = ds.select(keep).remove_columns(["problem"])
    ds = ds.rename_column("n_tokens", "n_tokens_full")
    if with_text:  # what generation eval scores, and what the consumer check sends (message) for the same prompt
        for col in ("prompt", "reference", "message", "standalone", "conversation"):
            ds = ds.add_column(col, [getattr(items[i], col) for i in keep])
    return ds
