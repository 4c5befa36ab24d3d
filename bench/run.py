"""``make bench``: how fast the demo job runs here against what users would pick instead, as ratios of
runs measured together. This machine is noisy (single runs swing +-10%), so every comparison alternates
its sides over ``BENCH_ROUNDS`` rounds (default 3) and compares medians; absolute seconds are context.
Writes ``bench/results.json`` (the CPU named) and prints a Markdown table. ``BENCH_ONLY=peers,...`` re-measures
only the named sections and carries the others over from the last results file, with their date and CPU.

1. peers, alternating each round: a bare ``qlora run`` of the demo (ephemeral Prefect, MLflow, evaluation,
   registry), the same against a running Prefect server, TRL's ``SFTTrainer`` and a bare
   ``prepare_model_for_kbit_training`` + ``Trainer`` script on the same job (``bench/peers.py``): the
   training loop's steps/s (the Trainer's own ``train_runtime``) and the whole process's wall time
2. ``quantization.compute_dtype: auto`` against the faster of bf16 and float32, natively and under
   AVX2-only dispatch (short training runs through the training stage)
3. warm re-run: tokenize + quantize again on unchanged inputs (cache hits)
4. data: tokenization throughput vs a bare tokenizer call; padding efficiency
5. memory: peak RSS of the demo flow vs the base model's bf16 size
6. generation eval during training: its share of the training loop at the demo's cadence (``bench/generation_eval.py``)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# The peers' job length; unset = the demo's own max_steps. Fewer steps weigh our fixed costs (Prefect,
# MLflow, evaluation, registry) more against TRL's, so a shorter job is the harder wall-time comparison.
STEPS = os.environ.get("BENCH_STEPS")
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


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


def steps_run(work: Path) -> int:
    """Optimizer steps a ``qlora run`` took, from its adapter's manifest (early stopping can end it before max_steps)."""
    (manifest,) = work.glob("runs/*/adapter/manifest.json")
    return json.loads(manifest.read_text())["global_step"]


def peer_runtime(log: str) -> float:
    return json.loads(log.split("PEER ", 1)[1].splitlines()[0])["train_runtime"]


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def cpu_name() -> str:
    from bench.quality import cpu_name as name

    return name()


def peers(root: Path, env: dict[str, str], py: str) -> dict:
    """Each round: ours (bare ``qlora run``), ours against a running Prefect server, TRL, the bare script."""
    # BENCH_PEERS=ours,trl,... runs a subset (the ratios need ours and trl). ours_auto: the demo with train.optim=auto.
    names = os.environ.get("BENCH_PEERS", "ours,ours_running_server,ours_auto,trl,trl_fast,bare").split(",")
    runs: dict[str, list[dict]] = {k: [] for k in names}
    (root / "prefect-server").mkdir()
    with PrefectServer(root / "prefect-server", env) as server:
        for r in range(ROUNDS):
            for name in runs:
                work = root / f"{name}-{r}"
                steps = ["--set", f"train.max_steps={STEPS}"] if STEPS else []
                if name.startswith("ours"):
                    cmd = [py, "-m", "flows.cli", "run", CONFIG, "--set", f"workdir={work}",
                           "--set", f"tracking.artifact_location={root / 'mlartifacts'}", *steps,
                           *(["--set", "train.optim=auto"] if name == "ours_auto" else [])]
                    run_env = server.env if name == "ours_running_server" else env
                else:
                    cmd = [py, "-m", "bench.peers", name, CONFIG, *steps]
                    run_env = env
                wall, rss, log = timed_child(cmd, dict(run_env, MLFLOW_TRACKING_URI=f"sqlite:///{root / (name + '.db')}"))
                loop = train_loop_seconds(log) if name.startswith("ours") else peer_runtime(log)
                # Ours may stop early (the demo's early stopping): its steps/s counts the steps it ran, not max_steps.
                ran = steps_run(work) if name.startswith("ours") else None
                runs[name].append({"wall_s": round(wall, 1), "train_loop_s": round(loop, 1), "steps_run": ran,
                                   "peak_rss_mb": round(rss / 2**20),
                                   "server_start_s": server_start_seconds(log)[0] if name == "ours" else None})
                print(f"round {r + 1}/{ROUNDS} {name}: wall {wall:.1f} s, training loop {loop:.1f} s", flush=True)
    from qlora.config.files import load_config

    n = int(STEPS) if STEPS else load_config(REPO / CONFIG).train.max_steps
    out = {"steps": n, "rounds": ROUNDS, "runs": runs}
    for name, rs in runs.items():
        out[name] = {"wall_s": median([x["wall_s"] for x in rs]),
                     "steps_per_s": median([(x["steps_run"] or n) / x["train_loop_s"] for x in rs])}
    for name in [n for n in runs if n != "trl"]:
        out[f"{name}_vs_trl"] = {
            "loop_speed": round(out[name]["steps_per_s"] / out["trl"]["steps_per_s"], 3),
            "wall": round(out[name]["wall_s"] / out["trl"]["wall_s"], 3)}
    for name in [n for n in ("ours", "ours_auto") if n in runs and "trl_fast" in runs]:
        out[f"{name}_vs_trl_fast"] = {"loop_speed": round(out[name]["steps_per_s"] / out["trl_fast"]["steps_per_s"], 3),
                                      "wall": round(out[name]["wall_s"] / out["trl_fast"]["wall_s"], 3)}
    return out


