"""``train.distributed=fsdp``: what can be checked without GPUs (the training itself is in test_gpu.py).

FSDP + QLoRA needs the 4-bit weights stored in a float dtype; the config derives it, the quantize stage
writes it, the launcher passes accelerate's FSDP flags, and the checkpoint validator accepts FSDP's
sharded checkpoint layout.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from qlora.config.files import load_config
from qlora.config.schema import ModelConfig, PipelineConfig, QuantizationConfig
from qlora.errors import ConfigError
from tasks.training.checkpoints import checkpoint_problem
from tasks.training.launch import launcher_command


def test_fsdp_derives_float_quant_storage_and_ddp_keeps_uint8():
    assert PipelineConfig().quantization.quant_storage == "auto"
    fsdp = PipelineConfig.model_validate({"train": {"distributed": "fsdp", "num_processes": 4}})
    assert fsdp.quantization.quant_storage == "bfloat16"
    fp16 = PipelineConfig.model_validate({"train": {"distributed": "fsdp"}, "quantization": {"compute_dtype": "float16"}})
    assert fp16.quantization.quant_storage == "float16"


def test_fsdp_with_uint8_storage_is_rejected_naming_both_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  distributed: fsdp\nquantization:\n  quant_storage: uint8\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "train.distributed=fsdp" in str(e.value) and "quantization.quant_storage" in str(e.value)


def test_float_storage_quantizes_the_same_weights(tiny_base, tmp_path):
    """bf16 storage reinterprets the same packed NF4 bytes: identical logits to the uint8 checkpoint."""
    import bitsandbytes as bnb

    from qlora.models import load_base
    from tasks.quantize import prepare_quantized_model

    model = ModelConfig(name_or_path=str(tiny_base))
    outs = {}
    for storage in ("auto", "bfloat16"):
        # bf16 compute in both: auto would pick float32 on an AVX2-only CPU, where bf16 storage still computes in bf16
        ref = prepare_quantized_model(model, QuantizationConfig(quant_storage=storage, compute_dtype="bfloat16"), tmp_path)
        m = load_base(ref.path, None)  # the storage dtype travels in the checkpoint's config.json
        w = next(x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)).weight
        assert w.dtype == (torch.uint8 if storage == "auto" else torch.bfloat16)
        with torch.no_grad():
            outs[storage] = m(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.equal(outs["auto"], outs["bfloat16"])


def test_fsdp_launch_is_accelerate_with_fsdp_flags(tmp_path):
    spec = tmp_path / "spec.json"
    cmd = launcher_command(4, spec, gpus=4, strategy="fsdp")
    assert Path(cmd[0]).name == "accelerate" and cmd[1] == "launch" and "--multi_gpu" not in cmd
    flags = dict(zip(cmd[2::1], cmd[3::1]))
    assert "--use_fsdp" in cmd and flags["--fsdp_sharding_strategy"] == "FULL_SHARD"
    assert flags["--fsdp_cpu_ram_efficient_loading"] == "true" and flags["--fsdp_use_orig_params"] == "false"
    assert flags["--num_processes"] == "4" and cmd[-3:] == ["-m", "tasks.training.launch", str(spec)]
    with pytest.raises(ConfigError, match="train.distributed=fsdp needs CUDA GPUs"):
        launcher_command(2, spec, gpus=0, strategy="fsdp")


def _fsdp_checkpoint(d: Path, step: int) -> Path:
    """The layout the Trainer writes under FSDP with SHARDED_STATE_DICT (seen on an H100 run)."""
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        (d / sub).mkdir(parents=True)
        (d / sub / "__0_0.distcp").write_bytes(b"x" * 16)
        (d / sub / ".metadata").write_bytes(b"m")
    with zipfile.ZipFile(d / "scheduler.pt", "w") as z:
        z.writestr("archive/data.pkl", b"state")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_fsdp_checkpoint_layout_is_resumable_only_when_complete(tmp_path):
    ok = _fsdp_checkpoint(tmp_path / "checkpoint-20", 20)
    assert checkpoint_problem(ok) is None
    half = _fsdp_checkpoint(tmp_path / "checkpoint-40", 40)
    (half / "optimizer_0" / ".metadata").unlink()  # killed while the sharded optimizer was being written
    assert checkpoint_problem(half) == "optimizer_0/.metadata missing (sharded save did not finish)"
    (half / "optimizer_0").rename(half / "gone")
    assert checkpoint_problem(half) == "optimizer_0 missing"
