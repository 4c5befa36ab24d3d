"""Stage 4: score the base model and the fine-tuned adapter on the same held-out split.

Generation metrics (exact match, via the ``evaluate`` module shipped in ``tasks/metrics``) with
greedy decoding, plus token-level eval loss and perplexity. The base is loaded once; the base
scores come from the same model with the adapter disabled.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from qlora.config import EvalConfig
from qlora.loading import ModelCache, tuned
from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel, TokenizedData
from qlora.outage import logging_to

log = logging.getLogger("qlora.evaluate")
METRICS_DIR = Path(__file__).parent / "metrics"


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of already-templated prompts, without the prompt."""
    import torch

    from tqdm.auto import tqdm

    out: list[str] = []
    # A progress bar in the terminal: generation is the slow part of evaluation (two passes: base, tuned).
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", leave=False):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def eval_loss(model, tok, ds, batch_size: int) -> float:
    """Mean cross-entropy over trained (non -100) tokens of the eval split."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    rows = ds.select_columns(["input_ids", "attention_mask", "labels"])
    total, count = 0.0, 0
    tok.padding_side = "right"
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]).to(model.device)
            n = int((batch["labels"][:, 1:] != -100).sum())  # tokens the shifted loss averages over
            with torch.no_grad():
                total += float(model(**batch).loss) * n
            count += n
    finally:
        tok.padding_side = "left"
    return total / max(count, 1)


def score(model, tok, ds, cfg: EvalConfig, metric) -> tuple[dict[str, float], list[str], list[float]]:
    sub = ds.select(range(min(cfg.max_samples, len(ds))))
    preds = generate(model, tok, sub["prompt"], cfg.max_new_tokens, cfg.batch_size)
    em = metric.compute(predictions=preds, references=sub["reference"], per_example=True)
    loss = eval_loss(model, tok, ds, cfg.batch_size)
    metrics = {"exact_match": em["exact_match"], "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return metrics, preds, em["scores"]


def evaluate_adapter(
    base: QuantizedModel, adapter: Adapter, data: TokenizedData, cfg: EvalConfig, run: MlflowRun | None = None,
    models: ModelCache | None = None,
) -> EvalReport:
    """Base vs tuned on the eval split; logs ``eval/base/*`` and ``eval/tuned/*`` to the flow's MLflow run.
    With ``models`` the loaded pair stays there for the register stage."""
    from datasets import load_from_disk

    t0 = time.perf_counter()
    ds = load_from_disk(data.path)["eval"]
    model, tok = tuned(base, adapter, models)
    metric = load_metric("exact_match")
    with model.disable_adapter():
        base_m, base_preds, base_scores = score(model, tok, ds, cfg, metric)
    tuned_m, tuned_preds, tuned_scores = score(model, tok, ds, cfg, metric)
    metrics = {f"eval/base/{k}": v for k, v in base_m.items()} | {f"eval/tuned/{k}": v for k, v in tuned_m.items()}
    n = len(base_preds)
    samples = [
        {"prompt": ds[i]["prompt"], "reference": ds[i]["reference"], "base": base_preds[i], "tuned": tuned_preds[i],
         "base_correct": base_scores[i], "tuned_correct": tuned_scores[i]}
        for i in range(n)
    ]
    with logging_to(run) as tracked:  # a tracking outage costs these metrics, not the evaluation
        if tracked is not None:
            import mlflow

            mlflow.log_metrics(metrics)
            mlflow.log_table({k: [s[k] for s in samples] for k in samples[0]}, artifact_file="eval/samples.json")
    log.info(
        "evaluated %d prompts in %.1f s: exact match base %.3f -> tuned %.3f, eval loss %.3f -> %.3f",
        n, time.perf_counter() - t0, base_m["exact_match"], tuned_m["exact_match"], base_m["loss"], tuned_m["loss"],
    )
    return EvalReport(metrics=metrics, samples=samples, data=data, max_new_tokens=cfg.max_new_tokens)
