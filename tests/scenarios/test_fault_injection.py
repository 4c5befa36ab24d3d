"""Kill, diverge and lose the tracking server while the real flow runs (issue 4).

The SIGKILL test runs ``python -m flows.cli run`` twice as a subprocess (~8 s of ephemeral Prefect
each): the second run must continue the first one's checkpoint and MLflow run, and end with the
same adapter as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from qlora.config.files import load_config
from tests.conftest import DEMO_DATA, REPO

pytestmark = pytest.mark.e2e
PLANTED_TOKEN = "hf_PLANTEDtokenDoNotLeak0123456789"


def _overrides(tiny_base, tmp_path, **extra) -> dict:
    # 300 real demo rows: tokenizing and the eval split's loss stay well under a second.
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:300]))
    return {
        "workdir": str(tmp_path / "work"),
        "model.name_or_path": str(tiny_base),
        "data.path": str(data),
        "data.max_length": 64,
        "data.eval_fraction": 0.03,
        # Pinned: each process of this test (killed run, re-run, reference) would otherwise time its own
        # compute-dtype probe, and weights are compared across them.
        "quantization.compute_dtype": "float32",
        "train.max_steps": 12,
        "train.per_device_train_batch_size": 8,
        "train.gradient_accumulation_steps": 1,
        "train.learning_rate": 2e-3,
        "train.logging_steps": 1,
        "train.save_steps": 3,
        "train.save_total_limit": 10,
        "lora.r": 8,
        "lora.alpha": 16,
        "lora.dropout": 0.0,
        "eval.max_samples": 4,
        "eval.max_new_tokens": 4,
        "registry.model_name": "tiny-faults",
        "tracking.artifact_location": str(tmp_path / "mlartifacts"),
    } | extra


def _valid_checkpoints(work: Path) -> list[int]:
    from tasks.training.checkpoints import checkpoint_problem

    return sorted(int(c.name.split("-")[1]) for c in work.glob("runs/*/checkpoint-*") if checkpoint_problem(c) is None)


@pytest.mark.slow  # two `qlora run` processes and a reference training: ~50 s
def test_sigkill_then_rerun_ends_as_the_uninterrupted_run(tiny_base, tmp_path, mlflow_store, prefect_home):
    """SIGKILL of `qlora run` (CLI and its temporary Prefect server) once a checkpoint is complete, then the same
    command again: it resumes at that step in the same MLflow run, with its generation-eval history, best-so-far and
    patience counter (eval.every_steps; all in the checkpoint's trainer_state.json), and ends with the weights, the
    evaluations, the early stop and the registered checkpoint of an uninterrupted run of the same config."""
    import torch
    from safetensors.torch import load_file

    from flows.stages import generation_eval
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_adapter

    over = _overrides(tiny_base, tmp_path, **{"eval.every_steps": 3, "train.early_stopping_patience": 2,
                                              "registry.gate_metric": "rouge", "registry.consumer_check_prompts": 0})
    uri = mlflow_store(tmp_path / "mlflow.db")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PREFECT_HOME=prefect_home(tmp_path / "prefect"),
               PYTHONPATH=str(REPO), HF_TOKEN=PLANTED_TOKEN)
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs" / "demo.yaml")]
    cmd += [a for k, v in over.items() for a in ("--set", f"{k}={v}")]
    work = tmp_path / "work"

    # 1. Kill the whole process group (CLI + its ephemeral Prefect server) once a checkpoint is complete.
    with open(tmp_path / "run1.log", "w") as log1:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not _valid_checkpoints(work) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "run1.log").read_text()[-3000:]
    assert not list(work.glob("runs/*/adapter/manifest.json")), "training finished before the kill; nothing was interrupted"
    killed_at = _valid_checkpoints(work)[-1]
    assert 0 < killed_at < 12
    client = mlflow.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("qlora-finetune").experiment_id])
    assert first.info.status == "RUNNING"  # SIGKILL runs no hook; the re-run continues this run

    # 2. Same command again: resumes at that step, continues the same MLflow run, finishes, registers.
    run2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    (tmp_path / "run2.log").write_text(run2.stdout + run2.stderr)
    assert run2.returncode == 0, run2.stderr[-3000:]
    (manifest,) = work.glob("runs/*/adapter/manifest.json")
    resumed = json.loads(manifest.read_text())
    assert resumed["resumed_from_step"] == killed_at
    runs = client.search_runs([first.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.info.run_id]  # one MLflow run across both processes
    assert runs[0].info.status == "FINISHED"
    last = resumed["global_step"]
    steps = {m.step for m in client.get_metric_history(first.info.run_id, "loss")}
    assert {1, last} <= steps and set(range(killed_at + 1, last + 1)) <= steps  # one curve

    # 3. An uninterrupted run of the same config (fixed seed, CPU), trained as the flow trains, on the cached
    # tokens and 4-bit base: the same weights, the same evaluations, the same early stop, the same checkpoint.
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"{k}={v}" for k, v in over.items()])
    data = tokenize_dataset(cfg.data, cfg.model, work)
    base = prepare_quantized_model(cfg.model, cfg.quantization, work)
    ref = train_adapter(base, data, cfg.lora, cfg.train, tmp_path / "ref", during=generation_eval(cfg.train, cfg.eval, cfg.registry.gate_metric, data))
    assert ref.resumed_from_step is None and len(ref.evaluations) >= 2
    got = load_file(str(manifest.parent / "adapter_model.safetensors"))
    want = load_file(str(Path(ref.path) / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in got)
    print(f"max |resumed - uninterrupted| over adapter weights: {worst:.3g}")
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    assert not torch.equal(got[next(iter(got))], torch.zeros_like(got[next(iter(got))]))
    # The whole eval history, not only what the re-run evaluated itself: the steps before the kill came from the checkpoint.
    assert [e["step"] for e in resumed["evaluations"]] == [e["step"] for e in ref.evaluations]
    assert any(e["step"] <= killed_at for e in resumed["evaluations"])
    for g, w in zip(resumed["evaluations"], ref.evaluations):
        assert g["value"] == pytest.approx(w["value"], abs=1e-6)
        assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-5)
    assert last == ref.global_step  # the same early stop (or none): the patience counter survived
    assert (resumed["selected_step"], resumed["selected_by"]) == (ref.selected_step, "task_metric")
    (mv,) = client.search_model_versions("name = 'tiny-faults'")
    assert mv.run_id == first.info.run_id and mv.tags["checkpoint.step"] == str(ref.selected_step)

    # 4. The planted hub token reached no MLflow param/tag/artifact, no log, no checkpoint, no Prefect DB.
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert leaks == []


def test_diverged_flow_fails_once_warns_marks_run_failed_registers_nothing(prefect_server, tiny_base, tmp_path, mlflow_uri, caplog):
    """One whole diverging flow (was two near-identical ones): warned at the start, stopped by the guard at
    step 2-3, the train task not retried, the MLflow run FAILED, nothing registered, no adapter written."""
    import logging
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.finetune import qlora_finetune

    over = _overrides(tiny_base, tmp_path, **{
        "train.learning_rate": 1e9, "train.max_steps": 12, "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 1, "registry.model_name": "garbage",
    })
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    with caplog.at_level(logging.WARNING):
        state = qlora_finetune(config=cfg, return_state=True)
    assert state.is_failed()
    assert "train.learning_rate=1e+09 is far outside" in caplog.text  # warned at the start
    # The weight norm is checked at logs (step 1 here, then 10); by step 3 the gradient is already NaN.
    assert re.search(r"weight norm grew|non-finite gradient in .* at step [23] ", str(state.result(raise_on_failure=False)))

    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    (train,) = [t for t in tasks if t.name.startswith("train")]
    assert train.state.is_failed() and train.run_count == 1  # not retried
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("qlora-finetune").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # none left RUNNING
    assert client.search_registered_models() == []  # no challenger made of garbage
    assert not list((tmp_path / "work").glob("runs/*/adapter"))


def test_mlflow_down_whole_flow_trains_then_fails_clearly(prefect_server, tiny_base, tmp_path, monkeypatch):
    import socket

    from flows import stages
    from flows.finetune import qlora_finetune
    from qlora.errors import TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Same retry policy, no waiting between attempts.
    monkeypatch.setattr(stages, "open_run", stages.open_run.with_options(retry_delay_seconds=0))
    over = _overrides(tiny_base, tmp_path, **{"tracking.uri": f"http://127.0.0.1:{port}", "train.max_steps": 3})
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    state = qlora_finetune(config=cfg, return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, TrackingUnavailable)
    assert f"127.0.0.1:{port} is unreachable" in str(err) and "re-run the same command" in str(err)
    (manifest,) = (tmp_path / "work").glob("runs/*/adapter/manifest.json")  # training completed untracked
    assert json.loads(manifest.read_text())["global_step"] == 3

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    opens = [t for t in tasks if t.name.startswith("open-mlflow-run")]
    assert len(opens) == 2 and all(t.run_count == 3 for t in opens)  # at start and before registering, each retried
    assert not [t for t in tasks if t.name.startswith("register")]


def test_hub_token_from_prefect_secret_block_or_env(prefect_server, monkeypatch):
    from prefect.blocks.system import Secret

    from qlora.config.schema import ModelConfig
    from qlora.errors import ConfigError
    from qlora.models import hf_token

    Secret(value=PLANTED_TOKEN).save("qlora-test-hf-token", overwrite=True)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hf_token(ModelConfig(hf_token_secret="qlora-test-hf-token")) == PLANTED_TOKEN  # the block wins
    assert hf_token(ModelConfig()) == "hf_from_env"
    with pytest.raises(ConfigError, match="model.hf_token_secret: no Prefect Secret block named 'nope'"):
        hf_token(ModelConfig(hf_token_secret="nope"))
