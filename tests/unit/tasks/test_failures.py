"""Fault injection on the plain training/registry functions (no Prefect): issue 4's failure semantics.

Each test breaks one thing for real (a truncated file, an absurd learning rate, a closed port, a held
lock); only CUDA OOM is simulated, since no GPU exists here.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from qlora.config.schema import LoraSection, RegistryConfig, TrackingConfig, TrainConfig
from qlora.errors import ConfigError, DataError, TrackingUnavailable, TrainingDiverged, is_transient
from qlora.refs import MlflowRun
from tasks.train import run_dir_for, train_adapter
from tasks.training.checkpoints import checkpoint_problem, latest_valid_checkpoint

LORA = LoraSection(r=4, alpha=8, dropout=0.0)


def _train(**kw) -> TrainConfig:
    return TrainConfig(**({"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                           "learning_rate": 2e-3, "logging_steps": 1, "save_steps": 2, "save_total_limit": 3} | kw))


@pytest.fixture
def closed_port_uri(monkeypatch) -> str:
    """An http tracking URI on a loopback port nobody listens on; MLflow's own retries off so it fails fast."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_retry_classification(closed_port_uri):
    import mlflow

    with pytest.raises(mlflow.exceptions.MlflowException) as dead:
        mlflow.MlflowClient(closed_port_uri).get_run("0" * 32)
    assert is_transient(dead.value)  # connection refused, wrapped by MLflow
    assert is_transient(ConnectionError("reset")) and is_transient(OSError("disk")) and is_transient(TimeoutError())
    rest5xx = mlflow.exceptions.RestException({"error_code": "INTERNAL_ERROR", "message": "boom"})
    assert rest5xx.get_http_status_code() == 500 and is_transient(rest5xx)
    rest4xx = mlflow.exceptions.RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"})
    assert not is_transient(rest4xx)
    assert not is_transient(mlflow.exceptions.MlflowException("Invalid model signature"))  # defaults to code 500
    for never in (ConfigError("x"), DataError("x"), TrainingDiverged("nan"), ValueError(), TypeError(), AssertionError(), KeyError("k")):
        assert not is_transient(never), never


def test_corrupt_newest_checkpoint_falls_back(prepared, tmp_path, caplog):
    work, _, data, base = prepared
    train = _train()
    a = train_adapter(base, data, LORA, train, work)
    run_dir = Path(a.run_dir)
    assert checkpoint_problem(run_dir / "checkpoint-4") is None

    def truncate(c):
        f = c / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    corruptions = {
        "adapter_model.safetensors unreadable": truncate,
        "optimizer.pt missing": lambda c: (c / "optimizer.pt").unlink(),
        "trainer_state.json unparseable": lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hi'),
    }
    for expected, corrupt in corruptions.items():
        copy = tmp_path / expected.split()[0]
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("adapter", ".lock"))
        corrupt(copy / "checkpoint-4")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qlora.train"):
            assert latest_valid_checkpoint(copy) == str(copy / "checkpoint-2")
        assert expected in caplog.text and "checkpoint-4" in caplog.text

    # And training really resumes from the fallback: truncate the newest, drop the adapter, re-run.
    shutil.rmtree(run_dir / "adapter")
    truncate(run_dir / "checkpoint-4")
    b = train_adapter(base, data, LORA, train, work)
    assert b.resumed_from_step == 2 and b.global_step == 4


def test_non_finite_loss_stops_without_retry_or_adapter(prepared):
    work, _, data, base = prepared
    train = _train(learning_rate=1e37, warmup_steps=0, max_steps=10, save_steps=100, optim="adamw_torch")
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at step \d+ .*train.learning_rate=1e\+37") as e:
        train_adapter(base, data, LORA, train, work)
    assert not is_transient(e.value)  # a Prefect retry would only diverge again
    run_dir = run_dir_for(base, data, LORA, train, work)
    assert not (run_dir / "adapter").exists()
    step = int(str(e.value).split(" at step ")[1].split()[0])
    assert step < 10  # stopped at once, not at max_steps