def dtype_choice(root: Path, env: dict[str, str], py: str) -> dict:
    """Training-stage steps/s in bf16 and float32 (alternating rounds) natively and under AVX2 dispatch,
    and what ``auto`` picks in each. bf16 under AVX2 is emulated (~1 step/s), so it runs fewer steps."""
    out = {}
    for where, extra in (("native", {}), ("avx2", AVX2)):
        speed: dict[str, list[float]] = {"bfloat16": [], "float32": []}
        for r in range(ROUNDS):
            for dtype in speed:
                steps = 30 if (where == "avx2" and dtype == "bfloat16") else 200
                work = root / f"dtype-{where}-{dtype}-{r}"
                cmd = [py, "-m", "bench.plain", CONFIG, "--set", f"workdir={work}", "--set", f"train.max_steps={steps}",
                       "--set", f"quantization.compute_dtype={dtype}", "--set", "eval.max_samples=8"]
                _, _, log = timed_child(cmd, dict(env, **extra))
                speed[dtype].append(steps / train_loop_seconds(log))
        probe = subprocess.run([py, "-c", "from qlora.models import cpu_compute_dtype as c; print(c()[0])"], cwd=REPO,
                               env=dict(env, **extra), capture_output=True, text=True, check=True).stdout.split()[-1]
        picked = probe.removeprefix("torch.")
        med = {k: median(v) for k, v in speed.items()}
        out[where] = {"steps_per_s": med, "auto_picks": picked,
                      "auto_vs_faster": round(med[picked] / max(med.values()), 3)}
        print(f"dtype {where}: {med}, auto picks {picked}", flush=True)
    return out


def warm_rerun(root: Path, env: dict[str, str], py: str) -> dict:
    """tokenize + quantize cold, then again on the same inputs (content-keyed cache hits)."""
    cmd = [py, "-m", "bench.plain", CONFIG, "--set", f"workdir={root / 'warm'}", "--set", "train.max_steps=20",
           "--set", "eval.max_samples=8"]
    stages = []
    for _ in range(2):
        _, _, log = timed_child(cmd, env)
        stages.append(json.loads(log.split("BENCH ", 1)[1].splitlines()[0]))
    cold, warm = (x["tokenize"] + x["quantize"] for x in stages)
    return {"tokenize_quantize_cold_s": round(cold, 2), "tokenize_quantize_warm_s": round(warm, 2),
            "stage_ratio": round(warm / cold, 3), "goal": "<= 0.05"}


