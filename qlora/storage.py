"""Writing a stage's output folder so that a failure leaves nothing behind: write into ``<out>.tmp``,
rename when complete. A crash or a full disk removes the partial folder; a full disk becomes one
``DiskFull`` message naming the path, how much space is left and what to do (issue 13, item 8).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from qlora.errors import DiskFull, is_disk_full


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
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written folder is never taken for a cache hit
