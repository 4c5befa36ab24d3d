"""Stage 1: read the dataset, render it with the prompt template, tokenize with completion-only labels.

Labels are -100 on every prompt token; the response tokens and the EOS after each response are
trained. The result is saved with ``save_to_disk`` under a key made from content (data bytes,
tokenizer, template, max_length, format), so an unchanged re-run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from qlora.config import DataConfig, ModelConfig, stable_hash
from qlora.errors import DataError
from qlora.refs import TokenizedData
from qlora.template import PROMPT_TEMPLATE, format_prompt, user_message

log = logging.getLogger("qlora.tokenize")
IGNORE_INDEX = -100
Segment = tuple[str, bool]  # (text, trained?)


# ---------------------------------------------------------------- reading


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .json (array) or .jsonl file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found (data.path is resolved from the directory you run in)")
    text = p.read_bytes().decode("utf-8-sig", errors="strict")
    if not text.strip():
        raise DataError(f"{p}: file is empty; expected JSON Lines or a JSON array of rows")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON array: {e.msg}") from None
        if not isinstance(rows, list):
            raise DataError(f"{p}: expected a JSON array of rows or JSON Lines")
        # json gives no line numbers for array items: rows are named by 1-based item index
        numbered = [(f"{p}: item {i}", r) for i, r in enumerate(rows, start=1)]
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((f"{p}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: malformed JSON line: {e.msg}") from None
    for where, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        row["_where"] = where
    return [r for _, r in numbered]


def detect_format(rows: list[dict], path: str) -> str:
    first = rows[0]
    if "conversations" in first:
        return "sharegpt"
    if "instruction" in first and "output" in first:
        return "alpaca"
    raise DataError(
        f"{path}: row 1 has keys {sorted(k for k in first if not k.startswith('_'))}; cannot tell the format. "
        "Expected Alpaca (instruction, input, output) or ShareGPT (conversations); set data.format."
    )


def _field(row: dict, key: str, required: bool = True) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise DataError(f"{row['_where']}: missing or empty field '{key}'")
        return ""
    if not isinstance(v, str):
        raise DataError(f"{row['_where']}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def segments(row: dict, fmt: str) -> list[Segment]:
    """The row as (text, trained) pieces; every trained piece is followed by EOS at tokenization."""
    if fmt == "alpaca":
        msg = user_message(_field(row, "instruction"), _field(row, "input", required=False))
        return [(format_prompt(msg), False), (_field(row, "output"), True)]
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row['_where']}: 'conversations' must be a non-empty list")
    out: list[Segment] = []
    system = ""
    expect = "human"
    for i, t in enumerate(turns):
        who, value = (t.get("from"), t.get("value")) if isinstance(t, dict) else (None, None)
        if not isinstance(value, str):
            raise DataError(f"{row['_where']}: conversations[{i}].value must be a string")
        if who == "system" and i == 0:
            system = value.strip() + "\n\n"
            continue
        if who != expect:
            raise DataError(f"{row['_where']}: conversations[{i}] is from {who!r}, expected {expect!r}")
        if who == "human":
            out.append((system + format_prompt(value.strip()), False))
            system = ""
            expect = "gpt"
        else:
            out.append((value.strip(), True))
            expect = "human"
    if not any(trained for _, trained in out):
        raise DataError(f"{row['_where']}: conversation has no 'gpt' turn to train on")
    return out


def prompt_and_reference(segs: list[Segment]) -> tuple[str, str]:
    """First user message's rendered prompt and the first assistant answer (for generation eval)."""
    return segs[0][0], segs[1][0]


# ---------------------------------------------------------------- tokenizing


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
    return hashlib.sha256((body + str(tok.all_special_tokens)).encode()).hexdigest()[:16]


def encode(tok, segs_batch: list[list[Segment]], max_length: int) -> tuple[dict[str, list], int]:
    """Tokenize many examples in one batched tokenizer call; returns columns and the truncated count."""
    flat = [text for segs in segs_batch for text, _ in segs]
    ids_flat = tok(flat, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok("a")["input_ids"][:1] == [tok.bos_token_id] and tok.bos_token_id is not None else []
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = 0
    i = 0
    for segs in segs_batch:
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for _, trained in segs:
            piece = ids_flat[i]
            i += 1
            if trained:
                piece = piece + [tok.eos_token_id]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * len(ids))
        cols["labels"].append(labels)
    return cols, truncated


