"""GPU throughput of our training stage on a Llama-2-7B-shaped model (random weights, nothing downloaded).

    python -m bench.gpu            # CUDA only; writes bench/results-gpu.json
    python -m bench.gpu --tiny     # same code path on a tiny model, runs anywhere (checks the harness)

QLoRA r=64 on all linear layers, bf16 compute, gradient checkpointing, sequences of 1024 and
2048 tokens, through ``tasks.quantize.prepare_quantized_model`` and ``tasks.train.train_adapter``.
Reports non-pad tokens/s, MFU on the 4N and 6N bases against the GPU's bf16 dense peak, and peak
reserved VRAM. Anchors (LLaMA-Factory's comparison, A100 40GB, Llama-2-7B): HF 4-bit QLoRA
2,415 tokens/s/GPU, Unsloth 3,726; ~21% and ~32% MFU. QLoRA paper: 7B 4-bit base 5,048 MB.
The fixed-length cases use full-length random sequences (no padding). The variable-length cases draw
row lengths uniformly from 64..1024 and compare padded batches (random order, and the default
length-grouped order) with packed padding-free batches (``train.packing: true``) and with best-fit-decreasing
bins of 1024 tokens, 4 per step (``train.packing: bfd``: one epoch of the same rows in about half the steps),
with sdpa and (GPU only) with ``flex_attention``;
tokens/s counts only non-pad tokens, so padding shows up as lost throughput.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# bf16 dense peak, TFLOP/s (no sparsity), by device-name substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)


def build_random_base(shape: dict, out: Path, device: str) -> int:
    """Save a random-weight Llama of ``shape`` (bf16) with a small trained tokenizer; returns its param count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from demo.build import DEMO_DATA, _train_tokenizer

    corpus = DEMO_DATA.read_text().splitlines()
    tok = _train_tokenizer(corpus, 512)
    cfg = LlamaConfig(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    return n


def random_tokens(out: Path, rows: int, seq: int, vocab: int, varlen: bool = False):
    """A tokenized dataset of random sequences (full-length, or 64..seq tokens), every token trained."""
    import torch
    from datasets import Dataset, DatasetDict

    from qlora.refs import TokenizedData

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, seq + 1, (rows,), generator=g).tolist() if varlen else [seq] * rows
    ids = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * n for n in lengths], "labels": ids})
    DatasetDict({"train": ds, "eval": ds.select(range(2))}).save_to_disk(str(out))
    ref = TokenizedData(path=str(out), fingerprint=f"random-{rows}x{seq}-{varlen}", train_rows=rows, eval_rows=2)
    return ref, lengths


def _step_timer(timer: list[float], profile: bool):
    """A callback on our training stage: step-end times (and optionally a profiler window).

    It synchronizes the GPU at each step end, so the steady-state step time excludes the first
    steps' one-off costs (allocator growth, cuBLAS/kernel setup) that ``train_runtime`` includes.
    """
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if profile and state.global_step == 4:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timer.append(time.perf_counter())
            if self.prof is not None and state.global_step == 6:
                self.prof.__exit__(None, None, None)
                for key in ("cuda_time_total", "cpu_time_total"):
                    print(self.prof.key_averages().table(sort_by=key, row_limit=20), flush=True)
                self.prof = None

    return StepTimer()


def run_case(base, seq: int, batch: int, steps: int, attn: str, workdir: Path, n_params: int, vocab: int,
             peak: float | None, batching: str = "full", overrides: dict | None = None, profile: bool = False):
    """One training run; ``batching`` is full (fixed length), padded, grouped (padded, by length), packed or bfd."""
    import statistics

    import torch

    from qlora.config.schema import LoraSection, TrainConfig
    from tasks.train import train_adapter

    varlen = batching != "full"
    data, lengths = random_tokens(workdir / f"data-{seq}-{varlen}", rows=steps * batch, seq=seq, vocab=vocab, varlen=varlen)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # peak *reserved* must not include blocks cached by the previous case
        torch.cuda.reset_peak_memory_stats()
    packing = {"packed": True, "bfd": "bfd"}.get(batching, False)
    # bfd: one epoch of the same rows (fewer, fuller steps); the others' epoch is exactly `steps` steps
    train = TrainConfig(max_steps=-1 if batching == "bfd" else steps, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=1, logging_steps=max(steps // 2, 1), save_steps=steps * 10,
                        learning_rate=2e-4, group_by_length=batching == "grouped", packing=packing,
                        packing_tokens=seq if batching == "bfd" else None,
                        # every layer, as in the earlier tables; the diagnose case "auto" lets tasks/training/recipe.py choose 1 in n
                        **({"gradient_checkpointing": True} | (overrides or {})))
    lora = LoraSection(r=64, alpha=16, dropout=0.05, target_modules="all-linear")
    timer: list[float] = []
    tag = "-".join(f"{k}={v}" for k, v in (overrides or {}).items())
    a = train_adapter(base, data, lora, train, workdir / f"run-{seq}-{attn}-{batching}-{tag}",
                      callbacks=(_step_timer(timer, profile),))
    tps = sum(lengths) / a.train_runtime_s  # one epoch's rows = exactly the rows trained
    step_s = statistics.median(b - a_ for a_, b in zip(timer[3:], timer[4:])) if len(timer) > 5 else None
    out = {"seq": seq, "batch": batch, "steps": a.global_step, "attn": attn, "batching": batching, **(overrides or {}),
           "tokens_per_s": round(tps, 1), "train_runtime_s": round(a.train_runtime_s, 2)}
    if step_s:  # steady state: median step after the first three, tokens of an average step
        out |= {"steady_step_s": round(step_s, 4), "steady_tokens_per_s": round(sum(lengths) / a.global_step / step_s, 1)}
        tps = out["steady_tokens_per_s"] if not profile else tps
    if torch.cuda.is_available():
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20)
    if peak:
        out["mfu_4n"] = round(tps * 4 * n_params / (peak * 1e12), 4)
        out["mfu_6n"] = round(tps * 6 * n_params / (peak * 1e12), 4)
    return out


