"""Generation eval during training, checkpoint selection, early stopping on the task metric and a LoggedModel per
checkpoint (tasks/training/selection.py, tasks/training/logged_models.py), on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.config.schema import EvalConfig, LoraSection, PipelineConfig, RegistryConfig, TrackingConfig, TrainConfig
from tasks.train import train_adapter
from tasks.training.selection import GenerationEval, best, during_rows, evals_since_best, evaluations, row_roles

LORA = LoraSection(r=4, alpha=8, dropout=0.0)
# The tiny random Llama's answers after a few steps overlap the references a little (ROUGE-L > 0) at some
# steps and not at others, while its eval loss keeps falling: the two criteria choose different checkpoints.
METRIC = "rouge"


def _train(**kw) -> TrainConfig:
    return TrainConfig(**({"max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                           "learning_rate": 2e-3, "logging_steps": 1, "save_steps": 100, "save_total_limit": 1} | kw))


def _during(train: TrainConfig, **kw) -> GenerationEval:
    ev = EvalConfig(**({"every_steps": 2, "during_samples": 16, "max_samples": 8, "max_new_tokens": 6, "batch_size": 8,
                        "metrics": ["exact_match", "rouge"]} | kw))
    return GenerationEval.of(train, ev, METRIC)


def test_best_ties_go_to_the_earlier_step_and_patience_counts_from_the_best():
    evals = [{"step": s, "value": v, "eval_loss": l} for s, v, l in [(2, 0.5, 3.0), (4, 1.0, 2.0), (6, 1.0, 1.0), (8, 1.0, 1.0)]]
    assert best(evals, "task_metric")["step"] == 4  # 1.0 three times: the earliest
    assert best(evals, "eval_loss")["step"] == 6  # 1.0 twice: the earliest
    # Exact match at its maximum cannot improve: the run stops `patience` evaluations after reaching it.
    assert evals_since_best(evals, "task_metric", 0.0) == 2
    assert evals_since_best(evals, "eval_loss", 0.0) == 1
    # min_delta: an improvement must exceed it (3.0 -> 2.0 is not one of more than 1.0; 3.0 -> 1.0 is)
    assert evals_since_best(evals, "eval_loss", 1.0) == 1
    assert evals_since_best(evals, "eval_loss", 2.0) == 3
    assert evals_since_best(evals[:1], "task_metric", 0.0) == 0


def test_during_slice_is_the_end_of_the_eval_split_disjoint_from_the_gate_rows():
    rows, warning = during_rows(600, 200, 64)
    assert (rows.start, rows.stop, warning) == (536, 600, None)
    rows, warning = during_rows(240, 200, 64)  # too small for both: shrunk, never overlapping the gate's rows
    assert (rows.start, rows.stop) == (200, 240) and "40 of eval.during_samples=64" in warning
    rows, warning = during_rows(150, 200, 64)
    assert len(rows) == 0 and "no row is left" in warning
    text = row_roles(600, EvalConfig(every_steps=100, max_samples=200, during_samples=64))
    assert "eval rows 0..199 (200): final evaluation" in text and "eval rows 536..599 (64): generation eval every 100" in text


def test_config_rules_name_the_keys():
    with pytest.raises(ValueError, match="eval.every_steps is unset"):
        PipelineConfig.model_validate({"train": {"select_checkpoint": "task_metric"}})
    with pytest.raises(ValueError, match="eval.every_steps is unset"):
        PipelineConfig.model_validate({"train": {"early_stopping_metric": "task_metric", "early_stopping_patience": 2}})
    PipelineConfig.model_validate({"train": {"early_stopping_metric": "eval_loss", "early_stopping_patience": 2}})
    cfg = PipelineConfig.model_validate({"eval": {"every_steps": 50}})
    spec = GenerationEval.of(cfg.train, cfg.eval, "exact_match")
    assert (spec.select, spec.stop_on, spec.patience) == ("task_metric", "task_metric", None)


def test_generation_eval_logs_history_checkpoints_and_selects_the_best(prepared):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    work, _, data, base = prepared
    seen = []

    class Spy(TrainerCallback):  # runs after the eval callback at every step
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((state.global_step, model.training, model.config.use_cache, control.should_save))

    train = _train()
    a = train_adapter(base, data, LORA, train, work, callbacks=(Spy(),), during=_during(train))
    assert [e["step"] for e in a.evaluations] == [2, 4, 6]
    history = json.loads((Path(a.run_dir) / f"checkpoint-{a.selected_step}" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, a.selected_step + 1))  # evals cost no loss point
    assert all(0.0 <= e["value"] <= 1.0 and 0 < e["eval_loss"] < 20 for e in a.evaluations)
    # Back in train mode without the KV cache after each eval; a checkpoint is asked for at every eval step.
    assert all(training and not cache for _, training, cache, _ in seen)
    assert [s for s, _, _, save in seen if save] == [2, 4, 6]
    chosen = best(a.evaluations, "task_metric")
    assert (a.selected_step, a.selected_by, a.selected_metric, a.selected_value) == (chosen["step"], "task_metric", METRIC, chosen["value"])
    # The history is in the checkpoint (restored on resume) and the best checkpoint survived rotation.
    ckpt = Path(a.run_dir) / f"checkpoint-{a.selected_step}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert evaluations(state["log_history"], METRIC) == [e for e in a.evaluations if e["step"] <= a.selected_step]
    got, want = load_file(str(Path(a.path) / "adapter_model.safetensors")), load_file(str(ckpt / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert a.generation_eval_s > 0


def test_early_stopping_on_the_task_metric(prepared):
    work, _, data, base = prepared
    train = _train(max_steps=40, early_stopping_patience=2, early_stopping_min_delta=0.5)  # no step improves rouge by 0.5
    a = train_adapter(base, data, LORA, train, work, during=_during(train))
    assert [e["step"] for e in a.evaluations] == [2, 4, 6] and a.global_step == 6  # first eval, then 2 without improving
    assert evals_since_best(a.evaluations, "task_metric", 0.5) == 2


def test_task_metric_and_eval_loss_register_different_checkpoints_with_logged_models(prepared, mlflow_uri, tmp_path):
    import mlflow

    from qlora.tracking.runs import start_run
    from registry.register import register_adapter
    from tasks.evaluate import evaluate_adapter

    work, _, data, base = prepared
    run = start_run(TrackingConfig(uri=mlflow_uri, artifact_location=str(tmp_path / "art")), "select")
    train = _train()
    client = mlflow.MlflowClient(mlflow_uri)
    versions = {}
    for by in ("task_metric", "eval_loss"):
        t = train.model_copy(update={"select_checkpoint": by})
        a = train_adapter(base, data, LORA, t, work / by, run, during=_during(t))
        report = evaluate_adapter(base, a, data, EvalConfig(max_samples=8, max_new_tokens=6, batch_size=8,
                                                            metrics=["exact_match", "rouge"]), run)
        cfg = RegistryConfig(model_name=f"sel-{by.replace('_', '-')}", consumer_check_prompts=0)
        versions[by] = (a, client.get_model_version(cfg.model_name, register_adapter(base, a, report, cfg, run).version))

    (by_metric, v_metric), (by_loss, v_loss) = versions["task_metric"], versions["eval_loss"]
    assert by_metric.evaluations == by_loss.evaluations  # same seed, same trajectory: only the choice differs
    evals = by_metric.evaluations
    top = max(e["value"] for e in evals)
    low = min(e["eval_loss"] for e in evals)
    assert by_metric.selected_step == min(e["step"] for e in evals if e["value"] == top)
    assert by_loss.selected_step == min(e["step"] for e in evals if e["eval_loss"] == low)
    assert by_metric.selected_step != by_loss.selected_step, evals  # the premise of this test
    for a, mv, by, value in ((by_metric, v_metric, "task_metric", top), (by_loss, v_loss, "eval_loss", low)):
        assert mv.tags["checkpoint.step"] == str(a.selected_step)
        assert mv.tags["checkpoint.selected_by"] == by
        assert float(mv.tags["checkpoint.value"]) == pytest.approx(value, rel=1e-5)
        lm = client.get_logged_model(mv.tags["checkpoint.model_id"])
        assert lm.name == f"checkpoint-{a.selected_step}" and lm.tags["checkpoint.step"] == str(a.selected_step)

    # One LoggedModel per evaluated checkpoint and training run, its metrics logged against its model_id and the slice.
    exp = client.get_run(run.run_id).info.experiment_id
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.run_id}' AND model_type = 'peft-lora-checkpoint'")
    assert sorted(m.name for m in models) == sorted(f"checkpoint-{s}" for s in (2, 4, 6) for _ in range(2))
    for m in models:
        step = int(m.tags["checkpoint.step"])
        e = next(e for e in evals if e["step"] == step)
        metrics = {x.key: x for x in m.metrics}
        assert metrics[f"during_eval/{METRIC}"].value == pytest.approx(e["value"])
        assert metrics["during_eval/loss"].value == pytest.approx(e["eval_loss"])
        assert metrics["during_eval/loss"].step == step and metrics["during_eval/loss"].dataset_name == "eval-during-training"
        files = {f.path for f in client.list_logged_model_artifacts(m.model_id)}
        assert files == {"adapter_model.safetensors", "adapter_config.json"}
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    assert "eval-during-training" in {d.dataset.name for d in inputs}
