"""Data benchmarks: padding efficiency of training batches and tokenization throughput.

    PYTHONPATH=. python bench/data.py [--data data/public/code_alpaca_2k.json] [--model .qlora/demo-base]

Prints one JSON object. Padding efficiency = real tokens / tokens in padded batches, for the
Trainer's random sampler vs its length-grouped sampler (``train.group_by_length``). Throughput
ratio = time of one bare batched tokenizer call on the full rendered texts / time of our
tokenization (batched tokenizer calls building ids, labels and checks, written to an Arrow-backed
Dataset) on the same rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def padding_efficiency(lengths: list[int], batch_size: int, grouped: bool, seed: int = 42) -> float:
    """Real / padded tokens over one epoch of the Trainer's sampler (dynamic padding to the batch max)."""
    import torch
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    if grouped:
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=g)
    else:
        sampler = RandomSampler(range(len(lengths)), generator=g)
    order = list(sampler)
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return real / padded


def _best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function, interleaved so that load from other processes hits all alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def run(data_path: str, model_path: str, max_length: int = 1024, batch_sizes=(4, 8, 16), repeats: int = 7) -> dict:
    import datasets

    from qlora.config.schema import DataConfig, ModelConfig
    from qlora.models import load_tokenizer
    from tasks.data.encode import tokenize_items
    from tasks.data.parse import parse
    from tasks.data.pipeline import prepare_data
    from tasks.data.read import read_source
    from tasks.data.render import render

    datasets.disable_progress_bars()
    data = DataConfig(path=data_path, max_length=max_length)
    tok = load_tokenizer(ModelConfig(name_or_path=model_path))
    prep = prepare_data(data, tok)
    lengths = [len(x) for x in prep.train["input_ids"]]
    out: dict = {"data": data_path, "rows": len(lengths), "max_length": max_length}
    for bs in batch_sizes:
        out[f"padding_efficiency_random_bs{bs}"] = round(padding_efficiency(lengths, bs, grouped=False), 4)
        out[f"padding_efficiency_grouped_bs{bs}"] = round(padding_efficiency(lengths, bs, grouped=True), 4)
    out["padding_efficiency_packed"] = 1.0  # train.packing: one flattened row per batch, no pad tokens at all

    rendered = render(parse(read_source(data_path), data), data, tok)
    texts = ["".join(t for t, _ in it.segments) for it in rendered.items]
    backend = tok.backend_tokenizer
    t = _best_of(
        {
            "bare": lambda: tok(texts),
            # The strictest baseline: the Rust backend alone, no offsets, no Python-side BatchEncoding.
            "bare_fast": lambda: [e.ids for e in backend.encode_batch_fast(texts)],
            "ours": lambda: tokenize_items(rendered.items, tok, data),
        },
        repeats,
    )
    bare, bare_fast, ours = t["bare"], t["bare_fast"], t["ours"]
    whole = _best_of({"prepare": lambda: prepare_data(data, tok)}, 1)["prepare"]
    out.update(
        bare_tokenizer_s=round(bare, 4), bare_backend_fast_s=round(bare_fast, 4), ours_tokenize_s=round(ours, 4),
        throughput_ratio=round(bare / ours, 3), throughput_ratio_vs_backend_fast=round(bare_fast / ours, 3),
        prepare_s=round(whole, 3), rows_per_s_ours=round(len(texts) / ours),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO / "data" / "public" / "code_alpaca_2k.json"))
    ap.add_argument("--model", default=str(REPO / ".qlora" / "demo-base"))
    ap.add_argument("--max-length", type=int, default=1024)
    a = ap.parse_args()
    print(json.dumps(run(a.data, a.model, a.max_length), indent=1))


if __name__ == "__main__":
    main()
