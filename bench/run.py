"""``make bench``: what orchestration costs and how fast training runs, as ratios measured together.

Every figure is a ratio of two things measured in the same run (this machine is noisy); absolute
seconds are context only. Writes ``bench/results.json`` and prints a Markdown table.

1. orchestration overhead: the demo config through the full flow (Prefect + MLflow + registry)
   vs. the same tokenize/quantize/train/evaluate work as plain calls in one process; the flow both
   with Prefect's ephemeral server (a bare ``qlora run``) and against a running Prefect server
2. warm re-run: the same command again; unchanged data, tokenizer and base are cache hits
3. trainer overhead: steps/s through our training stage vs. a minimal PEFT loop
4. data: tokenization throughput vs. a bare batched tokenizer call; padding efficiency
5. memory: peak RSS of the demo flow vs. the base model's bf16 size
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"


def timed_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and combined output of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(out[-5000:])
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)} (exit {proc.returncode})")
    return wall, usage.ru_maxrss * 1024, out


def server_start_seconds(log: str) -> tuple[float, float] | tuple[None, None]:
    """Ephemeral Prefect server start, and the part of it the run waited for (``qlora run`` starts
    it while importing the task libraries), read off the CLI's own log line."""
    m = re.search(r"Prefect temporary server up in ([\d.]+) s, ([\d.]+) s of it not hidden", log)
    return (float(m.group(1)), float(m.group(2))) if m else (None, None)


class PrefectServer:
    """``prefect server start`` on loopback with its own PREFECT_HOME: how teams run flows (``make server``).

    A flow run against it skips the ephemeral server that a bare ``qlora run`` starts and stops."""

    def __init__(self, home: Path, env: dict[str, str]):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(env, PREFECT_HOME=str(home), PREFECT_API_URL=self.api)
        self.log = open(home.parent / "prefect-server.log", "w")
        self.proc = None

    def __enter__(self) -> "PrefectServer":
        import urllib.request

        prefect = Path(sys.executable).parent / "prefect"
        self.proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise SystemExit("the Prefect server did not become healthy in 180 s (see .qlora/bench/prefect-server.log)")

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def train_loop_seconds(log: str) -> float:
    """The Trainer's own ``train_runtime`` (its training loop), printed by its progress callback."""
    m = re.findall(r"'train_runtime': '?([\d.]+)", log)
    if not m:
        raise SystemExit("benchmark: no train_runtime in the output (was training skipped?)")
    return float(m[-1])