def test_cuda_oom_retries_once_with_half_batch(prepared, monkeypatch, caplog, mlflow_uri):
    import mlflow
    import torch
    from transformers import Trainer

    from qlora.tracking.runs import start_run

    work, _, data, base = prepared
    run = start_run(TrackingConfig(uri=mlflow_uri), "oom")
    real_step = Trainer.training_step
    raised = []

    def oom_once(self, *a, **kw):  # the one mock in this file: there is no GPU to run out of
        if not raised:
            raised.append(self.args.per_device_train_batch_size)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", oom_once)
    train = _train(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-3)
    with caplog.at_level(logging.WARNING, logger="qlora.train"):
        a = train_adapter(base, data, LORA, train, work, run=run)
    assert raised == [4] and a.global_step == 2
    assert "per_device_train_batch_size=2, gradient_accumulation_steps=2 (same effective batch)" in caplog.text
    state = json.loads((Path(a.run_dir) / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2
    mlflow.flush_async_logging()
    client = mlflow.MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]  # still tracked after the retry
    tracked = client.get_run(run.run_id).data
    assert tracked.params["gradient_accumulation_steps"] == "1"  # MLflow params are immutable ...
    assert tracked.tags["qlora.oom_retry"] == "per_device_train_batch_size=2,gradient_accumulation_steps=2"  # ... so a tag says


def test_same_config_twice_at_once_is_serialised_by_the_run_dir_lock(prepared, caplog):
    work, _, data, base = prepared
    from transformers import TrainerCallback

    from qlora.locks import POLL_S

    class Slow(TrainerCallback):
        """Whoever trains holds the run dir for several of the waiter's polls: 4 tiny steps take 0.3 s on a
        fast CPU, under the one poll after which a waiter says who holds the lock."""

        def on_train_begin(self, args, state, control, **kw):
            time.sleep(4 * POLL_S)

    train = _train(max_steps=4, save_steps=2, learning_rate=5e-4)
    results, errors = {}, []

    def go(name):
        try:
            results[name] = train_adapter(base, data, LORA, train, work, callbacks=(Slow(),))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    with caplog.at_level(logging.INFO, logger="qlora.train"), caplog.at_level(logging.INFO, logger="qlora.locks"):
        threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert results["a"] == results["b"]  # one trained, the other waited and reused the finished adapter
    assert "another run of the same config is training in it): held by .lock: pid" in caplog.text
    assert caplog.text.count("already trained for this exact config") == 1
    run_dir = Path(results["a"].run_dir)
    for c in ("checkpoint-2", "checkpoint-4"):
        assert checkpoint_problem(run_dir / c) is None
    state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]  # one writer, one curve


def test_mlflow_down_training_completes_and_registration_fails_clearly(prepared, closed_port_uri, tmp_path):
    from qlora.tracking.runs import start_or_resume_run
    from registry.register import register_adapter

    work, _, data, base = prepared
    dead = MlflowRun(tracking_uri=closed_port_uri, run_id="0" * 32)
    a = train_adapter(base, data, LORA, _train(max_steps=2, learning_rate=3e-3), work, run=dead)
    assert a.global_step == 2 and Path(a.path, "adapter_model.safetensors").is_file()

    with pytest.raises(TrackingUnavailable, match="unreachable.*Nothing was registered.*re-run the same command") as e:
        start_or_resume_run(TrackingConfig(uri=closed_port_uri), tmp_path, "k", "r")
    assert is_transient(e.value)  # so the open-mlflow-run task retries it
    from flows.stages import close_run
    from qlora.refs import RegisteredVersion
    from qlora.tracking.runs import end_run

    end_run(dead, "FAILED")  # a failed flow run's close: one warning, the flow's own error stays what it was
    version = RegisteredVersion(name="x", version="3", model_uri="models:/m-1", aliases=["challenger"])
    with pytest.raises(TrackingUnavailable, match=r"marking MLflow run 0+ FINISHED.*x v3 is registered.*re-run") as c:
        close_run.fn(dead, version)  # a successful one's: raised, for the task's retries and then the flow run
    assert is_transient(c.value)
    with pytest.raises(Exception) as reg:
        register_adapter(base, a, None, RegistryConfig(model_name="x"), dead)
    assert is_transient(reg.value)  # the register task retries it


