"""CUDA-only paths: the demo recipe on a GPU, the paged optimizer really paged, FSDP + QLoRA.

Skipped on CPU (CI has no GPU). Run on a GPU machine with ``pytest -m gpu tests/system/test_gpu.py``; the
stages here need only torch/transformers/peft/bitsandbytes/datasets/evaluate (no MLflow, no Prefect).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from qlora.config.files import load_config
from qlora.config.schema import DataConfig, EvalConfig, LoraSection, ModelConfig, PipelineConfig, QuantizationConfig, TrainConfig
from tests.conftest import DEMO_DATA, REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def demo_on_gpu(tmp_path_factory):
    """The demo's base (4 layers, width 256) and data, tokenized and quantized as `make demo` does."""
    from demo.build import build_demo_base
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset

    work = tmp_path_factory.mktemp("gpu")
    model = ModelConfig(name_or_path=str(build_demo_base(work / "base", DEMO_DATA)))
    data = tokenize_dataset(DataConfig(path=str(DEMO_DATA), format="alpaca", max_length=64, eval_fraction=0.1), model, work)
    base = prepare_quantized_model(model, QuantizationConfig(), work)
    return work, model, data, base


def test_quantized_base_lives_on_the_gpu_in_nf4(demo_on_gpu):
    import bitsandbytes as bnb

    from qlora.models import load_base

    _, _, _, base = demo_on_gpu
    m = load_base(base.path, None)
    layers = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7  # q, k, v, o, gate, up, down per block
    w = layers[0].weight
    assert w.device.type == "cuda" and w.quant_state.quant_type == "nf4" and w.dtype == torch.uint8
    assert w.quant_state.dtype == torch.bfloat16  # compute dtype picked by "auto" on an Ampere+ GPU


def test_demo_recipe_learns_on_gpu_with_paged_8bit_adamw(demo_on_gpu):
    """The demo config's training on CUDA: real paged 8-bit AdamW, loss falls, the tuned adapter answers."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    from tasks.evaluate import evaluate_adapter
    from tasks.train import train_adapter

    work, _, data, base = demo_on_gpu
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            seen["optimizer"] = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    demo = load_config(REPO / "configs" / "demo.yaml")  # the recipe make demo runs, whatever it is today
    train, steps = demo.train, demo.train.max_steps
    a = train_adapter(base, data, demo.lora, train, work, callbacks=(Spy(),))
    opt = seen["optimizer"]
    # transformers builds bitsandbytes' AdamW with optim_bits=8, is_paged=True for "paged_adamw_8bit".
    assert isinstance(opt, bnb.optim.optimizer.Optimizer8bit), type(opt)
    # Paged on CUDA (bitsandbytes pages state buffers of >= 1e5 elements, none at this size), 8-bit states
    # for every LoRA matrix of >= 4096 elements.
    assert opt.is_paged
    states = [st["state1"] for st in opt.state.values() if "state1" in st and st["state1"].numel() >= 4096]
    assert states and all(s.dtype == torch.uint8 and s.is_cuda for s in states)
    assert a.global_step == steps and a.last_loss < a.first_loss / 5
    rep = evaluate_adapter(base, a, data, EvalConfig(max_new_tokens=8, max_samples=200, batch_size=50))
    print("gpu demo:", rep.metrics, f"train {a.train_runtime_s:.1f} s")
    assert rep.metrics["eval/base/exact_match"] <= 0.05
    assert rep.metrics["eval/tuned/exact_match"] >= 0.95  # the CPU grid's goal (make bench-quality)


def test_fsdp_qlora_trains_saves_and_resumes(demo_on_gpu, caplog):
    """train.distributed=fsdp: bf16 quant storage, accelerate launch with FSDP (one GPU here, so one
    shard), a plain PEFT adapter at the end, sharded checkpoints that a re-run resumes from."""
    from safetensors.torch import load_file

    from tasks.quantize import prepare_quantized_model
    from tasks.train import train_adapter
    from tasks.training.checkpoints import checkpoint_problem

    work, model, data, _ = demo_on_gpu
    cfg = PipelineConfig.model_validate({"train": {"distributed": "fsdp"}})
    assert cfg.quantization.quant_storage == "bfloat16"
    base = prepare_quantized_model(model, cfg.quantization, work)
    train = TrainConfig(max_steps=40, per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-3,
                        logging_steps=10, save_steps=20, distributed="fsdp", num_processes=1)
    lora = LoraSection(r=16, alpha=32, dropout=0.0)
    with caplog.at_level(logging.INFO, logger="qlora.distributed"):
        a = train_adapter(base, data, lora, train, work)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "--use_fsdp" in text and "(fsdp)" in text
    assert a.global_step == 40 and a.last_loss < a.first_loss
    weights = load_file(str(Path(a.path) / "adapter_model.safetensors"))
    assert weights and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in weights)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    # A plain PEFT adapter: it loads onto the 4-bit base outside FSDP, every LoRA tensor from the file.
    from qlora.models import load_tuned

    tuned, _ = load_tuned(base, a)
    loaded = {n: p for n, p in tuned.named_parameters() if "lora_" in n}
    assert len(loaded) == len(weights)
    k = next(k for k in weights if "lora_B" in k)
    p = loaded[k.replace(".lora_B.weight", ".lora_B.default.weight")]
    assert torch.equal(p.detach().cpu().to(weights[k].dtype), weights[k])
    del tuned
    run_dir = Path(a.run_dir)
    for step in (20, 40):
        ckpt = run_dir / f"checkpoint-{step}"
        assert (ckpt / "pytorch_model_fsdp_0").is_dir(), sorted(p.name for p in ckpt.iterdir())
        assert checkpoint_problem(ckpt) is None
    # Lose the end of the run: the re-run resumes from the sharded checkpoint-20.
    shutil.rmtree(run_dir / "checkpoint-40")
    shutil.rmtree(run_dir / "adapter")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        b = train_adapter(base, data, lora, train, work)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "resuming from" in text and "checkpoint-20" in text
    assert b.global_step == 40 and b.resumed_from_step == 20


def test_bfd_bins_train_with_flex_attention_as_with_sdpa(demo_on_gpu):
    """train.packing: bfd with PyTorch's FlexAttention (the varlen path without a flash-attn build): trains, and its
    first loss equals sdpa's on the same bins (the same examples kept apart), its last loss close to it."""
    from tasks.quantize import prepare_quantized_model
    from tasks.train import train_adapter

    work, model, data, _ = demo_on_gpu
    train = TrainConfig(packing="bfd", max_steps=30, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                        learning_rate=1e-3, logging_steps=1, save_steps=1000, fp32_norms=False)
    runs = {}
    for attn in ("sdpa", "flex_attention"):
        base = prepare_quantized_model(model.model_copy(update={"attn_implementation": attn}), QuantizationConfig(), work)
        runs[attn] = train_adapter(base, data, LoraSection(r=16, alpha=32, dropout=0.0), train, work / attn)
    assert runs["flex_attention"].global_step == 30
    assert runs["flex_attention"].first_loss == pytest.approx(runs["sdpa"].first_loss, rel=1e-2)
    assert runs["flex_attention"].last_loss == pytest.approx(runs["sdpa"].last_loss, rel=0.1)
    assert runs["flex_attention"].last_loss < runs["flex_attention"].first_loss / 2
