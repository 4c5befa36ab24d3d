"""One model on a machine's accelerator at a time: a Prefect global concurrency limit per worker host and
visible device set, taken for training and the evaluation that follows it.

Why a Prefect limit: it is what queues flow runs across processes and workers (sweep trials, two
``qlora run`` on one box, trials that ``run_deployment`` put on one worker), it shows in the UI
(*Concurrency*: who holds the slot), and a killed holder's lease expires on its own.

- Name ``qlora-device-<host>-<CUDA_VISIBLE_DEVICES or all>``: every training loads onto the first
  visible device (``qlora.models.quant.device_map``), so two on one device set would share one GPU. A worker
  started per GPU (``CUDA_VISIBLE_DEVICES=1 prefect worker start ...``) gets its own limit.
- Limit 1: one training per GPU (set) by default; ``prefect gcl update NAME --limit N`` if you know better.
- Created by ``ensure_device_limit`` (``qlora sweep`` and each trial). A missing limit queues nothing,
  so a bare ``qlora run`` on Prefect's temporary server is never blocked and never fails on it.
- In one process (a sweep's in-process trials) a thread lock is taken first: trainings there share
  torch's global RNG, so another trial loading a model (LoRA init draws random numbers) during a
  training would change its dropout masks and the adapter would not reproduce.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time

log = logging.getLogger("qlora.device")
_IN_PROCESS = threading.Lock()


def device_limit_name() -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES") or "all"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"qlora-device-{socket.gethostname()}-{devices}")


def ensure_device_limit() -> str:
    """Create this machine's limit (1 slot) unless it exists; returns its name."""
    from prefect import get_client

    from flows.concurrency import ensure_limit

    name = device_limit_name()
    with get_client(sync_client=True) as client:
        ensure_limit(client, name, 1, "one training per device: trainings on this device queue on it")
    return name


def _limit(name: str):
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return None


@contextlib.contextmanager
def device_slot():
    """Hold this machine's device slot (when its limit exists) for the duration of the block."""
    from prefect.concurrency.sync import concurrency

    with _IN_PROCESS:
        name = device_limit_name()
        limit = _limit(name)
        if limit is None:  # checked first: Prefect itself would warn about the missing limit on every run
            yield
            return
        t0, busy = time.perf_counter(), limit.active_slots >= limit.limit
        if busy:
            log.info("waiting for the device slot %s (%d/%d taken by other flow runs on this machine)",
                     name, limit.active_slots, limit.limit)
        with concurrency(name, occupy=1, strict=False):
            if busy:
                log.info("device slot %s acquired after %.1f s", name, time.perf_counter() - t0)
            yield
