"""Stage 1: read and validate the dataset, render it with the one template, tokenize with
completion-only labels, and cache the result under a key made from content.

Order matters: everything here runs on CPU with the tokenizer only, before any model is loaded,
so bad data fails in seconds instead of after a GPU was allocated. Labels are -100 everywhere
except assistant turns and the EOS/end-of-turn token that closes each of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qlora.config import DataConfig, ModelConfig, stable_hash
from qlora.errors import DataError
from qlora.refs import MlflowRun, TokenizedData
from qlora.template import PROMPT_TEMPLATE, Segment, Turn, TemplateError, chat_template_of, prompt_template_for, render_turns
from tasks.data_formats import RowProblem, detect_format, first_exchange, row_turns
from tasks.data_report import DataReport
from tasks.data_sources import Source, local_digest, read_source

log = logging.getLogger("qlora.tokenize")
IGNORE_INDEX = -100
MAX_LINES = 20  # problem lines shown in an error; the rest are counted


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    from qlora.secrets import hf_token

    tok = AutoTokenizer.from_pretrained(
        model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code, token=hf_token(model)
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    body += str(tok.all_special_tokens) + str(getattr(tok, "chat_template", None))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


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
    prompt: str  # rendered prompt up to the first answer (generation eval)
    reference: str  # the first answer


@dataclass
class Rendered:
    fmt: str
    items: list[Item] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (where, reason, line)
    rows_read: int = 0


@dataclass
class Parsed:
    """Rows checked for structure (fields, types, roles): everything that needs no tokenizer."""

    src: Source
    fmt: str
    rows: list[tuple[str, list[Turn] | str]] = field(default_factory=list)  # (where, turns or plain text)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    rows_read: int = 0


def parse(path: str, data: DataConfig, fmt: str | None = None) -> Parsed:
    """Read ``path`` and check every row's structure; fails when too many rows are already unusable."""
    src = read_source(path, data.split, data.subset, data.revision)
    fmt = fmt or _first_format(src, data)
    out = Parsed(src=src, fmt=fmt, problems=list(src.problems), rows_read=len(src.rows) + len(src.problems))
    for where, row in src.rows:
        try:
            out.rows.append((where, row_turns(row, fmt, where, data.columns)))
        except RowProblem as e:
            out.problems.append((e.where, e.reason, str(e)))
    check_drops(out.problems, out.rows_read, src.name, data.max_drop_fraction, log_them=False, hint=_format_hint(src, fmt, data))
    return out


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


def validate(data: DataConfig) -> tuple[Parsed, Parsed | None]:
    """Train (and eval) rows parsed and checked: the part of validation that runs before any tokenizer."""
    train = parse(data.path, data)
    return train, parse(data.eval_path, data, train.fmt) if data.eval_path else None


def render_source(parsed: Parsed, data: DataConfig, tok) -> Rendered:
    """Render every parsed row with the template; problems so far are carried over."""
    out = Rendered(fmt=parsed.fmt, problems=list(parsed.problems), rows_read=parsed.rows_read)
    for where, turns in parsed.rows:
        if isinstance(turns, str):
            prompt_turns, reference = first_exchange(turns)
            out.items.append(Item(where, [(turns, True)], prompt_turns[0][1], reference))
            continue
        try:
            segs = render_turns(turns, tok, data.chat_template)
        except TemplateError as e:
            raise DataError(f"{where}: {e}") from None
        _, reference = first_exchange(turns)
        out.items.append(Item(where, segs, segs[0][0], reference))
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


CHUNK_ROWS = 10_000  # rows per tokenizer call and Arrow record batch on the single-process path


def _list_column(offsets, values):
    """A list<int> Arrow column from one flat numpy buffer and its row offsets: converting Python lists
    element by element was a third of the stage (bench/data.py)."""
    import pyarrow as pa

    return pa.LargeListArray.from_arrays(offsets, values).cast(pa.list_(pa.from_numpy_dtype(values.dtype)))


