"""timeouts.<stage>: a stage that waits forever (here the base's download from a server that accepts the
connection and never answers) fails the flow with one message naming the stage and its key, within the
limit on every try, and the limits are no part of the run's identity."""

from __future__ import annotations

import socket
import threading
import time

from qlora.config.files import load_config
from qlora.config.schema import PipelineConfig
from qlora.errors import StageTimeout
from tests.conftest import DEMO_DATA


def _silent_server():
    """A TCP server that accepts every connection and never sends a byte (a hung hub or proxy)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    return srv, stop, held


def test_a_stage_that_hangs_fails_naming_itself_and_its_key(prefect_server, tiny_base, tmp_path, monkeypatch, mlflow_uri):
    from flows import stages
    from flows.finetune import qlora_finetune

    srv, stop, held = _silent_server()
    port = srv.getsockname()[1]

    def hanging_download(model, quant, workdir):  # the base download: connects, then waits for an answer
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET /api/models/org/name HTTP/1.1\r\nHost: hub\r\n\r\n")
            c.recv(1)  # never answered: blocks in the kernel until the stage's limit interrupts it
        raise AssertionError("the silent server answered")

    monkeypatch.setattr(stages, "prepare_quantized_model", hanging_download)
    monkeypatch.setattr(stages, "quantize", stages.quantize.with_options(retry_delay_seconds=0))  # same retries, no waits
    cfg = load_config(None, [f"model.name_or_path={tiny_base}", f"data.path={DEMO_DATA}", f"workdir={tmp_path / 'work'}",
                             "timeouts.quantize=1.5", "train.max_steps=2"])
    t0 = time.monotonic()
    try:
        state = qlora_finetune(config=cfg, return_state=True)
    finally:
        stop.set()
        srv.close()
        for c in held:
            c.close()
    took = time.monotonic() - t0
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, StageTimeout), repr(err)
    assert str(err).startswith("stage quantize did not finish within timeouts.quantize=1.5 s (on every try)")
    assert len(held) == 3  # the first try and quantize's two retries, each cut at its limit
    assert took < 60, took  # not forever: three tries of 1.5 s plus the flow's own start and stop
    assert not list((tmp_path / "work").glob("runs/*"))  # nothing after the hung stage ran


def test_limits_are_not_part_of_the_runs_identity():
    a = PipelineConfig()
    b = PipelineConfig.model_validate({"timeouts": {"train": 60, "registry": None}})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != PipelineConfig.model_validate({"train": {"max_steps": 7}}).fingerprint()