def main() -> None:
    import torch

    root = REPO / ".qlora" / "bench"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONUNBUFFERED="1")
    py = sys.executable
    results: dict[str, dict] = {"context": {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                                            "aten_capability": torch.backends.cpu.get_cpu_capability(),
                                            "date": datetime.now().isoformat(timespec="seconds"), "rounds": ROUNDS}}
    # BENCH_ONLY=peers,generation_eval re-measures those sections and keeps the others from the last results
    # file, each with the date and CPU it was measured on (context.carried_over says which).
    only = {s for s in os.environ.get("BENCH_ONLY", "").split(",") if s}
    previous = json.loads((REPO / "bench" / "results.json").read_text()) if only else {}
    fresh = lambda section: not only or section in only  # noqa: E731
    if fresh("peers"):
        results["peers"] = peers(root, env, py)
    if fresh("compute_dtype_auto"):
        results["compute_dtype_auto"] = dtype_choice(root, env, py)
    if fresh("warm_rerun"):
        results["warm_rerun"] = warm_rerun(root, env, py)
    if fresh("data"):
        from bench import data as data_bench

        results["data"] = data_bench.run(str(REPO / "data" / "public" / "code_alpaca_2k.json"), str(REPO / ".qlora" / "demo-base"))
    if fresh("peers"):
        base_dir = REPO / ".qlora" / "demo-base"
        rss = median([x["peak_rss_mb"] for x in results["peers"]["runs"]["ours"]])
        results["memory"] = {"flow_peak_rss_mb": rss, "base_bf16_mb": round(bf16_bytes(base_dir) / 2**20, 2),
                             "ratio": round(rss * 2**20 / bf16_bytes(base_dir), 1)}
    if fresh("generation_eval"):
        from bench import generation_eval

        results["generation_eval"] = generation_eval.run()
    carried = {k: previous["context"].get("carried_over", {}).get(k, {"date": previous["context"]["date"], "cpu": previous["context"]["cpu"]})
               for k in previous if k not in results}
    results |= {k: previous[k] for k in carried}
    if carried:
        results["context"]["carried_over"] = carried
    (REPO / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    p, d = results["peers"], results["compute_dtype_auto"]
    c = results["context"]
    print(f"\n{c['cpu']} ({c['cpu_count']} cores, ATen {c['aten_capability']}), {c['date']}, medians of {ROUNDS} rounds\n")
    print("| demo job, %d steps | training loop steps/s | whole run wall s | loop vs TRL | wall vs TRL |" % p["steps"])
    print("|---|---|---|---|---|")
    for name, label in (("ours", "`qlora run` (ephemeral Prefect)"), ("ours_running_server", "`qlora run`, running Prefect server"),
                        ("ours_auto", "`qlora run`, train.optim=auto (fused AdamW)"),
                        ("trl", "TRL SFTTrainer"), ("trl_fast", "TRL SFTTrainer set for speed (no checkpointing, fused AdamW)"),
                        ("bare", "bare PEFT + Trainer script")):
        if name not in p:
            continue
        vs = p.get(f"{name}_vs_trl", {"loop_speed": 1.0, "wall": 1.0})
        print(f"| {label} | {p[name]['steps_per_s']} | {p[name]['wall_s']} | {vs['loop_speed']} | {vs['wall']} |")
    print("\n| measure | value | goal |\n|---|---|---|")
    rows = [
        *[(f"{n}: training loop vs TRL set for speed", p[f"{n}_vs_trl_fast"]["loop_speed"], ">= 0.95")
          for n in ("ours", "ours_auto") if f"{n}_vs_trl_fast" in p],
        *[(f"{n}: training loop vs TRL (QLoRA recipe, its defaults)", p[f"{n}_vs_trl"]["loop_speed"], ">= 1.6")
          for n in ("ours", "ours_auto") if f"{n}_vs_trl" in p],
        *[(f"{n}: whole run wall vs TRL", p[f"{n}_vs_trl"]["wall"], "<= 0.85") for n in ("ours", "ours_auto") if f"{n}_vs_trl" in p],
        ("compute_dtype auto vs the faster dtype, native (auto picks)", f"{d['native']['auto_vs_faster']} ({d['native']['auto_picks']})", ">= 0.9"),
        ("compute_dtype auto vs the faster dtype, AVX2 dispatch (auto picks)", f"{d['avx2']['auto_vs_faster']} ({d['avx2']['auto_picks']})", ">= 0.9"),
        ("warm/cold tokenize+quantize", results["warm_rerun"]["stage_ratio"], "<= 0.05"),
        *[(f"data: {k}", v, ">= 0.95" if k.startswith("padding_efficiency_grouped") else ">= 0.8" if k == "throughput_ratio" else "")
          for k, v in results["data"].items() if k.startswith("padding_efficiency") or k.startswith("throughput_ratio")],
        ("peak RSS of demo flow, MB", results["memory"]["flow_peak_rss_mb"], ""),
        ("peak RSS / base bf16 size", results["memory"]["ratio"], ""),
        *[(f"training time in generation eval, every {g['every_steps']} steps", g["share"], "<= 0.10")
          for g in [results.get("generation_eval")] if g],
    ]
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")


if __name__ == "__main__":
    main()
