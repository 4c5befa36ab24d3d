"""What ``auto`` picks for the machine it runs on: the compute dtype (a timing probe) and gradient
checkpointing (an activation-memory estimate), each logged and recorded."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from qlora.config.schema import QuantizationConfig, TrainConfig
from qlora.models import compute_dtype, dtype_choice
from tasks.training.recipe import activation_bytes, checkpoint_every
from tests.conftest import REPO

PROBE = "import json; from qlora.models import cpu_compute_dtype as c; d, why = c(); print(json.dumps([str(d), why]))"


def _probe(**env) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), **env})
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_auto_compute_dtype_is_float32_where_bf16_is_emulated():
    """ATen and oneDNN limited to AVX2 dispatch as on an AVX2-only CPU: bf16 matmuls are emulated there
    (130x slower measured), so ``auto`` must not pick bf16."""
    dtype, why = _probe(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert dtype == "torch.float32", why
    assert "ATen capability AVX2" in why and "x the float32 time" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU probe is not consulted on a GPU")
def test_auto_compute_dtype_follows_the_probe_and_explicit_dtypes_win():
    dtype, why = dtype_choice(QuantizationConfig())
    ratio = float(why.split("took ")[1].split("x")[0])
    assert (dtype == torch.bfloat16) == (ratio <= 1.25), why
    assert compute_dtype(QuantizationConfig(compute_dtype="float32")) == torch.float32
    assert compute_dtype(QuantizationConfig(compute_dtype="bfloat16")) == torch.bfloat16


def test_quantized_base_records_the_dtype_choice(prepared):
    _, _, _, base = prepared
    assert base.compute_dtype in ("bfloat16", "float32") and base.dtype_choice.startswith("auto:")


def test_activation_estimate_matches_the_measured_7b_case():
    """Llama-2-7B shape, 4 x 1024 tokens, fp32 norms: 44.6 GB estimated; the H100 measured 48.8 GB peak without
    checkpointing vs 10.6 GB with it (38 GB of activations)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    assert activation_bytes(cfg, 4096, 4) / 1e9 == pytest.approx(44.6, abs=0.1)


def test_auto_checkpointing_is_off_for_the_demo_and_on_for_a_7b_batch(caplog):
    from transformers import LlamaConfig

    demo = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    big = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        assert checkpoint_every("auto", demo, 16 * 30, 4, 3 * 2**20) == 0  # ~35 MB of activations
        assert checkpoint_every("auto", big, 4 * 4096, 4, 3_600 * 2**20) == 1  # ~180 GB: more than any machine here
    assert "train.gradient_checkpointing=auto: off" in caplog.text and "train.gradient_checkpointing=auto: every layer" in caplog.text
    assert checkpoint_every(True, demo, 16, 4, 0) == 1 and checkpoint_every(False, big, 4 * 4096, 4, 0) == 0


@pytest.mark.parametrize("free_gb, every, layers_checkpointed", [
    (200, 0, 0),  # the 7B step's ~44.6 GB of activations fit a third of 196 GB: nothing recomputed
    (120, 6, 6),
    (100, 3, 11),
    (80, 2, 16),  # an 80 GB H100: 1 in 2 layers (~24.8 GB) fits its ~25.4 GB third; all 32 would recompute twice as much
    (40, 1, 32),  # too little for any fewer: every layer, as before
])
def test_auto_checkpoints_one_in_n_layers_where_only_part_fits(monkeypatch, caplog, free_gb, every, layers_checkpointed):
    """7B shape, seq 1024 x 4, fp32 norms (the H100 case in memory.py): n as large as the activations allow."""
    from transformers import LlamaConfig

    from tasks.training import recipe as memory

    big = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda: (int(free_gb * 1e9), "GPU 0"))
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        assert checkpoint_every("auto", big, 4 * 1024, 4, 3_589 * 2**20) == every
    if every > 1:
        assert f"auto: 1 in {every} decoder layers ({layers_checkpointed} of 32)" in caplog.text
    assert TrainConfig().gradient_checkpointing == "auto"


def test_one_in_n_checkpointing_reaches_the_layers_and_trains_the_same_adapter(prepared, monkeypatch):
    """The resolved n reaches the Trainer (transformers' every_n_layers, applied after peft's k-bit preparation):
    of the tiny base's 2 layers only layer 0 recomputes, and recomputing changes no number: the adapter after 3
    steps equals the one trained without checkpointing."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from qlora.config.schema import LoraSection
    from tasks.train import train_adapter
    from tasks.training import recipe

    work, _, data, base = prepared
    flags: list[list[bool]] = []

    class Layers(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0:
                flags.append([layer.gradient_checkpointing for layer in model.base_model.model.model.layers])

    adapters = {}
    for every in (2, 0):
        monkeypatch.setattr(recipe, "checkpoint_every", lambda *a, n=every: n)
        train = TrainConfig(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1,
                            save_steps=100, seed=7)
        a = train_adapter(base, data, LoraSection(r=4, alpha=8, dropout=0.0), train,
                          work / f"every-{every}", callbacks=(Layers(),))
        adapters[every] = load_file(f"{a.path}/adapter_model.safetensors")
    assert flags == [[True, False], [False, False]]
    assert adapters[2].keys() == adapters[0].keys()
    assert all(torch.equal(adapters[2][k], adapters[0][k]) for k in adapters[0])


# ------------------------------------------------------------------ train.optim: auto


def test_auto_optim_is_paged_8bit_on_a_gpu_fused_adamw_on_a_cpu_and_8bit_for_a_large_adapter(monkeypatch, caplog):
    from tasks.training import recipe as memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda: (20 * 2**30, "RAM"))
    with caplog.at_level(logging.INFO, logger="qlora.train"):
        assert memory.resolve_optim("auto", True, 1_114_112) == "paged_adamw_8bit"
        assert memory.resolve_optim("auto", False, 1_114_112) == "adamw_torch_fused"  # the demo's LoRA: 9 MB of states
        # Llama-2-7B, r=64 all-linear: 160 M parameters, 1.2 GB of fp32 states; a tenth of 20 GB is 2 GB
        assert memory.resolve_optim("auto", False, 160_000_000) == "adamw_torch_fused"
        monkeypatch.setattr(memory, "free_memory_bytes", lambda: (8 * 2**30, "RAM"))
        assert memory.resolve_optim("auto", False, 160_000_000) == "adamw_8bit"
    assert "train.optim=auto: adamw_8bit (a CPU, fp32 AdamW states 1.2 GB > a tenth of 8.0 GB free RAM)" in caplog.text
    assert memory.resolve_optim("paged_adamw_8bit", False, 10**12) == "paged_adamw_8bit"  # a named optimizer stays
    assert TrainConfig().optim == "auto"


def test_auto_optim_trains_with_torch_fused_adamw_on_a_cpu_and_the_adapter_records_it(prepared):
    """What ``auto`` resolves to is the optimizer the Trainer really builds, and the adapter (hence the
    registered version's ``train.optim`` tag) says which."""
    from transformers import TrainerCallback

    from qlora.config.schema import LoraSection
    from tasks.train import train_adapter

    work, _, data, base = prepared
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen["opt"] = getattr(optimizer, "optimizer", optimizer)

    train = TrainConfig(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                        save_steps=100, seed=7)
    adapter = train_adapter(base, data, LoraSection(r=8, alpha=16, dropout=0.0), train, work, callbacks=(Spy(),))
    assert type(seen["opt"]) is torch.optim.AdamW and seen["opt"].defaults["fused"] is True
    assert adapter.optim == "adamw_torch_fused"