def _encoded_table(cols: dict[str, list]):
    """input_ids and labels share their row lengths, and the attention mask is all ones: one set of
    offsets serves the three list columns."""
    import itertools

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
    fingerprint: the tokenized data is cached under our own content key (``tokenize_dataset``)."""
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


def _collect_token_problems(ds, items: list[Item], rendered: Rendered, data: DataConfig) -> list[int]:
    """Indices of rows that survive tokenization; the others become counted problems."""
    keep = []
    errors = []
    for i, p in enumerate(ds["problem"]):
        if not p:
            keep.append(i)
            continue
        reason, msg = p.split("|", 1)
        line = f"{items[i].where}: {msg}"
        if reason == "too_long" and data.overlength == "error":
            errors.append(line)
        rendered.problems.append((items[i].where, reason, line))
    if errors:
        raise DataError(_lines(errors) + f"\n{len(errors)} rows longer than data.max_length={data.max_length}; "
                        "raise data.max_length or set data.overlength to truncate or drop")
    return keep


def _lines(lines: list[str]) -> str:
    shown = lines[:MAX_LINES]
    return "\n".join(shown) + (f"\n... and {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else "")


def _position(problem) -> tuple[str, int]:
    """(file, line/row number) of a problem's ``where``, so problems are listed in file order."""
    m = re.search(r"^(.*?)(?::| item | row )(\d+)$", problem[0])
    return (m.group(1), int(m.group(2))) if m else (problem[0], 0)


def check_drops(problems, total: int, name: str, max_drop_fraction: float, log_them: bool = True, hint: str = "") -> None:
    """Fail when every row, or more than ``max_drop_fraction`` of them, is unusable."""
    bad = len(problems)
    if not bad:
        return
    problems.sort(key=_position)
    lines = [line for _, _, line in problems]
    if bad >= total:
        raise DataError(_lines(lines) + f"\n{name}: all {total} rows dropped; nothing to train on{hint}")
    if bad / total > max_drop_fraction:
        raise DataError(
            _lines(lines) + f"\n{name}: {bad} of {total} rows unusable, more than data.max_drop_fraction="
            f"{max_drop_fraction}; fix the rows above or raise data.max_drop_fraction{hint}"
        )
    for line in lines if log_them else []:
        log.warning("dropped row: %s", line)


# ---------------------------------------------------------------- the whole stage, in memory


@dataclass
class Prepared:
    train: object  # datasets.Dataset
    eval: object
    report: DataReport
    prompt_template: str


def _first_format(src: Source, data: DataConfig) -> str:
    if data.format != "auto":
        return data.format
    first = next(((w, r) for w, r in src.rows if isinstance(r, dict)), None)
    if first is None:
        raise DataError(f"{src.name}: no row is a JSON object; cannot detect the format")
    return detect_format(first[1], first[0], data.columns)


def _finish(items: list[Item], ds, keep: list[int], with_text: bool):
    ds = ds.select(keep).remove_columns(["problem"])
    ds = ds.rename_column("n_tokens", "n_tokens_full")
    if with_text:
        ds = ds.add_column("prompt", [items[i].prompt for i in keep]).add_column("reference", [items[i].reference for i in keep])
    return ds


def prepare(data: DataConfig, tok, parsed: tuple[Parsed, Parsed | None] | None = None) -> Prepared:
    """Read, validate, render and tokenize ``data`` (train and eval splits) plus the report; writes nothing."""
    tparsed, eparsed = parsed or validate(data)
    src, fmt = tparsed.src, tparsed.fmt
    rendered = render_source(tparsed, data, tok)
    ds = tokenize_items(rendered.items, tok, data) if rendered.items else None
    keep = _collect_token_problems(ds, rendered.items, rendered, data) if ds is not None else []
    check_drops(rendered.problems, rendered.rows_read, src.name, data.max_drop_fraction)
    items = rendered.items
    if eparsed is not None:
        erendered = render_source(eparsed, data, tok)
        eds = tokenize_items(erendered.items, tok, data) if erendered.items else None
        ekeep = _collect_token_problems(eds, erendered.items, erendered, data) if eds is not None else []
        check_drops(erendered.problems, erendered.rows_read, eparsed.src.name, data.max_drop_fraction)
        train = _finish(items, ds, keep, with_text=False)
        evals = _finish(erendered.items, eds, ekeep, with_text=True)
        train_items, eval_items = [items[i] for i in keep], [erendered.items[i] for i in ekeep]
        rendered.problems += erendered.problems
        rendered.rows_read += erendered.rows_read
    else:
        order = list(keep)
        random.Random(data.seed).shuffle(order)
        n_eval = max(1, round(len(order) * data.eval_fraction))
        if n_eval >= len(order):
            raise DataError(f"{src.name}: {len(order)} usable rows leave nothing to train on with data.eval_fraction={data.eval_fraction}")
        eval_idx = sorted(order[:n_eval])
        eval_set = set(eval_idx)
        train_idx = [i for i in keep if i not in eval_set]
        train, evals = _finish(items, ds, train_idx, with_text=False), _finish(items, ds, eval_idx, with_text=True)
        train_items, eval_items = [items[i] for i in train_idx], [items[i] for i in eval_idx]
    report = DataReport.build(src.name, fmt, data, rendered.rows_read, rendered.problems, train, evals, train_items, eval_items, tok)
    train, evals = train.remove_columns(["n_tokens_full"]), evals.remove_columns(["n_tokens_full"])
    template = prompt_template_for(tok, data.chat_template) if fmt != "text" else "{prompt}"
    return Prepared(train, evals, report, template)


