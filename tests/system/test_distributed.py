"""``train.num_processes=2``: the training stage under torchrun (gloo, 2 CPU processes), 4-bit base.

Quantization stays ON here: bitsandbytes' 4-bit layers + LoRA + Trainer run under DDP on CPU
(gloo) because training uses non-reentrant gradient checkpointing.
"""

import logging
from pathlib import Path

import mlflow
import pytest

from qlora.config.schema import DataConfig, LoraSection, ModelConfig, QuantizationConfig, TrackingConfig, TrainConfig
from qlora.tracking.runs import end_run, start_run
from tasks.quantize import prepare_quantized_model
from tasks.tokenize import tokenize_dataset
from tasks.train import train_adapter
from tests.conftest import DEMO_DATA


@pytest.mark.slow  # torchrun, two processes: ~17 s
def test_two_process_training_only_rank0_logs_and_saves(tiny_base, tmp_path, mlflow_uri, caplog):
    work = tmp_path / "work"
    model = ModelConfig(name_or_path=str(tiny_base))
    data = tokenize_dataset(DataConfig(path=str(DEMO_DATA), max_length=64, eval_fraction=0.02), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    assert base.quantized
    run = start_run(TrackingConfig(artifact_location=str(tmp_path / "mlartifacts")), run_name="ddp")
    train = TrainConfig(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                        learning_rate=2e-3, logging_steps=1, save_steps=3, num_processes=2)
    with caplog.at_level(logging.INFO, logger="qlora.distributed"):
        a = train_adapter(base, data, LoraSection(r=4, alpha=8, dropout=0.0), train, work, run)
    end_run(run)

    assert a.global_step == 6
    streamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[ddp]")]
    # Both ranks built the model (their logs were streamed into the task log) ...
    assert any("rank0" in m and "trainable" in m for m in streamed)
    assert any("rank1" in m and "trainable" in m for m in streamed)
    # ... in one gloo process group of 2, set up by the Trainer.
    assert any("rank0" in m and "backend gloo, world size 2" in m for m in streamed)
    assert (Path(a.path) / "adapter_model.safetensors").is_file()
    assert (Path(a.run_dir) / "checkpoint-6" / "trainer_state.json").is_file()
    # A finished adapter is reused without launching anything.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora.distributed"):
        assert train_adapter(base, data, LoraSection(r=4, alpha=8, dropout=0.0), train, work, None) == a
    assert not any("launching" in r.getMessage() for r in caplog.records)
    # Only rank 0 reported: one loss value per logged step, not two.
    hist = mlflow.MlflowClient(mlflow_uri).get_metric_history(run.run_id, "loss")
    assert sorted(h.step for h in hist) == list(range(1, 7))


def test_launcher_is_accelerate_on_gpus_and_torchrun_on_cpu(tmp_path):
    import pytest

    from qlora.errors import ConfigError
    from tasks.training.launch import launcher_command

    spec = tmp_path / "spec.json"
    gpu = launcher_command(4, spec, gpus=4)
    assert Path(gpu[0]).name == "accelerate" and gpu[1:3] == ["launch", "--multi_gpu"]
    assert gpu[gpu.index("--num_processes") + 1] == "4" and gpu[-3:] == ["-m", "tasks.training.launch", str(spec)]
    cpu = launcher_command(2, spec, gpus=0)
    assert cpu[1:3] == ["-m", "torch.distributed.run"] and cpu[cpu.index("--nproc_per_node") + 1] == "2"
    with pytest.raises(ConfigError, match="train.num_processes=8"):
        launcher_command(8, spec, gpus=4)


@pytest.mark.slow  # torchrun, two processes: ~25 s
def test_two_process_generation_eval_rank0_generates_all_ranks_agree(tiny_base, tmp_path, mlflow_uri, caplog):
    """eval.every_steps under DDP: rank 0 generates on the whole slice, the other rank waits for its result
    (one broadcast), both take the same save/stop decision, and only rank 0 writes LoggedModels."""
    from qlora.config.schema import EvalConfig
    from tasks.training.selection import GenerationEval

    work = tmp_path / "work"
    model = ModelConfig(name_or_path=str(tiny_base))
    data = tokenize_dataset(DataConfig(path=str(DEMO_DATA), max_length=64, eval_fraction=0.02), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    run = start_run(TrackingConfig(artifact_location=str(tmp_path / "mlartifacts")), run_name="ddp-eval")
    train = TrainConfig(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=2e-3,
                        logging_steps=1, save_steps=100, num_processes=2, early_stopping_patience=5)
    during = GenerationEval.of(train, EvalConfig(every_steps=3, during_samples=8, max_samples=8, max_new_tokens=4,
                                                 batch_size=8, metrics=["exact_match", "rouge"]), "rouge")
    with caplog.at_level(logging.INFO, logger="qlora.distributed"):
        a = train_adapter(base, data, LoraSection(r=4, alpha=8, dropout=0.0), train, work, run, during=during)
    end_run(run)

    assert a.global_step == 6 and [e["step"] for e in a.evaluations] == [3, 6]
    assert a.selected_step in (3, 6) and a.selected_by == "task_metric"
    streamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[ddp]")]
    evals = [m for m in streamed if "eval loss" in m and "held-out rows" in m]
    assert evals and all("rank0" in m for m in evals)  # only rank 0 generated (and said so)
    assert (Path(a.run_dir) / "checkpoint-3" / "trainer_state.json").is_file()  # the eval step's checkpoint
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_run(run.run_id).info.experiment_id
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run.run_id}'")
    assert sorted(m.name for m in models) == ["checkpoint-3", "checkpoint-6"]  # once each, from rank 0
    assert a.checkpoint_model_id in {m.model_id for m in models}