def bf16_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    return 2 * n


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def main() -> None:
    root = REPO / ".qlora" / "bench"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    py = sys.executable
    results: dict[str, dict] = {}

    # 1 + 2: plain calls vs the flow, each cold (fresh workdir) then warm (same workdir again).
    plain_cmd = [py, "-m", "bench.plain", CONFIG, "--set", f"workdir={root / 'plain'}"]
    flow_cmd = [py, "-m", "flows.cli", "run", CONFIG, "--set", f"workdir={root / 'flow'}",
                "--set", f"tracking.artifact_location={root / 'mlartifacts'}"]
    plain_cold, _, plain_log = timed_child(plain_cmd, env)
    plain_stages = json.loads(plain_log.split("BENCH ", 1)[1].splitlines()[0])
    plain_warm, _, warm_log = timed_child(plain_cmd, env)
    warm_stages = json.loads(warm_log.split("BENCH ", 1)[1].splitlines()[0])
    flow_cold, flow_rss, flow_log = timed_child(flow_cmd, env)
    flow_warm, _, flow_warm_log = timed_child(flow_cmd, env)
    # The same cold flow against a running Prefect server (team mode: `make server`, deployments, workers).
    (root / "prefect-server").mkdir()
    with PrefectServer(root / "prefect-server", env) as server:
        server_cmd = [a.replace(str(root / "flow"), str(root / "flow-server")) for a in flow_cmd]
        # Its own MLflow store too, registry empty as in the first cold run; but, as with a running tracking
        # server, the store exists: its schema is created before timing (a fresh sqlite store costs ~2.4 s
        # of migrations on the first MlflowClient, measured with cProfile).
        tracking = f"sqlite:///{root / 'mlflow-server.db'}"
        subprocess.run([py, "-c", f"import mlflow; mlflow.MlflowClient({tracking!r}).search_experiments()"],
                       env=env, check=True, capture_output=True)
        flow_server, _, server_log = timed_child(server_cmd, dict(server.env, MLFLOW_TRACKING_URI=tracking))

    cold_prep = plain_stages["tokenize"] + plain_stages["quantize"]
    warm_prep = warm_stages["tokenize"] + warm_stages["quantize"]
    # The training loop is ~90% of both runs and its speed drifts by several % between runs on this
    # machine, which swamps a 10 s overhead. So the overhead is also computed outside the loop: each
    # run's wall time minus its own Trainer train_runtime, flow minus plain.
    plain_loop = train_loop_seconds(plain_log)
    fixed_eph = (flow_cold - train_loop_seconds(flow_log)) - (plain_cold - plain_loop)
    fixed_srv = (flow_server - train_loop_seconds(server_log)) - (plain_cold - plain_loop)
    cold_start, warm_start = server_start_seconds(flow_log), server_start_seconds(flow_warm_log)
    results["orchestration"] = {
        "plain_s": round(plain_cold, 1), "flow_s": round(flow_cold, 1),
        "ratio": round(flow_cold / plain_cold, 3), "fixed_cost_s": round(flow_cold - plain_cold, 1),
        "prefect_server_start_s": cold_start[0], "goal": "<= 1.10 (later 1.05)",
        "prefect_server_start_not_hidden_s": cold_start[1],
        # The second run reuses PREFECT_HOME, so its ephemeral server skips creating the database.
        "prefect_server_start_warm_home_s": warm_start[0],
        "prefect_server_start_warm_home_not_hidden_s": warm_start[1],
        "flow_with_running_server_s": round(flow_server, 1), "ratio_with_running_server": round(flow_server / plain_cold, 3),
        "fixed_cost_with_running_server_s": round(flow_server - plain_cold, 1),
        "train_loop_s": {"plain": plain_loop, "flow": train_loop_seconds(flow_log), "flow_running_server": train_loop_seconds(server_log)},
        "fixed_cost_outside_train_loop_s": round(fixed_eph, 1),
        "ratio_outside_train_loop": round((plain_cold + fixed_eph) / plain_cold, 3),
        "fixed_cost_outside_train_loop_running_server_s": round(fixed_srv, 1),
        "ratio_outside_train_loop_running_server": round((plain_cold + fixed_srv) / plain_cold, 3),
    }
    results["warm_rerun"] = {
        "tokenize_quantize_cold_s": round(cold_prep, 2), "tokenize_quantize_warm_s": round(warm_prep, 2),
        "stage_ratio": round(warm_prep / cold_prep, 3), "flow_cold_s": round(flow_cold, 1), "flow_warm_s": round(flow_warm, 1),
        "flow_ratio": round(flow_warm / flow_cold, 3), "goal": "stage_ratio <= 0.05",
    }

    # 3: trainer vs minimal loop, in this process.
    from bench.trainer_overhead import measure

    results["trainer"] = {k: round(v, 3) for k, v in measure(CONFIG, root / "trainer").items()} | {"goal": ">= 0.95"}

    # 4: data: padding efficiency and tokenization throughput on Code Alpaca (bench/data.py).
    from bench import data as data_bench

    results["data"] = data_bench.run(str(REPO / "data" / "public" / "code_alpaca_2k.json"),
                                     str(REPO / ".qlora" / "demo-base"))

    # 5: memory.
    base_dir = REPO / ".qlora" / "demo-base"
    results["memory"] = {
        "flow_peak_rss_mb": round(flow_rss / 2**20, 1), "base_bf16_mb": round(bf16_bytes(base_dir) / 2**20, 2),
        "ratio": round(flow_rss / bf16_bytes(base_dir), 1),
    }
    results["context"] = {"cpu_count": os.cpu_count(), "tuned_exact_match_plain": plain_stages["tuned_exact_match"],
                          "date": datetime.now().isoformat(timespec="seconds")}

    (REPO / "bench" / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| measure | value | goal |\n|---|---|---|")
    rows = [
        ("orchestration wall ratio (flow / plain)", results["orchestration"]["ratio"], "<= 1.10"),
        ("orchestration fixed cost, s", results["orchestration"]["fixed_cost_s"], ""),
        ("  Prefect ephemeral server start / of it not overlapped with imports, s",
         f'{results["orchestration"]["prefect_server_start_s"]} / {results["orchestration"]["prefect_server_start_not_hidden_s"]}', ""),
        ("  same when PREFECT_HOME exists, s",
         f'{results["orchestration"]["prefect_server_start_warm_home_s"]} / '
         f'{results["orchestration"]["prefect_server_start_warm_home_not_hidden_s"]}', ""),
        ("orchestration wall ratio, running Prefect server", results["orchestration"]["ratio_with_running_server"], "<= 1.10"),
        ("orchestration fixed cost, running Prefect server, s", results["orchestration"]["fixed_cost_with_running_server_s"], ""),
        ("same, training-loop drift removed: ratio (ephemeral)", results["orchestration"]["ratio_outside_train_loop"], "<= 1.10"),
        ("same, training-loop drift removed: fixed cost (ephemeral), s", results["orchestration"]["fixed_cost_outside_train_loop_s"], ""),
        ("same, training-loop drift removed: ratio (running server)", results["orchestration"]["ratio_outside_train_loop_running_server"], "<= 1.10"),
        ("same, training-loop drift removed: fixed cost (running server), s", results["orchestration"]["fixed_cost_outside_train_loop_running_server_s"], ""),
        ("warm/cold tokenize+quantize", results["warm_rerun"]["stage_ratio"], "<= 0.05"),
        ("warm/cold whole flow", results["warm_rerun"]["flow_ratio"], ""),
        ("trainer / minimal loop steps/s", results["trainer"]["trainer_vs_minimal"], ">= 0.95"),
        *[(f"data: {k}", v, ">= 0.95" if k.startswith("padding_efficiency_grouped") else ">= 0.8" if k == "throughput_ratio" else "")
          for k, v in results["data"].items() if k.startswith("padding_efficiency") or k.startswith("throughput_ratio")],
        ("peak RSS of demo flow, MB", results["memory"]["flow_peak_rss_mb"], ""),
        ("peak RSS / base bf16 size", results["memory"]["ratio"], ""),
    ]
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")


if __name__ == "__main__":
    main()
