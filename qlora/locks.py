"""CPU threads and training slots on one worker, so that runs sharing a machine queue or share fairly.

Each torch process starts one compute thread per core. Two runs training at once on a 2-core worker
then ran 4 spinning OpenMP threads on 2 cores and slowed each other about 50x (issue 13, item 10). A run
now uses ``cores available / training slots`` threads, where the cores are the ones this process may run
on (CPU affinity, and a cgroup CPU quota as Kubernetes and Docker set it), and training holds one of the
machine's slots (``train.slots_per_worker``), so a third run's training waits instead of oversubscribing.
An OMP_NUM_THREADS the user set is respected as is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("qlora.resources")
# Per machine (per container) and user: what one worker owns. Per user, so a folder another account
# created cannot refuse us its lock files.
SLOT_DIR = Path(tempfile.gettempdir()) / f"qlora-train-slots-{os.getuid() if hasattr(os, 'getuid') else 0}"


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (``cpu.max``)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def threads_per_run(slots: int) -> int:
    """Compute threads for one run when up to ``slots`` runs train on this worker at once."""
    return max(1, available_cpus() // max(1, slots))


def set_threads(slots: int) -> int:
    """Size torch's thread pools (and OpenMP's, for child processes) for this run; returns the thread count."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or the launcher's) choice wins
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = threads_per_run(slots)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # ranks and other children
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("%d compute threads (%d cores available, %d training slot(s) per worker)", n, available_cpus(), slots)
    return n


@contextlib.contextmanager
def machine_slot(slots: int, slot_dir: Path = SLOT_DIR, poll_s: float = 1.0):
    """Hold one of ``slots`` training slots of this machine while training; wait while all are taken.

    File locks (flock) in a machine-wide folder: the OS releases them when a holder dies, SIGKILL included,
    so no slot is ever lost; this also covers bare ``qlora run`` s, which have no shared Prefect server.
    """
    from filelock import FileLock, Timeout

    slot_dir.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(slot_dir / f"slot-{i}.lock"), thread_local=False) for i in range(max(1, slots))]
    waited, t0 = False, time.monotonic()
    while True:
        for i, lock in enumerate(locks):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            log.info("training slot %d of %d on this worker acquired (waited %.1f s)", i + 1, len(locks), time.monotonic() - t0)
            try:
                yield i
            finally:
                lock.release()
                log.info("training slot %d of %d on this worker released", i + 1, len(locks))
            return
        if not waited:
            log.warning("all %d training slot(s) of this worker are in use (train.slots_per_worker, %s): waiting", len(locks), slot_dir)
            waited = True
        time.sleep(poll_s)
