"""How the batching choices train one epoch of real data: padded, length-grouped, flattened, bfd bins.

    make bench-packing          (= python -m bench.batching; BENCH_ROUNDS, PACKING_ROWS to change its size)

The training stage (``tasks.train.train_adapter``: 4-bit demo base, LoRA r=16 all-linear, paged 8-bit
AdamW, the compute dtype ``auto`` picks) on the first PACKING_ROWS training rows of Code Alpaca
(``data/public``, tokenized by the demo tokenizer at max_length 512, the demo base's context: ~230 tokens a row). Each case trains
exactly one epoch, so all see the same rows; tokens/s counts real tokens (no pad) over the Trainer's
``train_runtime``. Cases alternate over the rounds; medians. Writes ``bench/results-packing.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ROWS = int(os.environ.get("PACKING_ROWS", "600"))
# name: (TrainConfig fields, what it is)
CASES = {
    "padded": (dict(group_by_length=False, per_device_train_batch_size=4), "padded batches of 4 rows, random order"),
    "grouped": (dict(per_device_train_batch_size=4), "padded batches of 4, length-grouped (the default)"),
    "flatten": (dict(packing=True, per_device_train_batch_size=4), "packing: true, 4 rows flattened per step"),
    "bfd_1x1024": (dict(packing="bfd", packing_tokens=1024, per_device_train_batch_size=1),
                   "packing: bfd, 1 bin of 1024 tokens per step"),
    "bfd_4x1024": (dict(packing="bfd", packing_tokens=1024, per_device_train_batch_size=4),
                   "packing: bfd, 4 bins of 1024 per step"),
}


def main() -> None:
    import datasets
    from datasets import DatasetDict, load_from_disk

    from bench.run import cpu_name
    from qlora.config.schema import DataConfig, LoraSection, ModelConfig, QuantizationConfig, TrainConfig
    from qlora.refs import TokenizedData
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_adapter
    from tasks.training.packing import bfd_bins

    datasets.disable_progress_bars()
    model = ModelConfig(name_or_path=str(REPO / ".qlora" / "demo-base"))
    lora = LoraSection(r=16, alpha=32, dropout=0.0)
    runs: dict[str, list[dict]] = {k: [] for k in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        full = tokenize_dataset(DataConfig(path=str(REPO / "data" / "public" / "code_alpaca_2k.json"), max_length=512),
                                model, work)
        splits = load_from_disk(full.path)
        sub = DatasetDict({"train": splits["train"].select(range(min(ROWS, len(splits["train"])))), "eval": splits["eval"]})
        sub.save_to_disk(str(work / "subset"))
        data = TokenizedData(**(full.model_dump() | dict(path=str(work / "subset"), fingerprint=f"{full.fingerprint}-{ROWS}",
                                                          train_rows=len(sub["train"]))))
        lengths = [len(x) for x in sub["train"]["input_ids"]]
        base = prepare_quantized_model(model, QuantizationConfig(), work)
        for r in range(ROUNDS):
            for name, (fields, _) in CASES.items():
                train = TrainConfig(num_train_epochs=1, gradient_accumulation_steps=1, learning_rate=2e-4, logging_steps=10,
                                    save_steps=100_000, fp32_norms=False, seed=r, **fields)
                a = train_adapter(base, data, lora, train, work / f"runs-{r}")
                runs[name].append({"steps": a.global_step, "train_runtime_s": round(a.train_runtime_s, 2),
                                   "tokens_per_s": round(sum(lengths) / a.train_runtime_s, 1), "last_loss": a.last_loss})
                print(name, runs[name][-1], flush=True)
    bins = len(bfd_bins(lengths, 1024))
    out = {"cpu": cpu_name(), "date": datetime.now().isoformat(timespec="minutes"), "rows": len(lengths),
           "real_tokens": sum(lengths), "bfd_bins_1024": bins, "bfd_fill": round(sum(lengths) / (bins * 1024), 4),
           "compute_dtype": base.compute_dtype, "rounds": ROUNDS, "cases": {}}
    ref = statistics.median(x["tokens_per_s"] for x in runs["grouped"])
    for name, (_, what) in CASES.items():
        tps = statistics.median(x["tokens_per_s"] for x in runs[name])
        out["cases"][name] = {"what": what, "steps": runs[name][0]["steps"], "tokens_per_s": tps,
                              "vs_grouped": round(tps / ref, 3), "runs": runs[name]}
    (REPO / "bench" / "results-packing.json").write_text(json.dumps(out, indent=1))
    print(f"\n{out['cpu']}, {out['rows']} rows, {out['real_tokens']} real tokens, compute {out['compute_dtype']}, "
          f"medians of {ROUNDS}\n\n| batching (one epoch) | steps | real tokens/s | vs grouped |\n|---|---|---|---|")
    for name, c in out["cases"].items():
        print(f"| {c['what']} | {c['steps']} | {c['tokens_per_s']:,.0f} | {c['vs_grouped']} |")


if __name__ == "__main__":
    main()
