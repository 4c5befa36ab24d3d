"""Stage 4: score the base model and the fine-tuned adapter on the same held-out split.

``eval.metrics``: generation metrics (exact_match, rouge, bleu, chrf) on greedy generations of the
first ``eval.max_samples`` eval rows, and perplexity of the references over the whole eval split,
each an ``evaluate`` module shipped in ``tasks/metrics`` (loaded by path: no hub). Eval loss is
always logged. The base is loaded once; the base scores come from the same model with the adapter
disabled. Per-example scores go into the samples, for the registry's promotion gate.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from qlora.config.schema import GENERATION_METRICS, EvalConfig
from qlora.models import ModelCache, generate, tuned
from qlora.refs import Adapter, EvalReport, MlflowRun, QuantizedModel, TokenizedData
from qlora.tracking.outage import logging_to

log = logging.getLogger("qlora.evaluate")
METRICS_DIR = Path(__file__).parent / "metrics"


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def token_nll(model, tok, ds, batch_size: int) -> tuple[list[float], list[int]]:
    """Per example: summed cross-entropy (nats) over its trained (non -100) tokens, and their count.
    Rows are upcast to fp32 one at a time: a real vocabulary's logits in fp32 for a whole batch would
    need several GB."""
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    rows = ds.select_columns(["input_ids", "attention_mask", "labels"])
    nll, counts = [], []
    tok.padding_side = "right"
    try:
        for i in range(0, len(rows), batch_size):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))]).to(model.device)
            labels = batch.pop("labels")[:, 1:]  # position t predicts token t+1
            with torch.no_grad():
                logits = model(**batch).logits[:, :-1]
                for row_logits, row_labels in zip(logits, labels):
                    nll.append(float(F.cross_entropy(row_logits.float(), row_labels, ignore_index=-100, reduction="sum")))
                    counts.append(int((row_labels != -100).sum()))
    finally:
        tok.padding_side = "left"
    return nll, counts


def score_pair(model, tok, ds, cfg: EvalConfig, metrics: dict) -> dict[str, tuple[dict[str, float], list[str], dict[str, list[float]]]]:
    """Per side, "base" (the adapter disabled) and "tuned": (corpus metrics, generations of the first
    max_samples rows, per-example scores of those rows). The model's work first (each side's losses and
    generations), then the metrics, which need only text and numbers."""
    sub = ds.select(range(min(cfg.max_samples, len(ds))))
    generative = [m for m in cfg.metrics if m in GENERATION_METRICS]
    nll, preds = {}, {}
    for side, adapter_state in (("base", model.disable_adapter), ("tuned", nullcontext)):
        with adapter_state():
            nll[side] = token_nll(model, tok, ds, cfg.batch_size)
            preds[side] = generate(model, tok, sub["prompt"], cfg.max_new_tokens, cfg.batch_size) if generative else []
    scored = {}
    for side, (losses, counts) in nll.items():
        out, per_example = {}, {}
        for name in generative:
            got = metrics[name].compute(predictions=preds[side], references=sub["reference"], per_example=True)
            out[name], per_example[name] = got[name], [float(x) for x in got["scores"]]
        out["loss"] = sum(losses) / max(sum(counts), 1)
        if "perplexity" in cfg.metrics:
            got = metrics["perplexity"].compute(nll=losses, n_tokens=counts, per_example=True)
            out["perplexity"], per_example["perplexity"] = got["perplexity"], got["scores"][: len(sub)]
        scored[side] = (out, preds[side], per_example)
    return scored


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
    metrics = {name: load_metric(name) for name in cfg.metrics}
    scored = score_pair(model, tok, ds, cfg, metrics)
    (base_m, base_preds, base_scores), (tuned_m, tuned_preds, tuned_scores) = scored["base"], scored["tuned"]
    report_metrics = {f"eval/base/{k}": v for k, v in base_m.items()} | {f"eval/tuned/{k}": v for k, v in tuned_m.items()}
    n = min(cfg.max_samples, len(ds))
    keep = ("prompt", "message", "standalone", "conversation", "reference")
    samples = [
        {k: ds[i][k] for k in keep if k in ds.column_names}
        | {"base": base_preds[i] if base_preds else "", "tuned": tuned_preds[i] if tuned_preds else ""}
        | {f"base_{m}": s[i] for m, s in base_scores.items()} | {f"tuned_{m}": s[i] for m, s in tuned_scores.items()}
        for i in range(n)
    ]
    with logging_to(run) as tracked:  # a tracking outage costs these metrics, not the evaluation
        if tracked is not None:
            import mlflow

            mlflow.log_metrics(report_metrics)
            mlflow.log_table({k: [s.get(k) for s in samples] for k in samples[0]}, artifact_file="eval/samples.json")
    log.info("evaluated %d prompts in %.1f s: %s", n, time.perf_counter() - t0,
             ", ".join(f"{k} base {base_m[k]:.3f} -> tuned {tuned_m[k]:.3f}" for k in base_m))
    return EvalReport(metrics=report_metrics, samples=samples, data=data, max_new_tokens=cfg.max_new_tokens)