# ---------------------------------------------------------------- cached stage


def cache_key(data: DataConfig, tok, fmt_hint: str, digests: tuple[str, str]) -> str:
    """Content, not names: data bytes (or hub revision), tokenizer, template, length, format, mapping."""
    return stable_hash(
        {
            "data": digests[0],
            "eval_data": digests[1],
            "tokenizer": tokenizer_fingerprint(tok),
            "template": [PROMPT_TEMPLATE, chat_template_of(tok, data.chat_template)],
            "max_length": data.max_length,
            "overlength": data.overlength,
            "format": fmt_hint,
            "columns": data.columns,
            "split": [data.eval_fraction, data.seed, data.max_drop_fraction],
        }
    )


def _cache_hit(out: Path, run: MlflowRun | None) -> TokenizedData | None:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    log.info("tokenized data cache hit: %s (key %s), not re-tokenizing", out, out.name)
    log_report(DataReport.model_validate_json((out / "report.json").read_text()), run, cache_hit=True)
    return TokenizedData.model_validate_json(manifest.read_text())


def _cached_without_parsing(data: DataConfig, model: ModelConfig, workdir, run) -> tuple[TokenizedData | None, object]:
    """Warm re-runs: the same bytes were validated when the cache entry was written, so skip parsing them.

    Only for local data (a hub dataset's revision is known once loaded). A tokenizer that does not load
    is no hit: the full path then reports data problems first, before any tokenizer error.
    Returns (hit or None, the tokenizer if it loaded), so a miss does not load it twice.
    """
    digests = (local_digest(data.path, data.split), local_digest(data.eval_path, data.split) if data.eval_path else "")
    if None in digests:
        return None, None
    try:
        tok = load_tokenizer(model)
    except (OSError, ValueError):
        return None, None
    return _cache_hit(Path(workdir) / "tokenized" / cache_key(data, tok, data.format, digests), run), tok


def tokenize_dataset(data: DataConfig, model: ModelConfig, workdir: str | Path, run: MlflowRun | None = None) -> TokenizedData:
    """Validate and tokenize ``data``; reuse the cached result when every input's content is unchanged."""
    from datasets import DatasetDict

    hit, tok = _cached_without_parsing(data, model, workdir, run)
    if hit is not None:
        return hit
    parsed = validate(data)  # structure first: a broken file fails here, before any tokenizer or model
    tok = tok if tok is not None else load_tokenizer(model)
    key = cache_key(data, tok, data.format, (parsed[0].src.digest, parsed[1].src.digest if parsed[1] else ""))
    out = Path(workdir) / "tokenized" / key
    hit = _cache_hit(out, run)
    if hit is not None:
        return hit

    prep = prepare(data, tok, parsed)
    tmp = out.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DatasetDict({"train": prep.train, "eval": prep.eval}).save_to_disk(str(tmp))
    r = prep.report
    ref = TokenizedData(
        path=str(out.resolve()), fingerprint=key, train_rows=len(prep.train), eval_rows=len(prep.eval),
        truncated_rows=r.truncated_rows, format=r.format, prompt_template=prep.prompt_template,
        report_path=str((out / "report.md").resolve()),
    )
    (tmp / "report.json").write_text(r.model_dump_json(indent=1))
    (tmp / "report.md").write_text(r.markdown())
    (tmp / "manifest.json").write_text(ref.model_dump_json())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a cache hit
    log.info(
        "tokenized %s (%s): %d train / %d eval rows, %d dropped, %d truncated to %d tokens -> %s",
        data.path, r.format, ref.train_rows, ref.eval_rows, r.rows_dropped, r.truncated_rows, data.max_length, out,
    )
    log_report(r, run, cache_hit=False)
    return ref


def log_report(report: DataReport, run: MlflowRun | None, cache_hit: bool) -> None:
    """The data report into the flow's MLflow run: metrics ``data/*`` plus report.md and report.json."""
    if run is None:
        return
    import mlflow

    from qlora.tracking import active_run

    with active_run(run):
        mlflow.log_metrics({**report.metrics(), "data/cache_hit": float(cache_hit)})
        mlflow.log_text(report.markdown(), "data/report.md")
        mlflow.log_dict(report.model_dump(mode="json"), "data/report.json")
