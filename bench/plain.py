"""The demo's work as plain function calls in one process: no Prefect, no MLflow, no registry.

``python -m bench.plain CONFIG [--set k=v ...]`` prints one JSON line of per-stage wall seconds.
It is the baseline that ``bench/run.py`` compares the full flow against.
"""

from __future__ import annotations

import json
import sys
import time


def run(config_path: str, overrides: list[str]) -> dict[str, float]:
    from flows.stages import generation_eval
    from qlora.config.files import load_config
    from tasks.evaluate import evaluate_adapter
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_adapter

    cfg = load_config(config_path, overrides)
    # Import the heavy libraries before the clock starts: stage times should be the stage's work,
    # not the process's one-off imports (which a cold and a warm run pay alike).
    import datasets  # noqa: E401,F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    times: dict[str, float] = {}
    t = time.perf_counter()
    data = tokenize_dataset(cfg.data, cfg.model, cfg.workdir)
    times["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    base = prepare_quantized_model(cfg.model, cfg.quantization, cfg.workdir)
    times["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    # With eval.every_steps: generation eval during training, checkpoint selection and early stopping, as the flow does
    adapter = train_adapter(base, data, cfg.lora, cfg.train, cfg.workdir, during=generation_eval(cfg.train, cfg.eval, cfg.registry.gate_metric, data))
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    report = evaluate_adapter(base, adapter, data, cfg.eval)
    times["evaluate"] = time.perf_counter() - t
    times["tuned_exact_match"] = report.metrics["eval/tuned/exact_match"]
    times["tuned_eval_loss"] = report.metrics["eval/tuned/loss"]
    times["train_runtime"] = adapter.train_runtime_s
    times["steps"] = adapter.global_step
    times["optim"] = adapter.optim
    times["selected_step"] = adapter.selected_step
    times["evaluations"] = adapter.evaluations
    times["generation_eval_s"] = adapter.generation_eval_s
    times["compute_dtype"] = base.compute_dtype
    return times


if __name__ == "__main__":
    args = sys.argv[1:]
    overrides = [a for prev, a in zip([""] + args, args) if prev == "--set"]
    t0 = time.perf_counter()
    out = run(args[0], overrides)
    out["in_process_total"] = time.perf_counter() - t0
    print("BENCH " + json.dumps(out))
