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
