"""The real flow, end to end, on a tiny Llama: Prefect task runs, 4-bit base, MLflow run and registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

from qlora.config.files import load_config
from qlora.template import PROMPT_TEMPLATE
from tests.conftest import DEMO_DATA, REPO, qlora, task_runs

pytestmark = pytest.mark.e2e
STAGES = ["tokenize", "quantize", "train", "evaluate", "register", "report"]


def _config(tiny_base, tmp_path, **extra):
    overrides = {
        "workdir": str(tmp_path / "work"),
        "model.name_or_path": str(tiny_base),
        "data.path": str(DEMO_DATA),
        "data.max_length": 64,
        "data.eval_fraction": 0.02,
        "train.max_steps": 12,
        "train.per_device_train_batch_size": 8,
        "train.gradient_accumulation_steps": 2,
        "train.learning_rate": 2e-3,
        "train.logging_steps": 1,
        "train.save_steps": 6,
        "lora.r": 8,
        "lora.alpha": 16,
        "eval.max_samples": 8,
        "eval.max_new_tokens": 6,
        "registry.model_name": "tiny-e2e",
        "tracking.artifact_location": str(tmp_path / "mlartifacts"),
    } | extra
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _flow_run_name(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).name


def test_flow_end_to_end(prefect_server, tiny_base, tmp_path, mlflow_uri):
    import bitsandbytes as bnb

    from flows.finetune import qlora_finetune
    from qlora.models import load_base
    from registry.consumer import predict

    cfg = _config(tiny_base, tmp_path)
    state = qlora_finetune(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    version = state.result()

    # Five stages (plus opening and closing the MLflow run), each its own completed Prefect task run.
    runs = task_runs(state.state_details.flow_run_id)
    names = [r.name.rsplit("-", 1)[0] for r in runs]
    assert sorted(n for n in names if n in STAGES) == sorted(STAGES)  # each stage exactly once
    assert set(names) - set(STAGES) == {"open-mlflow-run", "close-mlflow-run"}  # plus the run's bookkeeping tasks
    assert all(r.state.is_completed() for r in runs)

    # What people look at: the run report and the eval examples as artifacts of this flow run.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert by_key["tiny-e2e-report"].type == "markdown" and "**Promotion:** kept as challenger" in by_key["tiny-e2e-report"].data
    assert by_key["tiny-e2e-eval-examples"].type == "table"
    assert by_key["data-report"].type == "markdown"  # the data validation report (tokenize task)

    # One MLflow run for the flow run, finished, holding training and eval metrics.
    client = mlflow.MlflowClient(mlflow_uri)
    mv = client.get_model_version(version.name, version.version)
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == _flow_run_name(state.state_details.flow_run_id)
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    m = run.data.metrics
    for k in ("exact_match", "loss", "perplexity"):
        assert f"eval/base/{k}" in m and f"eval/tuned/{k}" in m
    assert "loss" in m and "train_loss" in m  # autologged by the Trainer's MLflow callback
    losses = [h.value for h in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # loss went down
    assert m["eval/tuned/loss"] < m["eval/base/loss"]
    assert run.data.params["optim"] == "adamw_torch_fused"  # train.optim: auto on a CPU
    assert client.get_model_version("tiny-e2e", version.version).tags["train.optim"] == "adamw_torch_fused"
    assert "plots/loss.png" in [f.path for f in client.list_artifacts(run.info.run_id, "plots")]

    # Registered as challenger. A dozen steps on a random 2-layer model leave exact match at 0 for
    # base and tuned alike, so the promotion gate (tuned must beat base beyond noise) keeps champion unset.
    assert version.aliases == ["challenger"]
    assert m["eval/tuned/exact_match"] == m["eval/base/exact_match"] == 0.0
    assert str(client.get_model_version_by_alias("tiny-e2e", "challenger").version) == version.version
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("tiny-e2e", "champion")
    assert "vs base" in version.decision
    mv = client.get_model_version(version.name, version.version)
    assert mv.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert mv.tags["promotion"] == "kept as challenger"
    assert "| exact_match |" in mv.description
    assert m["gate/n"] == 8
    # the same Markdown is the flow run's report in Prefect
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        assert any(a.key == "registry-tiny-e2e" for a in pc.read_latest_artifacts())

    # The base the registered adapter references is the pre-quantized 4-bit checkpoint.
    quantized = [p for p in (tmp_path / "work" / "quantized").iterdir() if p.is_dir()]
    assert len(quantized) == 1
    assert sum(isinstance(x, bnb.nn.Linear4bit) for x in load_base(str(quantized[0]), None).modules()) == 2 * 7
    logged = mlflow.models.Model.load(f"models:/tiny-e2e/{version.version}")
    assert str(quantized[0].resolve()) in json.dumps(logged.flavors["transformers"])
    # consumers get the training template applied for them
    assert logged.metadata["prompt_template"] == PROMPT_TEMPLATE

    # A registry consumer loads models:/name@<alias> and generates.
    prompts = ["Reverse the order of these words: apple river stone", "Reverse the order of these words: lamp tiger"]
    outs = predict("models:/tiny-e2e@challenger", prompts, max_new_tokens=4)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)

    # A second run registers version 2, which takes the challenger alias.
    cfg2 = _config(tiny_base, tmp_path, **{"train.max_steps": 2, "train.save_steps": 100})
    v2 = qlora_finetune(config=cfg2)
    assert int(v2.version) == int(version.version) + 1
    assert str(client.get_model_version_by_alias("tiny-e2e", "challenger").version) == v2.version
    assert v2.aliases == ["challenger"]


@pytest.mark.slow  # a `qlora` process with its temporary Prefect server: ~15 s
def test_cli_bad_data_fails_fast_with_one_line(tmp_path, mlflow_store, prefect_home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_store(tmp_path / "mlflow.db"), PREFECT_HOME=prefect_home(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(REPO / "configs" / "demo.yaml"),
         "--set", f"data.path={bad}", "--set", f"workdir={tmp_path / 'work'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: {bad}:2: malformed JSON line" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Retrying" not in proc.stderr + proc.stdout  # a user error is never retried
    # nothing was registered
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.search_registered_models() == []


@pytest.mark.slow  # a `qlora` process with its temporary Prefect server: ~15 s
def test_bare_run_starts_prefects_temporary_server_early_and_the_flow_reuses_it(tmp_path):
    """Without PREFECT_API_URL, ``qlora run`` starts Prefect's temporary server in a thread while the task
    libraries import (hides 8.7 s of a 29.5 s first tiny run here); the flow then runs on that server,
    not a second one. With PREFECT_API_URL set, nothing is started."""
    code = (
        "from flows.cli import _start_ephemeral_prefect_server as start\n"
        "from prefect import flow, get_client\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "t = start(); t.join()\n"
        "server = SubprocessASGIServer()\n"
        "assert server.running and server.server_process.poll() is None\n"
        "@flow\n"
        "def where():\n"
        "    return str(get_client(sync_client=True).api_url)\n"
        "print('FLOW-API', where(), 'STARTED-API', server.api_url)\n"
    )
    # Prefect's own 20 s wait failed a first start (database creation) in CI; the run waits at least
    # flows.ephemeral.STARTUP_TIMEOUT_S. A 1 s setting shows it: no temporary server comes up in 1 s.
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(REPO),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    flow_api, started_api = out.split("FLOW-API ", 1)[1].split()[0], out.split("STARTED-API ", 1)[1].split()[0]
    assert flow_api.rstrip("/") == started_api.rstrip("/")
    assert out.count("Starting temporary server") == 1
    code = "from flows.cli import _start_ephemeral_prefect_server as start; assert start() is None"
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # a team server; never contacted here
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)


def test_cli_bad_config_names_the_key(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    code, _, err = qlora(capfd, "run", str(REPO / "configs" / "demo.yaml"), "--set", "train.learning_rate=-1")
    assert code == 1
    assert "train.learning_rate" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before anything started


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


@pytest.mark.slow  # a `qlora` process with its temporary Prefect server: ~15 s
def test_sigkill_of_the_run_takes_its_temporary_prefect_server_along(tmp_path, prefect_home):
    """SIGKILL runs no atexit handler, so Prefect never stops the uvicorn server it started: every killed
    `qlora run` left one behind (issue 13, item 6). The server now watches its parent and stops itself."""
    import signal
    import time

    code = (
        "import time\n"
        "from flows.cli import _start_ephemeral_prefect_server as start\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "start().join()\n"
        "server = SubprocessASGIServer()\n"
        "print('SERVER', server.server_process.pid, server.api_url, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PREFECT_HOME=prefect_home(tmp_path / "prefect"), PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("SERVER"), line
        _, pid, api = line.split()
        pid = int(pid)
        import urllib.request

        with urllib.request.urlopen(f"{api}/health", timeout=10) as r:  # it is serving
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGKILL)  # the run only, as the OOM killer or `kill -9 <pid>` would
        proc.wait()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone_after = 30 - (deadline - time.monotonic())
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)  # do not leak it from the test either
    assert not _alive(pid), "the temporary Prefect server outlived its SIGKILLed parent"
    print(f"temporary server gone {gone_after:.1f} s after its parent was killed")


def test_flow_with_generation_eval_registers_the_checkpoint_best_at_the_task(prefect_server, tiny_base, tmp_path, mlflow_uri,
                                                                              monkeypatch):
    """eval.every_steps through the real flow: a LoggedModel per evaluated checkpoint, the best (ties: earliest)
    registered with its checkpoint.* tags, a live progress artifact on the train task run, system metrics and the
    data as run inputs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.finetune import qlora_finetune
    from tasks.training import callbacks

    monkeypatch.setattr(callbacks, "SYSTEM_METRICS_INTERVAL_S", 0.5)  # a tiny run trains for seconds
    cfg = _config(tiny_base, tmp_path, **{"eval.every_steps": 4, "eval.during_samples": 16, "registry.gate_metric": "rouge"})
    state = qlora_finetune(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    version = state.result()
    client = mlflow.MlflowClient(mlflow_uri)
    mv = client.get_model_version(version.name, version.version)
    run = client.get_run(mv.run_id)

    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}' AND model_type = 'peft-lora-checkpoint'")
    by_step = {int(m.tags["checkpoint.step"]): {x.key: x.value for x in m.metrics} for m in models}
    assert sorted(by_step) == [4, 8, 12]
    top = max(v["during_eval/rouge"] for v in by_step.values())
    chosen = min(s for s, v in by_step.items() if v["during_eval/rouge"] == top)
    assert mv.tags["checkpoint.step"] == str(chosen) and mv.tags["checkpoint.selected_by"] == "task_metric"
    assert mv.tags["checkpoint.metric"] == "rouge" and float(mv.tags["checkpoint.value"]) == pytest.approx(top, abs=1e-6)
    assert client.get_logged_model(mv.tags["checkpoint.model_id"]).name == f"checkpoint-{chosen}"
    # The during-training curve in the run too, one point per eval.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "during_eval/rouge")] == [4, 8, 12]

    # MLflow: the data as run inputs (Datasets column) and system metrics while it trained.
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert {"train", "eval", "eval-during-training"} <= set(inputs)
    assert inputs["train"]["mlflow.data.context"] == "training"
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)

    # Prefect: the train task run's progress artifact at 100 %, its last line naming the step and the task metric.
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (progress,) = [a for a in arts if a.key == "train-progress"]
    assert progress.type == "progress" and float(progress.data) == pytest.approx(100.0)
    assert progress.description.startswith("step 12/12: loss ") and "rouge" in progress.description and "ETA" in progress.description
    report = next(a for a in arts if a.key == "data-report").data
    assert "generation eval every 4 steps" in report and "final evaluation" in report
