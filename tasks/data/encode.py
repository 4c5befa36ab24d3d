"""Encode: rendered segments -> ``input_ids`` and completion-only ``labels``, written to Arrow.

Labels are -100 everywhere except assistant turns and the EOS/end-of-turn token that closes each of
them. A row too long for ``data.max_length`` (or whose prompt alone fills it) becomes a problem of its
source, counted with the others by ``tasks/data/drops.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from qlora.config.schema import DataConfig
from qlora.template import Segment, adds_bos
from tasks.data.render import Item, Rendered

IGNORE_INDEX = -100
CHUNK_ROWS = 10_000  # rows per tokenizer call and Arrow record batch on the single-process path


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Ids without special tokens. The Rust backend's ``encode_batch_fast`` (no offsets) gives the same
    ids as ``tok(texts)`` at about half the cost, which is what lets the whole stage keep pace with a
    bare tokenizer call (bench/data.py)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- tokenizing


def encode(tok, segs_batch: list[list[Segment]], max_length: int, overlength: str = "truncate") -> dict[str, list]:
    """Tokenize many examples with ONE batched tokenizer call, then assemble ids and labels.

    Returns the model columns plus ``problem`` ('' when fine) and ``n_tokens`` (before truncation).
    """
    flat = [text for segs in segs_batch for text, _ in segs]
    ids_flat = token_ids(tok, flat)
    bos, eos = [tok.bos_token_id] if adds_bos(tok) else [], tok.eos_token_id  # prompts must match ``tok(prompt)`` at inference
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "problem": [], "n_tokens": []}
    i = 0
    for segs in segs_batch:
        lead = [] if bos and segs[0][0].startswith(tok.bos_token or "\x00") else bos  # template may add BOS itself
        ids, labels = list(lead), [IGNORE_INDEX] * len(lead)
        first_trained = None
        for _, trained in segs:
            piece = ids_flat[i]
            i += 1
            if trained:
                if not piece or piece[-1] != eos:  # chat templates often end a turn with EOS already
                    piece = piece + [eos]
                if first_trained is None:
                    first_trained = len(ids)
                labels += piece
            else:
                labels += [IGNORE_INDEX] * len(piece)
            ids += piece
        n = len(ids)
        problem = ""
        if n > max_length:
            if overlength == "truncate":
                if first_trained is None or first_trained >= max_length:
                    problem = f"prompt_too_long|the prompt alone is {first_trained} tokens and fills data.max_length={max_length}; no token left to train on"
                ids, labels = ids[:max_length], labels[:max_length]
            else:
                problem = f"too_long|{n} tokens is more than data.max_length={max_length} (data.overlength={overlength})"
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * len(ids))
        cols["labels"].append(labels)
        cols["problem"].append(problem)
        cols["n_tokens"].append(n)
    return cols


def _list_column(offsets, values):
    """A list<int> Arrow column from one flat numpy buffer and its row offsets: converting Python lists
    element by element was a third of the stage (bench/data.py)."""
    import pyarrow as pa

    return pa.LargeListArray.from_arrays(offsets, values).cast(pa.list_(pa.from_numpy_dtype(values.dtype)))


def _encoded_table(cols: dict[str, list]):
    """input_ids and labels share their row lengths, and the attention mask is all ones: one set of
    offsets serves the three list columns."""
    import numpy as np
    import pyarrow as pa

    ids, labels = cols["input_ids"], cols["labels"]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    n = int(offsets[-1])

    def flat(rows):
        return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=n)

    return pa.table({
        "input_ids": _list_column(offsets, flat(ids)),
        "attention_mask": _list_column(offsets, np.ones(n, dtype=np.int8)),
        "labels": _list_column(offsets, flat(labels)),
        "problem": pa.array(cols["problem"], pa.string()),
        "n_tokens": pa.array(cols["n_tokens"], pa.int32()),
    })


def _fresh_fingerprint() -> str:
    """A fingerprint for an in-memory Dataset, so ``datasets`` does not derive one by pickling the whole
    table (and, for ``map``, the function with its tokenizer) through dill. That costs time on large
    sets, and inside a Prefect task with ``log_prints`` it breaks: dill finds a function's globals by
    capturing ``dis.dis`` output from sys.stdout, Prefect's print patch sends that output to the task
    log instead (bytecode listings in the run log) and dill sees no globals. Nothing is cached by this
    fingerprint: the tokenized data is cached under our own content key (``tasks/tokenize.py``)."""
    from datasets.fingerprint import generate_random_fingerprint

    return generate_random_fingerprint()


def tokenize_items(items: list[Item], tok, data: DataConfig):
    """Tokenize the rendered items into a Dataset: batched tokenizer calls written straight to Arrow
    in one process, or a batched ``Dataset.map`` over ``data.num_proc`` workers for large sets."""
    import pyarrow as pa
    from datasets import Dataset, Features, List, Value

    workers = data.num_proc if data.num_proc > 1 and len(items) >= 2000 * data.num_proc else None
    if workers is None:
        tables = [
            _encoded_table(encode(tok, [it.segments for it in items[i:i + CHUNK_ROWS]], data.max_length, data.overlength))
            for i in range(0, len(items), CHUNK_ROWS)
        ]
        return Dataset(pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0], fingerprint=_fresh_fingerprint())

    # Declared narrow types: arrow writes them faster than inferred int64 (measured ~3% of the stage).
    features = Features(
        {
            "input_ids": List(Value("int32")), "attention_mask": List(Value("int8")), "labels": List(Value("int32")),
            "problem": Value("string"), "n_tokens": Value("int32"),
        }
    )
    ds = Dataset(pa.table({
        "texts": [[t for t, _ in it.segments] for it in items],
        "trained": [[b for _, b in it.segments] for it in items],
    }), fingerprint=_fresh_fingerprint())

    def _map(batch):
        return encode(tok, [list(zip(t, b)) for t, b in zip(batch["texts"], batch["trained"])], data.max_length, data.overlength)

    return ds.map(
        _map, batched=True, batch_size=1000, remove_columns=["texts", "trained"],
        num_proc=workers,
        features=features, load_from_cache_file=False, keep_in_memory=True, new_fingerprint=_fresh_fingerprint(),
    )


@dataclass
class Encoded:
    """One source tokenized: its rendered items (whose problems now include the token ones), the Dataset of
    every item (None when there is none) and the indices of the items that are usable."""

    rendered: Rendered
    ds: object | None
    keep: list[int]


def encode_rendered(rendered: Rendered, data: DataConfig, tok) -> Encoded:
    """Tokenize every rendered item; a row too long (or all prompt) joins the source's problems with its line."""
    ds = tokenize_items(rendered.items, tok, data) if rendered.items else None
    keep = []
    for i, p in enumerate(ds["problem"] if ds is not None else []):
        if not p:
            keep.append(i)
            continue
        reason, msg = p.split("|", 1)
        item = rendered.items[i]
        if reason == "too_long" and item.chars_cut:  # tokenized only up to the cap: say what is known
            msg = (f"{item.chars_cut:,} characters, more than data.max_length={data.max_length} tokens "
                   f"(data.overlength={data.overlength})")
        rendered.problems.append((item.where, reason, f"{item.where}: {msg}"))
    return Encoded(rendered, ds, keep)
