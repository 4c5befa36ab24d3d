"""``make bench-quality``: does the demo recipe learn its task on every machine? (issue 17)

Runs the demo config's tokenize/quantize/train/evaluate (``bench.plain``, no Prefect or MLflow) for
every cell of seeds x {bf16 native, float32 native, ``auto`` under AVX2-only dispatch}, each in its own
process and work dir (a run dir is keyed by the config, not by the CPU, so cells must not share one).
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes torch and oneDNN dispatch as on an AVX2-only
CPU, where ``auto`` must pick float32. Writes ``bench/results-quality.json`` (committed, CPU named)
and prints a Markdown table; the goal is held-out exact match >= 0.95 and eval loss < 0.1 everywhere.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
SEEDS = (42, 7, 1234)
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CELLS = (("bf16 native", "bfloat16", {}), ("float32 native", "float32", {}), ("auto, AVX2 dispatch", "auto", AVX2))
GOAL_EM, GOAL_LOSS = 0.95, 0.1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_cell(seed: int, dtype: str, env: dict, root: Path) -> dict:
    work = root / f"{dtype}-{'avx2' if env else 'native'}-{seed}"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.plain", CONFIG, "--set", f"workdir={work}", "--set", f"train.seed={seed}",
           "--set", f"quantization.compute_dtype={dtype}"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"quality cell failed: {' '.join(cmd)}")
    res = json.loads((out.stdout + out.stderr).split("BENCH ", 1)[1].splitlines()[0])
    return {"seed": seed, "exact_match": res["tuned_exact_match"], "eval_loss": round(res["tuned_eval_loss"], 4),
            "compute_dtype": res["compute_dtype"], "optim": res["optim"], "steps": res["steps"],
            "selected_step": res["selected_step"],
            "train_runtime_s": round(res["train_runtime"], 1), "steps_per_s": round(res["steps"] / res["train_runtime"], 2)}


def main() -> None:
    import torch

    root = REPO / ".qlora" / "bench-quality"
    rows = []
    for name, dtype, env in CELLS:
        for seed in SEEDS:
            rows.append({"cell": name, **run_cell(seed, dtype, env, root)})
            print(json.dumps(rows[-1]), flush=True)
    ok = all(r["exact_match"] >= GOAL_EM and r["eval_loss"] < GOAL_LOSS for r in rows)
    result = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "config": CONFIG, "goal": f"exact match >= {GOAL_EM}, "
              f"eval loss < {GOAL_LOSS} in every cell", "all_cells_meet_goal": ok, "runs": rows}
    (REPO / "bench" / "results-quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['cpu']} ({result['cpu_count']} cores, ATen {result['aten_capability']}), {result['date']}\n")
    print("| cell | seed | dtype | exact match | eval loss | steps run | checkpoint kept | steps/s | training s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['seed']} | {r['compute_dtype']} | {r['exact_match']:.3f} | {r['eval_loss']:.4f} | {r['steps']} | "
              f"{r['selected_step']} | {r['steps_per_s']} | {r['train_runtime_s']} |")
    print(f"\nevery cell meets the goal: {ok}")


if __name__ == "__main__":
    main()
