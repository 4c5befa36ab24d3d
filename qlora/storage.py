"""A stage's output folder on disk: written so that a failure leaves nothing behind, and checked before
it is trusted again.

Writing: into ``<out>.tmp``, renamed when complete. A crash or a full disk removes the partial folder; a
full disk becomes one ``DiskFull`` message naming the path, how much space is left and what to do.
The last file written is ``files.json``: every other file's size. Reading back (``cached``): a folder is
reused only when every file it lists is there at its size and its ``manifest.json`` parses; a folder
cut short by a crash, a disk that filled up or a hand edit is removed with one warning naming it and
why, and rebuilt, never used as it is and never a traceback. A folder whose workdir was moved or copied
is found where it is now (its manifest names the folder it was written in).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import TypeVar

from qlora.errors import DiskFull, is_disk_full

log = logging.getLogger("qlora.storage")
INDEX = "files.json"  # {relative path: bytes} of every other file, written last
MANIFEST = "manifest.json"  # the stage's reference (qlora.refs), written just before the index
Ref = TypeVar("Ref")


def _free(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free / 2**20:,.0f} MB free there now"
            except OSError:
                return "free space unknown"
    return "free space unknown"


def disk_full_error(path: Path, what: str) -> DiskFull:
    return DiskFull(
        f"{path}: the disk is full (errno ENOSPC, no space left on device) while writing {what}; "
        f"{_free(path)}. Free space on that filesystem or set workdir to a larger volume, then re-run "
        "(finished stages are reused)"
    )


@contextlib.contextmanager
def staged_dir(out: Path, what: str):
    """Yield ``<out>.tmp`` to write into; on success it replaces ``out`` in one rename. On any failure the
    partial folder is removed, so it is never taken for a result and does not hold disk space."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(tmp, what) from None
        raise
    write_index(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a cache hit


def write_index(folder: Path) -> None:
    """Record every file's size in ``folder/files.json``; the last write, so its presence means complete."""
    sizes = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file() and f.name != INDEX}
    (folder / INDEX).write_text(json.dumps(sizes, indent=0))


def write_manifest(folder: Path, ref) -> None:
    """A folder written in place (not through ``staged_dir``): its manifest, then its index."""
    (folder / MANIFEST).write_text(ref.model_dump_json())
    write_index(folder)


def problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be trusted as written, or None. A folder with a manifest and no index was
    written before the index existed and is trusted as it was then."""
    index = folder / INDEX
    if not index.is_file():
        return None if (folder / MANIFEST).is_file() else f"no {MANIFEST}: it was never finished"
    try:
        sizes = json.loads(index.read_text())
        assert isinstance(sizes, dict)
    except (ValueError, AssertionError, OSError) as e:
        return f"{INDEX} does not parse ({type(e).__name__})"
    for name, size in sizes.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size:,} bytes, {size:,} when it was written"
    return None


def cached(out: Path, what: str, ref_type: type[Ref]) -> Ref | None:
    """The reference a finished stage left in ``out``, if what is on disk is what it wrote; else None (the
    caller builds it again), after one warning and with the broken folder removed."""
    out = Path(out)
    if not out.exists():
        return None
    why = problem(out)
    ref = None
    if why is None:
        try:
            text = (out / MANIFEST).read_text()
            written_in = json.loads(text).get("path")
            if written_in and Path(written_in) != out.resolve():  # the workdir was moved or copied
                text = text.replace(json.dumps(written_in)[1:-1], json.dumps(str(out.resolve()))[1:-1])
            ref = ref_type.model_validate_json(text)
        except (ValueError, OSError) as e:
            why = f"{MANIFEST} does not parse ({type(e).__name__})"
    if why is not None:
        log.warning("%s at %s is broken (%s): removing it and building it again", what, out, why)
        shutil.rmtree(out, ignore_errors=True)
        return None
    return ref