def render(rows: list[dict], fmt: str, path: str, max_drop_fraction: float) -> list[tuple[dict, list[Segment]]]:
    """Segments for every usable row; bad rows are dropped and counted, too many fail the run."""
    kept, dropped = [], []
    for r in rows:
        try:
            kept.append((r, segments(r, fmt)))
        except DataError as e:
            dropped.append(str(e))
    if dropped and (not kept or len(dropped) / len(rows) > max_drop_fraction):
        shown = "\n".join(dropped[:10]) + (f"\n... and {len(dropped) - 10} more" if len(dropped) > 10 else "")
        raise DataError(
            f"{shown}\n{path}: {len(dropped)} of {len(rows)} rows unusable, more than data.max_drop_fraction="
            f"{max_drop_fraction}; fix the rows above or raise data.max_drop_fraction"
        )
    for reason in dropped:
        log.warning("dropped row: %s", reason)
    return kept


def _split(items: list, cfg: DataConfig) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, round(len(items) * cfg.eval_fraction))
    if n_eval >= len(items):
        raise DataError(f"{cfg.path}: {len(items)} rows leave nothing to train on with data.eval_fraction={cfg.eval_fraction}")
    eval_idx = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in eval_idx], [items[i] for i in sorted(eval_idx)]


def _file_digest(path: str | None) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def _build(items: list[tuple[dict, list[Segment]]], tok, max_length: int, with_text: bool):
    from datasets import Dataset

    segs = [s for _, s in items]
    cols, truncated = encode(tok, segs, max_length)
    if with_text:
        pairs = [prompt_and_reference(s) for s in segs]
        cols["prompt"] = [p for p, _ in pairs]
        cols["reference"] = [r for _, r in pairs]
    return Dataset.from_dict(cols), truncated


def tokenize_dataset(data: DataConfig, model: ModelConfig, workdir: str | Path) -> TokenizedData:
    """Read, validate, template and tokenize ``data``; reuse the cached result when the content is unchanged."""
    from datasets import DatasetDict

    rows = read_rows(data.path)
    fmt = data.format if data.format != "auto" else detect_format(rows, data.path)
    tok = load_tokenizer(model)
    key = stable_hash(
        {
            "data": _file_digest(data.path),
            "eval_data": _file_digest(data.eval_path),
            "tokenizer": tokenizer_fingerprint(tok),
            "template": PROMPT_TEMPLATE,
            "max_length": data.max_length,
            "format": fmt,
            "split": [data.eval_fraction, data.seed, data.max_drop_fraction],
        }
    )
    out = Path(workdir) / "tokenized" / key
    manifest = out / "manifest.json"
    if manifest.is_file():
        log.info("tokenized data cache hit: %s (key %s), not re-tokenizing", out, key)
        return TokenizedData.model_validate_json(manifest.read_text())

    items = render(rows, fmt, data.path, data.max_drop_fraction)
    if data.eval_path:
        train_items, eval_items = items, render(read_rows(data.eval_path), fmt, data.eval_path, data.max_drop_fraction)
    else:
        train_items, eval_items = _split(items, data)
    train, t1 = _build(train_items, tok, data.max_length, with_text=False)
    evals, t2 = _build(eval_items, tok, data.max_length, with_text=True)
    tmp = out.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DatasetDict({"train": train, "eval": evals}).save_to_disk(str(tmp))
    ref = TokenizedData(path=str(out.resolve()), fingerprint=key, train_rows=len(train), eval_rows=len(evals), truncated_rows=t1 + t2)
    (tmp / "manifest.json").write_text(ref.model_dump_json())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a cache hit
    log.info(
        "tokenized %s (%s): %d train / %d eval rows, %d truncated to %d tokens -> %s",
        data.path, fmt, ref.train_rows, ref.eval_rows, ref.truncated_rows, data.max_length, out,
    )
    return ref
