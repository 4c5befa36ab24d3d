"""The train stage's slot: a Prefect global concurrency limit (visible and adjustable in the Prefect UI) and
this machine's slot files (``qlora.locks.machine_slot``), ``train.slots_per_worker`` of each.

Prefect's ``concurrency()`` skips a limit that does not exist (a warning, no waiting), so the limit is
created when missing. Only against a Prefect server: a bare ``qlora run``'s temporary server keeps the
limit's leases in its own memory, so a run SIGKILLed while training would leave its slot taken in
PREFECT_HOME's database for every later bare run, which would then wait forever. Bare runs on one
machine queue on the slot files alone, which the OS releases when a holder dies.

The flow takes ``flows/device_slot.py``'s per-device slot around training and evaluation first, then this
one inside the train stage: always in that order, so two runs never hold one each and wait for the other.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time

from qlora.config.schema import TrainConfig
from qlora.locks import machine_slot

log = logging.getLogger("qlora.flow")


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
    from prefect.settings import PREFECT_API_URL

    if name is None or not PREFECT_API_URL.value():  # turned off, or the temporary server of a bare run
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        limit = ensure_limit(client, name, slots, "train.slots_per_worker")
    if limit.active_slots >= limit.limit:
        log.warning("Prefect concurrency limit %s: %d of %d slot(s) in use; waiting for one", name, limit.active_slots, limit.limit)
    t0 = time.monotonic()
    with concurrency(name, occupy=1, strict=False):
        log.info("Prefect concurrency limit %s: slot acquired (waited %.1f s)", name, time.monotonic() - t0)
        yield


@contextlib.contextmanager
def training_slot(cfg: TrainConfig):
    """Both slots, held for the whole training (the Prefect one first: it may be shared by many machines)."""
    with _prefect_slot(limit_name(cfg), cfg.slots_per_worker), machine_slot(cfg.slots_per_worker):
        yield