def test_mlflow_dying_mid_training_does_not_kill_it(prepared, mlflow_uri, monkeypatch, caplog):
    import mlflow
    import requests

    from qlora.tracking.runs import start_run

    work, _, data, base = prepared
    run = start_run(TrackingConfig(uri=mlflow_uri), "mid-run-outage")
    real = mlflow.log_metrics
    calls = []

    def dies_after_two(*a, **kw):  # the server vanishes after two logged steps
        calls.append(kw.get("step"))
        if len(calls) > 2:
            try:
                raise requests.ConnectionError("Connection refused")
            except requests.ConnectionError:
                raise mlflow.exceptions.MlflowException("API request to /api/2.0/mlflow/runs/log-batch failed")
        return real(*a, **kw)

    monkeypatch.setattr(mlflow, "log_metrics", dies_after_two)
    with caplog.at_level(logging.WARNING, logger="qlora"):
        a = train_adapter(base, data, LORA, _train(max_steps=5, save_steps=5, learning_rate=4e-3), work, run=run)
    assert a.global_step == 5
    assert caplog.text.count("the run goes on untracked") == 1  # one warning (qlora/tracking/outage.py), training goes on
    mlflow.flush_async_logging()
    steps = [m.step for m in mlflow.MlflowClient(mlflow_uri).get_metric_history(run.run_id, "loss")]
    assert steps == [1, 2]


def test_register_is_idempotent_per_run(prepared, mlflow_uri, tmp_path):
    import mlflow

    from qlora.config.schema import EvalConfig
    from qlora.tracking.runs import start_run
    from registry.register import register_adapter
    from tasks.evaluate import evaluate_adapter

    work, _, data, base = prepared
    a = train_adapter(base, data, LORA, _train(max_steps=1, save_steps=1, learning_rate=1e-3), work)
    run = start_run(TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "art")), "reg")
    report = evaluate_adapter(base, a, data, EvalConfig(max_samples=4, max_new_tokens=4, batch_size=4), run)
    cfg = RegistryConfig(model_name="idem")
    v1 = register_adapter(base, a, report, cfg, run)
    v2 = register_adapter(base, a, report, cfg, run)  # a retried or re-run register task
    assert v1.version == v2.version == "1"
    assert len(mlflow.MlflowClient(mlflow_uri).search_model_versions("name = 'idem'")) == 1


def test_early_stopping_on_eval_loss(prepared):
    work, _, data, base = prepared
    # lr 1e-12: the adapter barely moves, eval loss soon stops improving and patience 1 ends the run.
    train = _train(max_steps=20, save_steps=1, learning_rate=1e-12, early_stopping_patience=1)
    a = train_adapter(base, data, LORA, train, work)
    assert a.global_step < 20
    state = json.loads((Path(a.run_dir) / f"checkpoint-{a.global_step}" / "trainer_state.json").read_text())
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert len(evals) == a.global_step  # one eval per save
    assert evals[-1] >= min(evals[:-1])  # stopped on the first eval that did not improve (patience 1)
    assert all(b < a_ for a_, b in zip(evals[:-2], evals[1:-1]))


def test_failed_flow_hook_marks_its_running_runs_failed(mlflow_uri, tmp_path):
    import mlflow

    from qlora.tracking.runs import fail_runs_of_flow_run, start_run

    cfg = TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "art"))
    mine = start_run(cfg, "crashed", tags={"prefect.flow_run_id": "fr-1"})
    other = start_run(cfg, "another flow run", tags={"prefect.flow_run_id": "fr-2"})
    assert fail_runs_of_flow_run(cfg, "fr-1") == [mine.run_id]
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(mine.run_id).info.status == "FAILED"
    assert client.get_run(other.run_id).info.status == "RUNNING"
