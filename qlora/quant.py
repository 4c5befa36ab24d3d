"""Quantization in one place: the BitsAndBytesConfig, the compute dtype and the device map.

Nothing else in the project builds a quantization config.
"""

from __future__ import annotations

import torch

from qlora.config import QuantizationConfig


def compute_dtype(cfg: QuantizationConfig) -> torch.dtype:
    """bf16 where the hardware has it (CPU, Ampere and newer GPUs), else fp16 (V100, T4)."""
    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    if cfg.quant_storage in ("bfloat16", "float16"):  # FSDP: compute in the storage dtype
        return getattr(torch, cfg.quant_storage)
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def device_map() -> dict[str, int | str]:
    """Whole model on one device. Under torchrun/accelerate each process takes its LOCAL_RANK GPU."""
    if torch.cuda.is_available():
        import os

        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def bnb_config(cfg: QuantizationConfig):
    """The ``quantization_config`` for ``from_pretrained``, or None when 4-bit loading is off."""
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        # uint8 packs two 4-bit values per byte; a float storage dtype (same bytes, reinterpreted) is
        # what lets FSDP flatten and shard the 4-bit weights with the rest of the model.
        bnb_4bit_quant_storage=quant_storage_dtype(cfg),
    )


def quant_storage_dtype(cfg: QuantizationConfig) -> torch.dtype:
    return torch.uint8 if cfg.quant_storage == "auto" else getattr(torch, cfg.quant_storage)


def count_4bit_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
