"""The data report: what was dropped and why, how long examples are, how much of them is trained.

Logged to MLflow (metrics ``data/*``, ``data/report.md``), shown as a Prefect artifact and printed
by ``qlora validate-data``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from pydantic import BaseModel

N_EXAMPLES = 3
N_PROBLEM_LINES = 20
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # marks trained text in rendered examples


def _pct(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    return sorted_vals[min(len(sorted_vals) - 1, int(q * (len(sorted_vals) - 1) + 0.5))]


def _key(segments) -> str:
    return hashlib.sha256(json.dumps(segments).encode()).hexdigest()


class SourceStats(BaseModel):
    """One source of a mixture (data.sources): what was read, dropped, held out, and used for training."""

    path: str
    format: str
    weight: float  # configured share of the mixed training rows
    digest: str  # content hash the cache key covers
    rows_read: int
    rows_dropped: int
    train_rows_available: int  # usable rows left for training after the eval hold-out
    rows_used: int  # rows of this source in the mixed training split (repeats included)
    repeated_rows: int  # draws with replacement beyond each row once (weight asked for more than it has)
    eval_rows: int


class DataReport(BaseModel):
    source: str
    format: str
    rows_read: int
    rows_dropped: int
    dropped_by_reason: dict[str, int]
    problem_lines: list[str]  # first N_PROBLEM_LINES, one per dropped row
    train_rows: int  # examples: a conversation split per assistant turn counts once per turn
    eval_rows: int
    rows_expanded: int = 0  # conversations split into one example per assistant turn (template not prefix-stable)
    truncated_rows: int
    max_length: int
    duplicate_rows: int  # rows identical to an earlier row (kept; reported)
    train_eval_overlap: int  # eval rows identical to a training row
    token_length: dict[str, int]  # p50/p90/p99/max of tokens per example, after truncation
    trainable_token_share: float  # trained (label != -100) tokens / all tokens
    examples: list[str]
    sources: list[SourceStats] = []  # a mixture's sources, in data.sources order; empty for data.path

    @classmethod
    def build(cls, source, fmt, data, rows_read, problems, train, evals, train_items, eval_items, tok,
              rows_expanded: int = 0, sources: list[SourceStats] = ()) -> "DataReport":
        lengths = sorted([len(x) for x in train["input_ids"]] + [len(x) for x in evals["input_ids"]])
        trained = total = 0
        for split in (train, evals):
            for labels in split["labels"]:
                total += len(labels)
                trained += sum(1 for t in labels if t != -100)
        full = list(train["n_tokens_full"]) + list(evals["n_tokens_full"])
        keys = [_key(it.segments) for it in train_items]
        seen = Counter(keys)
        eval_keys = [_key(it.segments) for it in eval_items]
        duplicates = sum(c - 1 for c in Counter(keys + eval_keys).values())
        examples = []
        for it in train_items[:N_EXAMPLES]:
            examples.append("".join(f"{TRAINED_OPEN}{t}{TRAINED_CLOSE}" if b else t for t, b in it.segments))
        return cls(
            source=source, format=fmt, rows_read=rows_read, rows_dropped=len(problems),
            dropped_by_reason=dict(Counter(reason for _, reason, _ in problems)),
            problem_lines=[line for _, _, line in problems[:N_PROBLEM_LINES]],
            train_rows=len(train), eval_rows=len(evals), rows_expanded=rows_expanded,
            truncated_rows=sum(1 for n in full if n > data.max_length), max_length=data.max_length,
            duplicate_rows=duplicates, train_eval_overlap=sum(1 for k in eval_keys if k in seen),
            token_length={"p50": _pct(lengths, 0.5), "p90": _pct(lengths, 0.9), "p99": _pct(lengths, 0.99), "max": lengths[-1] if lengths else 0},
            trainable_token_share=round(trained / max(total, 1), 4), examples=examples, sources=list(sources),
        )

    def metrics(self) -> dict[str, float]:
        m = {
            "data/rows_read": self.rows_read, "data/rows_dropped": self.rows_dropped, "data/train_rows": self.train_rows,
            "data/eval_rows": self.eval_rows, "data/rows_expanded": self.rows_expanded, "data/truncated_rows": self.truncated_rows,
            "data/duplicate_rows": self.duplicate_rows, "data/train_eval_overlap": self.train_eval_overlap,
            "data/trainable_token_share": self.trainable_token_share,
        }
        m.update({f"data/tokens_{k}": v for k, v in self.token_length.items()})
        m.update({f"data/dropped/{k}": v for k, v in self.dropped_by_reason.items()})
        for i, src in enumerate(self.sources):
            m.update({f"data/source/{i}/{k}": getattr(src, k) for k in (
                "weight", "rows_read", "rows_dropped", "train_rows_available", "rows_used", "repeated_rows", "eval_rows")})
        return {k: float(v) for k, v in m.items()}

    def markdown(self) -> str:
        lines = [
            f"# Data report: {self.source}",
            "",
            f"Format **{self.format}**; {self.rows_read} rows read, {self.rows_dropped} dropped, "
            f"{self.train_rows} train / {self.eval_rows} eval examples.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| conversations split into one example per assistant turn | {self.rows_expanded} |",
            f"| truncated to max_length={self.max_length} | {self.truncated_rows} |",
            f"| exact duplicate rows | {self.duplicate_rows} |",
            f"| eval rows also in train | {self.train_eval_overlap} |",
            f"| tokens per example p50 / p90 / p99 / max | {self.token_length['p50']} / {self.token_length['p90']} / "
            f"{self.token_length['p99']} / {self.token_length['max']} |",
            f"| trainable-token share | {self.trainable_token_share:.3f} |",
        ]
        if self.sources:
            used = sum(src.rows_used for src in self.sources) or 1
            lines += ["", "## Sources (mixed by weight)", "",
                      "| # | source | format | weight | share used | rows read | dropped | train available | used | repeated | eval |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {i} | {src.path} | {src.format} | {src.weight:g} | {src.rows_used / used:.3f} | {src.rows_read} | "
                      f"{src.rows_dropped} | {src.train_rows_available} | {src.rows_used} | {src.repeated_rows} | {src.eval_rows} |"
                      for i, src in enumerate(self.sources)]
        if self.dropped_by_reason:
            lines += ["", "## Dropped rows by reason", "", "| reason | rows |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(self.dropped_by_reason.items())]
            lines += ["", "```", *self.problem_lines, "```"]
        lines += ["", f"## Rendered examples (trained text in {TRAINED_OPEN}...{TRAINED_CLOSE})", ""]
        for ex in self.examples:
            lines += ["```", ex, "```", ""]
        return "\n".join(lines)