def main() -> None:
    import torch

    from qlora.config.schema import ModelConfig, QuantizationConfig
    from tasks.quantize import prepare_quantized_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny model, any device: checks the harness")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--diagnose", action="store_true",
                    help="variants of the fixed-length case: fp32 norms off, unpaged 8-bit AdamW, checkpointing off or auto")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables for steps 5-6 of each case")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device, skipped (use --tiny to exercise the harness on CPU)")
        return
    shape = TINY if args.tiny else LLAMA2_7B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = {"device": name, "peak_bf16_tflops": peak, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        n_params = build_random_base(shape, work / "base", device)
        base = prepare_quantized_model(ModelConfig(name_or_path=str(work / "base")), QuantizationConfig(), work)
        results |= {"params": n_params, "quantized_footprint_mb": round(base.footprint_bytes / 2**20),
                    "setup_s": round(time.perf_counter() - t0, 1)}
        if args.diagnose:
            for seq, batch, over in ((1024, 4, {}), (1024, 4, {"fp32_norms": False}), (2048, 2, {}),
                                     (1024, 4, {"optim": "adamw_8bit"}), (1024, 4, {"gradient_checkpointing": False}),
                                     (1024, 4, {"gradient_checkpointing": "auto"})):
                results["cases"].append(run_case(base, seq, batch, args.steps, "sdpa", work, n_params, shape["vocab_size"],
                                                 peak, overrides=over, profile=args.profile))
                print(json.dumps(results["cases"][-1]), flush=True)
            out = Path(__file__).parent / ("results-gpu-diagnose-tiny.json" if args.tiny else "results-gpu-diagnose.json")
            out.write_text(json.dumps(results, indent=2))
            return
        attns = ["sdpa"]
        try:
            import flash_attn  # noqa: F401

            attns.append("flash_attention_2")
        except ImportError:
            results["flash_attention_2"] = "not installed"
        for seq, batch in ((1024, 4), (2048, 2)):
            for attn in attns:
                if attn != "sdpa":
                    base = prepare_quantized_model(
                        ModelConfig(name_or_path=str(work / "base"), attn_implementation=attn), QuantizationConfig(), work)
                results["cases"].append(run_case(base, seq, batch, args.steps, attn, work, n_params, shape["vocab_size"], peak))
                print(json.dumps(results["cases"][-1]), flush=True)
        base = prepare_quantized_model(ModelConfig(name_or_path=str(work / "base")), QuantizationConfig(), work)
        for batching in ("padded", "grouped", "packed", "bfd"):
            results["cases"].append(run_case(base, 1024, 4, args.steps, "sdpa", work, n_params, shape["vocab_size"], peak, batching))
            print(json.dumps(results["cases"][-1]), flush=True)
        if device == "cuda":  # bfd bins through PyTorch's FlexAttention: only blocks inside each example (no CPU backward)
            flex = prepare_quantized_model(ModelConfig(name_or_path=str(work / "base"), attn_implementation="flex_attention"),
                                           QuantizationConfig(), work)
            results["cases"].append(run_case(flex, 1024, 4, args.steps, "flex_attention", work, n_params, shape["vocab_size"], peak, "bfd"))
            print(json.dumps(results["cases"][-1]), flush=True)
    out = Path(__file__).parent / ("results-gpu-tiny.json" if args.tiny else "results-gpu.json")
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
