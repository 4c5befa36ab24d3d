"""The device slot (flows/device_slot.py) against a real Prefect API: a missing limit costs nothing, an existing
one queues a second holder until the first leaves."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from flows import device_slot as ds


def test_missing_limit_never_blocks_and_an_existing_one_queues(prefect_server, monkeypatch, caplog):
    from prefect.concurrency.sync import concurrency

    name = f"qlora-device-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(ds, "device_limit_name", lambda: name)

    # No limit (a bare `qlora run` on Prefect's temporary server): straight through, and no Prefect warning.
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING), ds.device_slot():
        pass
    assert time.perf_counter() - t0 < 5 and "do not exist" not in caplog.text

    assert ds.ensure_device_limit() == name == ds.ensure_device_limit()  # created once, then found
    # Another flow run (here: a thread holding the limit directly, not this process's lock) holds the slot.
    held, release = threading.Event(), threading.Event()

    def other_holder():
        with concurrency(name, occupy=1, strict=True):
            held.set()
            release.wait(30)

    other = threading.Thread(target=other_holder)
    other.start()
    assert held.wait(30)
    threading.Timer(3.0, release.set).start()
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    caplog.set_level(logging.INFO, logger="qlora.device")
    logging.getLogger("qlora.device").addHandler(handler)  # caplog's own handler does not see it under Prefect's config
    t0 = time.perf_counter()
    try:
        with ds.device_slot():
            waited = time.perf_counter() - t0
    finally:
        logging.getLogger("qlora.device").removeHandler(handler)
    other.join(30)
    assert waited >= 2.5, waited  # queued until the other holder left
    assert any(m.startswith(f"waiting for the device slot {name} (1/1 taken") for m in said), said
