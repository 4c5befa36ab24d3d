"""A 2x2 sweep from the CLI on a tiny Llama (real Prefect flow runs, real 4-bit, real MLflow store and registry),
then `qlora reproduce` of the version it registered: identical, or refused when the data or base changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import pytest

from tests.conftest import DEMO_DATA, REPO, task_runs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # four trials and a reproduce: ~105 s
GRID = ["--grid", "train.learning_rate=1e-4,2e-3", "--grid", "lora.r=4,8"]


def _sets(tmp, data, base) -> list[str]:
    values = {
        "workdir": tmp / "work", "model.name_or_path": base, "data.path": data, "data.max_length": 64,
        "data.eval_fraction": 0.02, "train.max_steps": 3, "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 1, "train.logging_steps": 1, "train.save_steps": 100,
        "eval.max_samples": 4, "eval.max_new_tokens": 4, "registry.model_name": "tiny-sweep",
        # float32 compute: the adapter is then bit-identical on any CPU (tests/unit/registry/test_reproducible.py)
        "quantization.compute_dtype": "float32", "tracking.artifact_location": tmp / "mlartifacts",
    }
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _cli(env, cwd, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def swept(prefect_server, tiny_base, tmp_path_factory, mlflow_store):
    """`qlora sweep` in a subprocess against the session's Prefect server (so its flow runs can be read back);
    data and base are copies, so the reproduce tests may change them."""
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("sweep")
    data, base = tmp / "reverse_words.jsonl", tmp / "base"
    shutil.copy(DEMO_DATA, data)
    shutil.copytree(tiny_base, base)
    uri = mlflow_store(tmp / "mlflow.db")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": PREFECT_API_URL.value()}
    t0 = time.monotonic()
    proc = _cli(env, tmp, "sweep", str(REPO / "configs" / "demo.yaml"), *GRID, *_sets(tmp, data, base), "--max-parallel", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return SimpleNamespace(proc=proc, tmp=tmp, uri=uri, env=env, data=data, base=base, wall_s=time.monotonic() - t0)


def _flow_runs(**filters):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(**filters))


def test_cli_sweep_four_trials_one_parent_one_version(swept):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    client = mlflow.MlflowClient(swept.uri)
    runs = client.search_runs([client.get_experiment_by_name("qlora-finetune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and len(runs) == 5
    assert {(r.data.params["sweep.train.learning_rate"], r.data.params["sweep.lora.r"]) for r in trials} == {
        ("0.0001", "4"), ("0.0001", "8"), ("0.002", "4"), ("0.002", "8")}  # flat params: parallel coordinates
    assert all({"eval/tuned/exact_match", "eval/tuned/loss", "train_loss"} <= set(r.data.metrics) for r in trials)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "sweep/trials.json" in [f.path for f in client.list_artifacts(parent.info.run_id, "sweep")]
    assert parent.data.metrics["sweep/completed"] == 4 and "best/eval/tuned/exact_match" in parent.data.metrics

    # Exactly one version, from the best trial's run: exact match ties at 0 on a random tiny model, so the
    # lower eval loss decides; the other trials stay runs.
    (mv,) = client.search_model_versions("name='tiny-sweep'")
    best = min(trials, key=lambda r: (-r.data.metrics["eval/tuned/exact_match"], r.data.metrics["eval/tuned/loss"]))
    assert mv.run_id == best.info.run_id == parent.data.tags["sweep.best_run_id"]
    assert mv.tags["promotion"] == "kept as challenger" and "vs base" in mv.tags["promotion.reason"]  # the same gate
    table = swept.proc.stdout.split("| trial |", 1)[1]
    assert table.count("| COMPLETED |") == 4 and table.count("| yes |") == 1
    assert f"registered tiny-sweep version {mv.version}" in swept.proc.stdout

    # Prefect: the sweep flow run and its four trial flow runs, each linked to it.
    sweep_run = next(r for r in _flow_runs() if str(r.id) == parent.data.tags["prefect.flow_run_id"])
    assert sweep_run.state.is_completed()
    children = _flow_runs(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sweep_run.id]))
    assert sorted(c.name for c in children) == sorted(f"{sweep_run.name}-trial-{i}" for i in range(4))
    assert all(c.state.is_completed() for c in children)
    assert {str(c.id) for c in children} == {r.data.tags["prefect.flow_run_id"] for r in trials}
    with get_client(sync_client=True) as pc:
        art = next(a for a in pc.read_latest_artifacts() if a.key == "tiny-sweep-sweep")
        assert len(json.loads(art.data)) == 4
        logs = {c.id: " | ".join(entry.message for entry in pc.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[c.id])), limit=200)) for c in children}
        trains = pc.read_task_runs(flow_run_filter=None, task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-")))
    trains = [t for t in trains if t.flow_run_id in logs]

    # Tokenize and quantize ran once: every other trial waited for the cache entry, then hit it.
    wrote = [i for i, text in logs.items() if "tokenized data cache hit" not in text]
    assert len(wrote) == 1 and "quantized " in logs[wrote[0]]
    for i, text in logs.items():
        if i != wrote[0]:
            assert "tokenized data cache hit" in text and "pre-quantized checkpoint cache hit" in text, text[-2000:]
    second = sorted(children, key=lambda c: c.start_time)[1]
    assert "cache hit" in logs[second.id]

    # --max-parallel 2 is real (two trials in flight at once), and the device slot kept trainings one at a time. A
    # trial's MLflow run is opened as its thread takes it, before its flow run starts; under load (the other xdist
    # worker's chaos run) the second flow run once started only as the first ended (trials are ~5 s), while its
    # MLflow run had long been opened. With --max-parallel 1 neither happens before the first trial ends.
    spans = sorted((c.start_time, c.end_time) for c in children)
    opened = sorted(r.info.start_time / 1000 for r in trials)
    first_end = min(c.end_time.timestamp() for c in children)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])) or opened[1] < first_end, (spans, opened, first_end)
    assert len(trains) == 4
    t_spans = sorted((t.start_time, t.end_time) for t in trains)
    assert all(b[0] >= a[1] for a, b in zip(t_spans, t_spans[1:])), t_spans
    durations = sorted(round((c.end_time - c.start_time).total_seconds(), 1) for c in children)
    print(f"sweep wall {swept.wall_s:.1f} s; trial flow runs {durations} s")


def test_reproduce_the_registered_version_is_identical(swept):
    runs_before = sorted(p.name for p in (swept.tmp / "work" / "runs").iterdir())
    proc = _cli(swept.env, swept.tmp, "reproduce", "models:/tiny-sweep/1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("identical: tiny-sweep v1 rebuilt, sha256 ") and "max abs difference 0 over" in line
    sha = line.split("sha256 ", 1)[1].split("...")[0]
    assert f"= registered {sha}" in line
    # Trained in a fresh workdir; the original run dirs were not touched (nor reused: 3 steps were trained).
    assert sorted(p.name for p in (swept.tmp / "work" / "runs").iterdir()) == runs_before
    (fresh,) = (swept.tmp / "work" / "reproduce").iterdir()
    assert fresh.name.startswith("tiny-sweep-v1-") and list((fresh / "runs").glob("*/adapter/adapter_model.safetensors"))
    assert "trained 3 steps" in proc.stderr


def test_reproduce_a_checkpoint_chosen_during_training_is_identical(swept):
    """eval.every_steps with early stopping: the registered adapter is an early checkpoint, not max_steps'. Reproduce
    trains the same steps and selects the same checkpoint (it hands the train stage the eval section, as `qlora run`
    does; it once did not, and trained all max_steps: "differs", exit 3)."""
    chosen = ["--set", "registry.model_name=tiny-chosen", "--set", "train.max_steps=6", "--set", "eval.every_steps=1",
              "--set", "train.early_stopping_patience=1"]
    proc = _cli(swept.env, swept.tmp, "run", str(REPO / "configs" / "demo.yaml"), *_sets(swept.tmp, swept.data, swept.base), *chosen)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (mv,) = mlflow.MlflowClient(swept.uri).search_model_versions("name='tiny-chosen'")
    step = int(mv.tags["checkpoint.step"])
    assert step < 6 and mv.tags["checkpoint.selected_by"] == "task_metric"  # exact match ties at 0: the earliest

    proc = _cli(swept.env, swept.tmp, "reproduce", "models:/tiny-chosen/1", "--workdir", str(swept.tmp / "r-chosen"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("identical: tiny-chosen v1 rebuilt") and "max abs difference 0 over" in line


def test_reproduce_refuses_when_data_or_base_changed(swept):
    original = swept.data.read_bytes()
    swept.data.write_bytes(original.replace(b"tiger", b"tigre", 1))
    try:
        proc = _cli(swept.env, swept.tmp, "reproduce", "models:/tiny-sweep/1", "--workdir", str(swept.tmp / "r-data"))
    finally:
        swept.data.write_bytes(original)
    assert proc.returncode == 4, proc.stderr[-3000:]  # refused, not "differs" (3)
    assert f"error: data {swept.data}: no longer matches v1's data.fingerprint" in proc.stderr
    assert "nothing was trained" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((swept.tmp / "r-data").glob("runs/*"))

    gen = swept.base / "generation_config.json"
    kept = gen.read_text()
    gen.write_text(kept.replace("{", '{"_edited": true,', 1))
    try:
        proc = _cli(swept.env, swept.tmp, "reproduce", "models:/tiny-sweep/1", "--workdir", str(swept.tmp / "r-base"))
    finally:
        gen.write_text(kept)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert f"error: model.name_or_path {swept.base}: the base no longer matches v1's base.fingerprint" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _cli(swept.env, swept.tmp, "reproduce", "models:/tiny-sweep/9")
    assert proc.returncode == 1 and "error: models:/tiny-sweep/9: no such model version" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tpe_sweep_runs_the_asked_trials_in_process(prefect_server, tiny_base, tmp_path, mlflow_uri):
    """--sampler tpe: Optuna (the optional `sweep` extra) picks 3 of the 4 grid points, in batches."""
    pytest.importorskip("optuna")
    from flows.sweep import qlora_sweep
    from flows.sweep_plan import SweepConfig
    from qlora.config.files import load_config

    cfg = load_config(None, _sets(tmp_path, DEMO_DATA, tiny_base)[1::2] + ["registry.model_name=tiny-tpe"])
    sweep = SweepConfig(grid={"train.learning_rate": [1e-4, 2e-3], "lora.r": [4, 8]}, sampler="tpe", trials=3, max_parallel=2)
    state = qlora_sweep(config=cfg, sweep=sweep, return_state=True)
    result = state.result()
    assert [r["trial"] for r in result.rows] == [0, 1, 2] and all(r["status"] == "COMPLETED" for r in result.rows)
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("qlora-finetune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 3
    assert parent.data.tags["sweep.sampler"] == "tpe"
    (mv,) = client.search_model_versions("name='tiny-tpe'")
    assert mv.run_id == parent.data.tags["sweep.best_run_id"] and result.version.version == str(mv.version)
    # The winner's run and the parent are both closed by the retried close-mlflow-run task (a one-try end_run left
    # the parent RUNNING when the server was away at that moment), and both are FINISHED.
    assert parent.info.status == client.get_run(mv.run_id).info.status == "FINISHED"
    assert _closes(state.state_details.flow_run_id) == 2


def _closes(flow_run_id) -> int:
    """Completed close-mlflow-run task runs of the flow run."""
    def closed(runs) -> int:
        return sum(r.name.startswith("close-mlflow-run") and r.state is not None and r.state.is_completed() for r in runs)

    return closed(task_runs(flow_run_id, until=lambda runs: closed(runs) >= 2))


def test_a_failed_trial_is_a_row_and_the_best_of_the_rest_is_registered(prefect_server, tiny_base, tmp_path, mlflow_uri):
    """data.max_length=9 leaves no trainable token in any demo row: that trial fails in tokenize (a DataError),
    its child run is FAILED, and the sweep still registers the trial that worked. All failed: nothing registered."""
    from flows.sweep import qlora_sweep
    from flows.sweep_plan import SweepConfig
    from qlora.config.files import load_config
    from qlora.errors import UserError

    cfg = load_config(None, _sets(tmp_path, DEMO_DATA, tiny_base)[1::2] + ["registry.model_name=tiny-fail"])
    result = qlora_sweep(config=cfg, sweep=SweepConfig(grid={"data.max_length": [9, 64]}))
    failed, ok = result.rows
    assert (failed["status"], ok["status"], ok["best"]) == ("FAILED", "COMPLETED", "yes")
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(failed["mlflow_run"]).info.status == "FAILED"
    (mv,) = client.search_model_versions("name='tiny-fail'")
    assert mv.run_id == ok["mlflow_run"]

    state = qlora_sweep(config=cfg, sweep=SweepConfig(grid={"data.max_length": [9, 10]}), return_state=True)
    assert state.is_failed() and "all 2 trials failed, nothing to register: trial 0:" in state.message
    with pytest.raises(UserError):
        state.result()
    assert len(client.search_model_versions("name='tiny-fail'")) == 1
