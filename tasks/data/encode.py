"""Rows -> rendered template segments -> ``input_ids`` and completion-only ``labels``, written to Arrow.

Labels are -100 everywhere except assistant turns and the EOS/end-of-turn token that closes each of
them. ``prepare`` runs the whole data path in memory (validate, render, tokenize, split, report) and
writes nothing; ``tasks/tokenize.py`` caches its result.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field

from qlora.config.schema import DataConfig
from qlora.errors import DataError
from qlora.template import Segment, TemplateError, prompt_template_for, render_examples, template_kwargs
from tasks.data.formats import first_exchange
from tasks.data.report import DataReport
from tasks.data.validate import Parsed, Problem, check_drops, shown_lines, validate

log = logging.getLogger("qlora.tokenize")
IGNORE_INDEX = -100
CHUNK_ROWS = 10_000  # rows per tokenizer call and Arrow record batch on the single-process path


def _bos(tok) -> list[int]:
    """[bos] when the tokenizer adds one by itself (so prompts match ``tok(prompt)`` at inference)."""
    if tok.bos_token_id is None:
        return []
    return [tok.bos_token_id] if tok("a")["input_ids"][:1] == [tok.bos_token_id] else []


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Ids without special tokens. The Rust backend's ``encode_batch_fast`` (no offsets) gives the same
    ids as ``tok(texts)`` at about half the cost, which is what lets the whole stage keep pace with a
    bare tokenizer call (bench/data.py)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- rendering


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


@dataclass
class Rendered:
    fmt: str
    items: list[Item] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows_read: int = 0
    rows_expanded: int = 0  # conversations split into one example per assistant turn


def render_source(parsed: Parsed, data: DataConfig, tok) -> Rendered:
    """Render every parsed row with the template; problems so far are carried over. A row the template
    cannot render is dropped with its reason (``template_error``), like any other broken row."""
    out = Rendered(fmt=parsed.fmt, problems=list(parsed.problems), rows_read=parsed.rows_read)
    kwargs = template_kwargs(tok, data.chat_template, data.chat_template_kwargs)
    cap = char_cap(tok, data.max_length)
    for where, turns in parsed.rows:
        group = len(out.items)
        if isinstance(turns, str):
            turns, cut = _capped(turns, cap)
            prompt_turns, reference = first_exchange(turns)
            prompt = prompt_turns[0][1]
            out.items.append(Item(where, [(turns, True)], prompt, reference, prompt, True, group, cut))
            continue
        capped = [(role, *_capped(text, cap)) for role, text in turns]
        cut = max(c for _, _, c in capped)
        turns = [(role, text) for role, text, _ in capped]
        try:
            examples = render_examples(turns, tok, data.chat_template, kwargs)
        except TemplateError as e:
            out.problems.append((where, "template_error", f"{where}: {e}"))
            continue
        out.rows_expanded += len(examples) > 1
        for ex in examples:
            out.items.append(Item(where, ex.segments, ex.segments[0][0], turns[ex.answer_turn][1].strip(), ex.message,
                                  ex.standalone, group, cut))
    cut = list(dict.fromkeys(f"{it.where}: {it.chars_cut:,} characters in one text" for it in out.items if it.chars_cut))
    if cut:
        log.warning("%s\n%d rows hold a text longer than data.max_length=%d tokens can hold: only its first %s characters "
                    "were tokenized (data.overlength=%s)", shown_lines(cut), len(cut), data.max_length, f"{cap:,}", data.overlength)
    return out


# ---------------------------------------------------------------- tokenizing


def encode(tok, segs_batch: list[list[Segment]], max_length: int, overlength: str = "truncate") -> dict[str, list]:
    """Tokenize many examples with ONE batched tokenizer call, then assemble ids and labels.

    Returns the model columns plus ``problem`` ('' when fine) and ``n_tokens`` (before truncation).
    """
    flat = [text for segs in segs_batch for text, _ in segs]
    ids_flat = token_ids(tok, flat)
    bos, eos = _bos(tok), tok.eos_token_id
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


def _token_problems(ds, rendered: Rendered, data: DataConfig) -> list[int]:
    """Indices of rows that survive tokenization; the others become counted problems."""
    keep, errors = [], []
    for i, p in enumerate(ds["problem"]):
        if not p:
            keep.append(i)
            continue
        reason, msg = p.split("|", 1)
        if reason == "too_long" and rendered.items[i].chars_cut:  # tokenized only up to the cap: say what is known
            msg = (f"{rendered.items[i].chars_cut:,} characters, more than data.max_length={data.max_length} tokens "
                   f"(data.overlength={data.overlength})")
        line = f"{rendered.items[i].where}: {msg}"
        if reason == "too_long" and data.overlength == "error":
            errors.append(line)
        rendered.problems.append((rendered.items[i].where, reason, line))
    if errors:
        raise DataError(shown_lines(errors) + f"\n{len(errors)} rows longer than data.max_length={data.max_length}; "
                        "raise data.max_length or set data.overlength to truncate or drop")
    return keep


# ---------------------------------------------------------------- the whole data path, in memory


@dataclass
class Prepared:
    train: object  # datasets.Dataset
    eval: object
    report: DataReport
    prompt_template: str


def encode_source(parsed: Parsed, data: DataConfig, tok) -> tuple[Rendered, object, list[int]]:
    """One source rendered and tokenized: (rendered rows with their problems, Dataset, usable row indices)."""
    rendered = render_source(parsed, data, tok)
    ds = tokenize_items(rendered.items, tok, data) if rendered.items else None
    keep = _token_problems(ds, rendered, data) if ds is not None else []
    check_drops(rendered.problems, rendered.rows_read, parsed.src.name, data.max_drop_fraction)
    return rendered, ds, keep


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


def select_rows(items: list[Item], ds, keep: list[int], with_text: bool):
    ds = ds.select(keep).remove_columns(["problem"])
    ds = ds.rename_column("n_tokens", "n_tokens_full")
    if with_text:  # what generation eval scores, and what the consumer check sends (message) for the same prompt
        for col in ("prompt", "reference", "message", "standalone"):
            ds = ds.add_column(col, [getattr(items[i], col) for i in keep])
    return ds


def prepare(data: DataConfig, tok, parsed: tuple[Parsed, Parsed | None] | None = None) -> Prepared:
    """Read, validate, render and tokenize ``data`` (train and eval splits) plus the report; writes nothing."""
    tparsed, eparsed = parsed or validate(data)
    train_r, train_ds, train_idx = encode_source(tparsed, data, tok)
    if eparsed is None:  # hold out part of the training source
        train_idx, eval_idx = hold_out(train_idx, train_r.items, data, tparsed.src.name)
        eval_r, eval_ds, problems, rows_read = train_r, train_ds, train_r.problems, train_r.rows_read
    else:
        eval_r, eval_ds, eval_idx = encode_source(eparsed, data, tok)
        problems, rows_read = train_r.problems + eval_r.problems, train_r.rows_read + eval_r.rows_read
    train = select_rows(train_r.items, train_ds, train_idx, with_text=False)
    evals = select_rows(eval_r.items, eval_ds, eval_idx, with_text=True)
    expanded = train_r.rows_expanded + (eval_r.rows_expanded if eparsed is not None else 0)
    report = DataReport.build(tparsed.src.name, tparsed.fmt, data, rows_read, problems, train, evals,
                              [train_r.items[i] for i in train_idx], [eval_r.items[i] for i in eval_idx], tok, expanded)
    train, evals = train.remove_columns(["n_tokens_full"]), evals.remove_columns(["n_tokens_full"])
    kwargs = template_kwargs(tok, data.chat_template, data.chat_template_kwargs)
    template = prompt_template_for(tok, data.chat_template, kwargs) if tparsed.fmt != "text" else "{prompt}"
    return Prepared(train, evals, report, template)
