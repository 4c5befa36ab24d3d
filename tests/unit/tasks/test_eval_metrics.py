"""Evaluation that fits the task: the metric modules shipped in tasks/metrics (loaded by path, offline), and on
open-ended Code Alpaca answers a promotion gate that decides on ROUGE-L instead of an exact match that is 0
for base and tuned alike.
"""

from __future__ import annotations

import json
import math

import mlflow
import pytest

from qlora.config.schema import (
    DataConfig,
    EvalConfig,
    LoraSection,
    ModelConfig,
    QuantizationConfig,
    RegistryConfig,
    TrackingConfig,
    TrainConfig,
)
from qlora.tracking.runs import start_run
from registry.gate import SCORES_DIR, gate_metric, stored_scores
from registry.register import register_adapter
from tasks.evaluate import evaluate_adapter, load_metric
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter
from tests.conftest import SHARED_DATA


@pytest.mark.parametrize("name", ["exact_match", "rouge", "bleu", "chrf"])
def test_generation_metrics_score_in_zero_one(name):
    m = load_metric(name)
    same = m.compute(predictions=["def add(a, b): return a + b"], references=["def add(a, b): return a + b"], per_example=True)
    apart = m.compute(predictions=["zzz qqq"], references=["def add(a, b): return a + b"], per_example=True)
    assert same[name] == pytest.approx(1.0) and same["scores"] == [pytest.approx(1.0)]
    assert apart[name] == 0.0 and apart["scores"] == [0.0]
    if name != "exact_match":  # partial credit: what makes them fit open-ended answers
        close = m.compute(predictions=["def add(x, y): return x + y"], references=["def add(a, b): return a + b"])[name]
        assert 0.1 < close < 1.0


def test_rouge_is_rouge_l():
    got = load_metric("rouge").compute(predictions=["a b c d"], references=["a c b d"], per_example=True)
    assert got["scores"] == [pytest.approx(0.75)]  # LCS "a b d" / "a c d": 3 of 4 tokens each way


def test_perplexity_is_exp_of_the_token_mean():
    got = load_metric("perplexity").compute(nll=[2.0, 4.0], n_tokens=[1, 3], per_example=True)
    assert got["perplexity"] == pytest.approx(math.exp(6.0 / 4)) and got["scores"] == [pytest.approx(math.exp(2.0)),
                                                                                          pytest.approx(math.exp(4.0 / 3))]


def test_auto_gate_metric():
    assert gate_metric("auto", [{"reference": "castle lemon tiger"}]) == "exact_match"
    assert gate_metric("auto", [{"reference": "castle lemon tiger"}, {"reference": "def f(x):\n    return x * 2 + 1"}]) == "rouge"
    assert gate_metric("bleu", [{"reference": "x"}]) == "bleu"


def test_scores_stored_before_metrics_were_named_are_still_read(mlflow_uri):
    """Versions registered by the previous release stored exact match as registry/scores/<eval set>.json."""
    run = start_run(TrackingConfig(), run_name="old")
    client = mlflow.MlflowClient(mlflow_uri)
    client.log_dict(run.run_id, {"eval_set": "e1", "scores": [1.0, 0.0]}, f"{SCORES_DIR}/e1.json")
    assert stored_scores(run.run_id, "e1", mlflow_uri, "exact_match") == [1.0, 0.0]
    assert stored_scores(run.run_id, "e1", mlflow_uri, "rouge") is None  # another metric is not comparable


def test_code_alpaca_is_gated_on_rouge_with_the_demo_base(tiny_base, tmp_path, mlflow_uri):
    """Before: the gate compared exact match, ~0 for base and tuned on open-ended answers, so it could never
    promote a real fine-tune. Now ROUGE-L (and BLEU, chrF, perplexity) is logged base vs tuned and auto picks
    rouge for these answers; the decision line names it."""
    rows = json.loads((SHARED_DATA / "code_alpaca_2k.json").read_text())[:200]
    path = tmp_path / "code_alpaca_200.json"
    path.write_text(json.dumps(rows))
    work = tmp_path / "work"
    model = ModelConfig(name_or_path=str(tiny_base))
    data = tokenize_dataset(DataConfig(path=str(path), max_length=192, eval_fraction=0.03, max_drop_fraction=0.2), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    train = TrainConfig(max_steps=6, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3,
                        logging_steps=1, save_steps=100)
    adapter = train_adapter(base, data, LoraSection(r=16, alpha=32, dropout=0.0), train, work)
    run = start_run(TrackingConfig(artifact_location=str(tmp_path / "art")), run_name="code-alpaca")
    metrics = ["exact_match", "rouge", "bleu", "chrf", "perplexity"]
    report = evaluate_adapter(base, adapter, data, EvalConfig(metrics=metrics, max_samples=6, max_new_tokens=16, batch_size=6), run)
    logged = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id).data.metrics
    for who in ("base", "tuned"):
        for m in metrics + ["loss"]:
            assert logged[f"eval/{who}/{m}"] == pytest.approx(report.metrics[f"eval/{who}/{m}"])
        assert report.metrics[f"eval/{who}/perplexity"] == pytest.approx(math.exp(report.metrics[f"eval/{who}/loss"]))
    print(f"\ncode alpaca, demo base, 6 steps: rouge-L base {logged['eval/base/rouge']:.4f} tuned {logged['eval/tuned/rouge']:.4f}; "
          f"chrF {logged['eval/base/chrf']:.4f} -> {logged['eval/tuned/chrf']:.4f}; "
          f"exact match {logged['eval/base/exact_match']:.2f} -> {logged['eval/tuned/exact_match']:.2f}")

    v = register_adapter(base, adapter, report, RegistryConfig(model_name="code", bootstrap_resamples=200), run, data)
    assert v.decision.startswith("rouge vs base: ") and f"n={len(report.samples)}" in v.decision
    mv = mlflow.MlflowClient(mlflow_uri).get_model_version("code", v.version)
    evidence = json.loads(mv.tags["promotion.evidence"])
    assert evidence["metric"] == "rouge"
    assert evidence["mean_diff"] == pytest.approx(sum(s["tuned_rouge"] - s["base_rouge"] for s in report.samples) / len(report.samples))
    assert "gate metric: rouge" in mv.description and "| rouge |" in mv.description
    stored = stored_scores(run.run_id, evidence["eval_set"], mlflow_uri, "rouge")
    assert stored == [s["tuned_rouge"] for s in report.samples]
