"""``qlora/models.py``: one place loads every model and tokenizer, so a base whose tokenizer has no pad
token (Llama-3, Mistral) trains, evaluates and registers like any other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow

from demo.build import write_demo_data
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
from qlora.models import ModelCache, load_tokenizer
from qlora.tracking.runs import start_run
from registry.consumer import predict
from registry.register import register_adapter
from tasks.evaluate import evaluate_adapter
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter


def without_pad_token(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose tokenizer and configs know no pad token (as Llama-3 ships)."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.pad_token = None
    tok.save_pretrained(dst)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((dst / name).read_text())
        cfg.pop("pad_token_id", None)
        (dst / name).write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(dst).pad_token is None
    return dst


def test_base_without_pad_token_trains_evaluates_and_registers(tiny_base, tmp_path, mlflow_uri):
    base_dir = without_pad_token(tiny_base, tmp_path / "no-pad-base")
    work = tmp_path / "work"
    # Rows of 3 to 5 words: examples of different lengths, so every batch needs padding.
    rows = write_demo_data(tmp_path / "rows.jsonl", n=300, min_words=3, max_words=5)
    model = ModelConfig(name_or_path=str(base_dir))
    data = tokenize_dataset(DataConfig(path=str(rows), max_length=64, eval_fraction=0.02), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    saved = load_tokenizer(base.path)
    assert saved.pad_token == saved.eos_token  # fixed once, saved with the quantized base

    train = TrainConfig(max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                        learning_rate=2e-3, logging_steps=1, save_steps=100)
    adapter = train_adapter(base, data, LoraSection(r=4, alpha=8, dropout=0.0), train, work)
    assert adapter.global_step == 3

    models = ModelCache()
    report = evaluate_adapter(base, adapter, data, EvalConfig(max_samples=4, max_new_tokens=4, batch_size=4), models=models)
    assert len(report.samples) == 4 and report.metrics["eval/tuned/loss"] > 0
    _, tok = models.tuned(base, adapter)
    assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id  # batched generation

    run = start_run(TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "mlartifacts")), run_name="no-pad")
    version = register_adapter(base, adapter, report, RegistryConfig(model_name="no-pad", bootstrap_resamples=100,
                                                                     consumer_check_prompts=2), run, data, models)
    assert version.version == "1" and "challenger" in version.aliases
    assert mlflow.MlflowClient(mlflow_uri).get_model_version("no-pad", "1").tags["promotion"]
    out = predict("models:/no-pad@challenger", ["Reverse the order of these words: apple river stone"], max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)
    from registry.trust import check_loadable

    check_loadable("models:/no-pad@challenger")  # what we register loads without remote code or pickles

    # A consumer whose own code logs elsewhere: predict's tracking_uri is for that call only.
    elsewhere = (tmp_path / "consumers-own-mlruns").as_uri()
    mlflow.set_tracking_uri(elsewhere)
    try:
        assert predict("models:/no-pad@challenger", ["Reverse the order of these words: apple river stone"],
                       max_new_tokens=4, tracking_uri=mlflow_uri) == out
        assert mlflow.get_tracking_uri() == elsewhere  # was mlflow_uri: the registry's store, for every later call
    finally:
        mlflow.set_tracking_uri(mlflow_uri)
