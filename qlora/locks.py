"""Who may write or run what, across processes on one machine: cache writers, run dirs, run records,
training and device slots, and the compute threads a run takes.

Every lock here is a file lock (flock) the OS drops when its holder dies, SIGKILL included, so a killed
run never blocks the next one, with or without a Prefect server. A waiter polls (``POLL_S``), says who
holds the lock and since when (the holder writes ``<lock>.holder`` next to it), and a SIGTERM ends the
wait at once: the signal interrupts the sleep in the waiting thread.

- **Cache writers** (``one_writer``): flow runs that need the same tokenized or quantized cache entry at
  once (sweep trials): one writes it, the others wait and then hit it.
- **Run dirs** (``locked_run_dir``): a second flow run of the same config waits, then reuses the result.
- **Run records** (``own_run_record``): only the holder of ``<key>.lock`` continues or replaces a saved
  MLflow run id, so a re-run after a kill continues the killed attempt's run and a second run started
  beside a live one gets its own run.
- **Training slots** (``training_slot``): ``train.slots_per_worker`` slot files per machine, plus, against
  a Prefect server, a global concurrency limit (visible and adjustable in the UI; shared by machines). Its
  lease is short (``LEASE_S``), so a killed holder's slot is the server's again within about that.
- **Device slot** (``device_slot``): one training (and the evaluation after it) per visible device set.
  A file lock per device set, not a Prefect limit: a limit's lease lives in the server process that
  granted it, so with a bare run's temporary server a SIGKILLed holder kept the slot taken in the
  database for every later run on the machine.
- **Compute threads** (``set_threads``): each torch process starts one compute thread per core; two runs
  training at once on a 2-core worker ran 4 spinning OpenMP threads and slowed each other about 50x
  (issue 13, item 10). A run uses ``cores available / training slots`` threads; an OMP_NUM_THREADS the
  user set is respected as is.

The flow takes the device slot around training and evaluation first, then training takes its run dir's lock
and, only when the adapter is not already trained, the training slots (``tasks/train.py``): always in that order,
so two runs never hold one each and wait for the other, and a re-run that finds its adapter never queues.
``QLORA_LOCK_DIR`` moves the machine-wide lock folder (containers sharing one GPU host mount one folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from qlora.config.schema import TrainConfig

log = logging.getLogger("qlora.locks")
# Per machine (per container) and user: what one worker owns. Per user, so a folder another account
# created cannot refuse us its lock files.
SLOT_DIR = Path(os.environ.get("QLORA_LOCK_DIR") or
                Path(tempfile.gettempdir()) / f"qlora-train-slots-{os.getuid() if hasattr(os, 'getuid') else 0}")
POLL_S = 0.5  # how often a waiter tries again; a freed lock is taken within this
LEASE_S = 60.0  # Prefect slot lease (its server's minimum): renewed while the holder lives; after a kill the
# slot is the server's again within this plus the repossessor's loop (15 s)
# How a Prefect server must keep those leases (``make server`` sets PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE to it):
# on disk under its PREFECT_HOME. Prefect's default keeps them in the server's memory: a server restart while a run
# held a slot forgot the lease, no expiry ever freed the slot, and with one slot per worker every later training
# waited for good (found while building `make chaos`; tests/system/test_prefect_leases.py).
SERVER_LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
_IN_PROCESS = threading.Lock()  # the device slot between threads of one process (a sweep's in-process trials)


# ---------------------------------------------------------------- the one primitive


def _holder_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def holder_of(lock_path: Path) -> str:
    """Who holds ``lock_path`` and since when, as its holder wrote it; "unknown" when it did not."""
    try:
        h = json.loads(_holder_file(lock_path).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["since"]))
        run = f", flow run {h['flow_run']}" if h.get("flow_run") else ""
        return f"pid {h['pid']} on {h['host']}{run}, since {since} ({time.time() - h['since']:.0f} s)"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _flow_run_id() -> str | None:
    if "prefect" not in sys.modules:  # a plain call: importing Prefect (seconds) would delay the holder record
        return None
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:  # noqa: BLE001 - no Prefect context: a plain call
        return None


def try_lock(lock_path: Path):
    """The flock on ``lock_path`` if free now (the holder is recorded beside it), else None."""
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    try:
        _holder_file(lock_path).write_text(json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "flow_run": _flow_run_id(), "since": time.time()}))
    except OSError:  # a read-only or full disk costs the "who holds it" line, not the lock
        pass
    return lock


def wait_for_lock(lock_paths: list[Path], what: str, poll_s: float = POLL_S):
    """The first free of ``lock_paths`` (index, lock), waiting while all are held and saying who holds them:
    after the first poll (a holder that has just taken its lock has written who it is by then), then once a
    minute."""
    t0, polls, said_at = time.monotonic(), 0, None
    while True:
        for i, path in enumerate(lock_paths):
            lock = try_lock(path)
            if lock is not None:
                if said_at is not None:
                    log.info("%s acquired after %.1f s", what, time.monotonic() - t0)
                return i, lock
        waited = time.monotonic() - t0
        if polls == 1 or (said_at is not None and waited - said_at >= 60):
            holders = "; ".join(f"{p.name}: {holder_of(p)}" for p in lock_paths)
            log.warning("waiting for %s: held by %s", what, holders)
            said_at = waited
        polls += 1
        time.sleep(poll_s)  # a SIGTERM interrupts this and ends the wait


@contextlib.contextmanager
def held(lock_paths: list[Path], what: str, poll_s: float = POLL_S):
    """Hold one of ``lock_paths`` for the block (waiting while all are held); yields its index."""
    i, lock = wait_for_lock(lock_paths, what, poll_s)
    try:
        yield i
    finally:
        with contextlib.suppress(OSError):
            _holder_file(lock_paths[i]).unlink()
        lock.release()


# ---------------------------------------------------------------- cache writers, run dirs, run records


@contextlib.contextmanager
def one_writer(workdir: str | Path, cache: str):
    """One writer per cache folder (``tokenized``, ``quantized``) across processes; the others wait, then hit."""
    with held([Path(workdir, cache, ".lock")], f"the {cache} cache of {workdir} (another run is writing it)"):
        yield


RUN_DIR_LOCK = ".lock"


@contextlib.contextmanager
def locked_run_dir(run_dir: Path):
    """Exclusive lock on a training run dir: a second flow run of the same config waits, then reuses the result.

    A file lock (not the deployment's concurrency limit) because it also covers ``qlora run`` from two
    shells and Prefect task retries, and it is released by the OS when the holder is SIGKILLed.
    """
    with held([Path(run_dir) / RUN_DIR_LOCK], f"run dir {run_dir} (another run of the same config is training in it)"):
        yield Path(run_dir)


# Run-record locks this process owns, held for the life of the flow run that opened them: {path: (lock, owner)}.
_OWNED: dict[Path, tuple[object, str | None]] = {}


def own_run_record(saved: Path, owner: str | None) -> bool:
    """Hold ``<saved>.lock`` (not waiting): only its holder may continue or replace the run id saved there.

    ``owner`` (the Prefect flow run id) tells a second flow run in this same process from the owner
    re-opening its run before registering.
    """
    if saved in _OWNED:
        return _OWNED[saved][1] == owner
    lock = try_lock(saved.with_suffix(".lock"))  # released by the flow, maybe from another thread
    if lock is None:
        return False
    _OWNED[saved] = (lock, owner)
    return True


def release_run_record(saved: Path) -> None:
    """At the end of a flow run: a later run of the same config may continue or replace its MLflow run."""
    held_lock = _OWNED.pop(saved, None)
    if held_lock is not None:
        with contextlib.suppress(OSError):
            _holder_file(saved.with_suffix(".lock")).unlink()
        held_lock[0].release()


# ---------------------------------------------------------------- compute threads


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


# ---------------------------------------------------------------- training slots


@contextlib.contextmanager
def machine_slot(slots: int, slot_dir: Path | None = None, poll_s: float = POLL_S):
    """Hold one of ``slots`` training slots of this machine while training; wait while all are taken."""
    paths = [(slot_dir or SLOT_DIR) / f"slot-{i}.lock" for i in range(max(1, slots))]
    with held(paths, f"a training slot of this worker ({len(paths)} in all, train.slots_per_worker)", poll_s) as i:
        log.info("training slot %d of %d on this worker acquired", i + 1, len(paths))
        yield i
    log.info("training slot %d of %d on this worker released", i + 1, len(paths))


def limit_name(cfg: TrainConfig) -> str | None:
    if not cfg.concurrency_limit:
        return None
    return cfg.concurrency_limit.replace("{host}", socket.gethostname().split(".")[0].lower())


def ensure_limit(client, name: str, slots: int, why: str):
    """The global concurrency limit ``name``, created with ``slots`` slots when missing (``why`` is logged)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        return client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        pass
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        log.info("created Prefect concurrency limit %s with %d slot(s) (%s)", name, slots, why)
    except ObjectAlreadyExists:  # another run created it first
        pass
    return client.read_global_concurrency_limit_by_name(name)


@contextlib.contextmanager
def _prefect_slot(name: str | None, slots: int):
    """The Prefect limit ``name`` (created when missing), against a Prefect server only: a bare run's
    temporary server keeps leases in its own memory, so a slot it granted would outlive a killed holder."""
    from prefect.settings import PREFECT_API_URL

    if name is None or not PREFECT_API_URL.value():  # turned off, or the temporary server of a bare run
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        limit = ensure_limit(client, name, slots, "train.slots_per_worker")
    if limit.active_slots >= limit.limit:
        log.warning("Prefect concurrency limit %s: %d of %d slot(s) in use; waiting for one (a killed holder's "
                    "slot is freed within ~%.0f s)", name, limit.active_slots, limit.limit, LEASE_S)
    t0 = time.monotonic()
    with concurrency(name, occupy=1, strict=False, lease_duration=LEASE_S):
        log.info("Prefect concurrency limit %s: slot acquired (waited %.1f s)", name, time.monotonic() - t0)
        yield


@contextlib.contextmanager
def training_slot(cfg: TrainConfig):
    """Both slots, held for the whole training (the Prefect one first: it may be shared by many machines)."""
    with _prefect_slot(limit_name(cfg), cfg.slots_per_worker), machine_slot(cfg.slots_per_worker):
        yield


# ---------------------------------------------------------------- device slot


def device_lock_path() -> Path:
    """This machine's lock for its visible device set: every training loads onto the first visible device
    (``qlora.models.device_map``), so two on one set would share a GPU; a worker started per GPU
    (``CUDA_VISIBLE_DEVICES=1 prefect worker start ...``) gets its own slot."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES") or "all"
    return SLOT_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "-", f"device-{devices}.lock")


@contextlib.contextmanager
def device_slot(poll_s: float = POLL_S):
    """Hold this machine's device slot for the block. In one process (a sweep's in-process trials) a thread
    lock is taken first: trainings there share torch's global RNG, so another trial loading a model (LoRA
    init draws random numbers) during a training would change its dropout masks and the adapter would not
    reproduce."""
    with _IN_PROCESS, held([device_lock_path()], f"the device slot {device_lock_path().name} of this machine", poll_s):
        yield
