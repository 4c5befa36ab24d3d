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

from qlora.config import QuantizationConfig, TrainConfig
from qlora.quant import compute_dtype, dtype_choice
from tasks.training.memory import activation_bytes, use_checkpointing

from .conftest import REPO

PROBE = "import json; from qlora.quant import cpu_compute_dtype as c; d, why = c(); print(json.dumps([str(d), why]))"


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
        assert not use_checkpointing("auto", demo, 16 * 30, 4, 3 * 2**20)  # ~35 MB of activations
        assert use_checkpointing("auto", big, 4 * 4096, 4, 3_600 * 2**20)  # ~180 GB: more than any machine here
    assert "train.gradient_checkpointing=auto: off" in caplog.text and "train.gradient_checkpointing=auto: on" in caplog.text
    assert use_checkpointing(True, demo, 16, 4, 0) and not use_checkpointing(False, big, 4 * 4096, 4, 0)
    assert TrainConfig().gradient_checkpointing == "auto"
