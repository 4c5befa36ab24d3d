"""Read rows from what users bring: .jsonl, .json (array or JSON Lines), .csv, .parquet, a
``datasets.save_to_disk`` folder, or a Hugging Face Hub dataset id.

Every row comes with ``where`` ("file:line" or "file: row N") so each problem names its place.
A problem confined to one row (a malformed JSON line, a non-object, bad UTF-8 on one line) is
returned as a row problem and counted like any other dropped row; a problem with the whole source
(missing, empty, a JSON array in a .jsonl file) raises ``DataError`` at once.
Pure Python plus pyarrow/datasets: no model, no torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from qlora.config.schema import DataConfig
from qlora.errors import DataError
from qlora.models import is_hub_id

Problem = tuple[str, str, str]  # (where, reason, message line): a row a later step drops, counted in tasks/data/drops.py


@dataclass
class Source:
    name: str  # what error lines start with
    rows: list[tuple[str, object]] = field(default_factory=list)  # (where, row)
    problems: list[Problem] = field(default_factory=list)
    digest: str = ""  # content hash (bytes, or hub id + revision) for the cache key


def read_source(path: str, split: str = "train", subset: str | None = None, revision: str | None = None,
                local: LocalContent | None = None) -> Source:
    """All rows of ``path``; ``local`` is its content when the caller already read it (``local_content``)."""
    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p, split, local.digest if local else None)
    if not p.exists():
        if is_hub_id(path, owner_required=True):
            return _read_hub(path, split, subset, revision)
        raise DataError(
            f"{p}: data file not found (data.path is resolved from the directory you run in; "
            "a hub dataset id looks like owner/name)"
        )
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (a device, pipe or socket); data.path must be a data file or a save_to_disk folder")
    suffix = p.suffix.lower()
    local = local if local is not None and local.raw is not None else local_content(path, split)
    raw = local.raw
    src = Source(name=str(p), digest=local.digest)
    if not raw.strip() or raw.strip() == b"\xef\xbb\xbf":
        raise DataError(f"{p}: file is empty; expected rows of training data")
    if suffix == ".parquet":
        return _read_parquet(p, raw, src)
    text_lines = _decode_lines(p, raw, src)
    if suffix == ".csv":
        return _read_csv(p, text_lines, src)
    if suffix in (".jsonl", ".ndjson"):
        first = next((ln for _, ln in text_lines if ln.strip()), "")
        if first.lstrip().startswith("[") and _is_json_array(first, text_lines):
            raise DataError(f"{p}:1: a JSON array in a JSON Lines file; write one object per line or rename the file to .json")
        return _read_jsonl(p, text_lines, src)
    if suffix == ".json":
        body = "\n".join(ln for _, ln in text_lines)
        if body.lstrip().startswith("["):
            return _read_json_array(p, body, src)
        return _read_jsonl(p, text_lines, src)  # .json holding JSON Lines is common and accepted
    raise DataError(f"{p}: unsupported file type '{suffix}'; use .jsonl, .json, .csv, .parquet or a save_to_disk folder")


def _decode_lines(p: Path, raw: bytes, src: Source) -> list[tuple[int, str]]:
    """(line number, text) pairs; a leading BOM is accepted, a line of invalid UTF-8 is a row problem."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return list(enumerate(raw.decode("utf-8").splitlines(), start=1))
    except UnicodeDecodeError:
        pass  # slow path only for broken files: find the lines at fault
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append((lineno, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            src.problems.append((f"{p}:{lineno}", "invalid_utf8", f"{p}:{lineno}: invalid UTF-8 at byte {e.start + 1} of the line; save the file as UTF-8"))
    return out


def _is_json_array(first: str, lines) -> bool:
    try:
        return isinstance(json.loads(first), list)
    except json.JSONDecodeError:
        return len(lines) > 1  # an array spread over many lines


def _read_jsonl(p: Path, lines, src: Source) -> Source:
    for lineno, line in lines:
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            src.rows.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            src.problems.append((where, "malformed_json", f"{where}: malformed JSON line: {e.msg} (column {e.colno})"))
        except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting deeper than the parser's stack
            src.problems.append((where, "malformed_json", f"{where}: malformed JSON line: {str(e)[:200] or 'nested too deeply'}"))
    return src


def _read_json_array(p: Path, body: str, src: Source) -> Source:
    try:
        rows = json.loads(body)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise DataError(
                f"{p}:{e.lineno}: more data after the JSON array ended; if this is JSON Lines (one row per line), "
                "the first line must be an object, not an array"
            ) from None
        raise DataError(f"{p}:{e.lineno}: malformed JSON array: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{p}: malformed JSON array: {str(e)[:200] or 'nested too deeply'}") from None
    # json gives no line numbers for array items: rows are named by 1-based item index
    src.rows = [(f"{p}: item {i}", r) for i, r in enumerate(rows, start=1)]
    return src


def _read_csv(p: Path, lines, src: Source) -> Source:
    text = "\n".join(ln for _, ln in lines)
    csv.field_size_limit(2**31 - 1)  # long fields are data; rows too long to train on are handled later (max_length)
    reader = csv.DictReader(io.StringIO(text))
    start = 2
    try:
        if not reader.fieldnames:
            raise DataError(f"{p}:1: CSV file has no header row")
        for row in reader:
            where = f"{p}:{start}"
            start = reader.line_num + 1
            if None in row:
                src.problems.append((where, "malformed_csv", f"{where}: more fields than the header has columns"))
                continue
            src.rows.append((where, row))
    except csv.Error as e:  # e.g. a NUL byte: the reader cannot go on past it
        raise DataError(f"{p}:{reader.line_num or 1}: malformed CSV ({e}); fix the file or convert it to JSON Lines") from None
    return src


def _read_parquet(p: Path, raw: bytes, src: Source) -> Source:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{p}: not a readable Parquet file: {e}") from None
    src.rows = [(f"{p}: row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)]
    return src


def _read_saved_dataset(p: Path, split: str, digest: str | None = None) -> Source:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except FileNotFoundError:
        raise DataError(f"{p}: a folder, but not one written by datasets.save_to_disk") from None
    except PermissionError as e:
        raise DataError(f"{e.filename or p}: cannot read the dataset (permission denied); make it readable by this user") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split '{split}' (has {sorted(ds)}); set data.split")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    return Source(name=str(p), rows=[(f"{p}: row {i}", r) for i, r in enumerate(ds.to_list(), start=1)],
                  digest=digest or dir_digest(p, split))


@dataclass
class LocalContent:
    """A local source read once: its digest (the cache key's part) and, for a file, its bytes, which
    ``read_source`` then parses without reading the file again."""

    digest: str
    raw: bytes | None = None  # None for a save_to_disk folder


def local_content(path: str, split: str) -> LocalContent | None:
    """The digest ``read_source`` would give, without parsing: None for a hub dataset (known only once loaded)."""
    p = Path(path)
    if p.is_file():
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise DataError(f"{p}: cannot read the data file ({e.strerror or e}); check its permissions") from None
        return LocalContent(hashlib.sha256(raw).hexdigest(), raw)
    if p.is_dir():
        try:
            return LocalContent(dir_digest(p, split))
        except PermissionError as e:
            raise DataError(f"{e.filename or p}: cannot read the dataset (permission denied); make it readable by this user") from None
    return None


def local_inputs(data: DataConfig) -> tuple[list[LocalContent | None], LocalContent | None]:
    """Every local input read once, before anything is parsed: one per source (``data.path`` is a mixture of
    one) and the eval file; None where it is a hub dataset."""
    train = [local_content(s.path, s.split) for s in (data.sources or [data])]
    return train, local_content(data.eval_path, data.split) if data.eval_path else None


def dir_digest(p: Path, split: str) -> str:
    h = hashlib.sha256(split.encode())
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(p).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _read_hub(dataset_id: str, split: str, subset: str | None, revision: str | None) -> Source:
    """A hub dataset; the cache key is the resolved revision (commit), not the name."""
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset_id, name=subset, split=split, revision=revision)
    except Exception as e:  # offline, unknown id, unknown split: all the user's to fix
        raise DataError(f"{dataset_id}: cannot load hub dataset (split={split}, subset={subset}, revision={revision}): {e}") from None
    # Without a pinned revision the datasets fingerprint (content of the downloaded files) stands in.
    digest = f"hub:{dataset_id}:{subset}:{split}:{revision or ds._fingerprint}"
    name = f"{dataset_id}[{split}]"
    return Source(name=name, rows=[(f"{name}: row {i}", r) for i, r in enumerate(ds.to_list(), start=1)], digest=digest)
