"""Quantization in one place: the BitsAndBytesConfig, the compute dtype and the device map.

Nothing else in the project builds a quantization config.
"""

from __future__ import annotations

import functools
import logging

import torch

from qlora.config.schema import QuantizationConfig

log = logging.getLogger("qlora.quant")


def compute_dtype(cfg: QuantizationConfig) -> torch.dtype:
    """The dtype of the 4-bit matmuls: what the config names, or for ``auto`` the faster one here."""
    return dtype_choice(cfg)[0]


def dtype_choice(cfg: QuantizationConfig) -> tuple[torch.dtype, str]:
    """(compute dtype, why): recorded in the quantized checkpoint's lineage."""
    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype), "set by quantization.compute_dtype"
    if cfg.quant_storage in ("bfloat16", "float16"):  # FSDP: compute in the storage dtype
        return getattr(torch, cfg.quant_storage), f"auto: the FSDP storage dtype {cfg.quant_storage}"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16 on a GPU that supports it (Ampere and newer)"
        return torch.float16, "auto: fp16 on a GPU without bf16 (V100, T4)"
    return cpu_compute_dtype()


@functools.lru_cache(maxsize=1)
def cpu_compute_dtype() -> tuple[torch.dtype, str]:
    """bf16 where this CPU multiplies bf16 about as fast as fp32 (native bf16: Zen 4, Sapphire Rapids), else fp32.

    Decided by timing, not by flags: what matters is the kernel torch and oneDNN dispatch here. Where
    bf16 is emulated, as on AVX2-only CPUs (``torch.backends.cpu.get_cpu_capability()`` == "AVX2"), a bf16
    matmul measured 130x the fp32 time and the demo trained 5-7x slower than in fp32; with native bf16
    the demo trained 13% faster in bf16 (6.9 vs 6.1 steps/s on a Zen 4). The probe is a 128x512x512
    matmul per dtype, best of 15 interleaved calls after a warm-up: about 20 ms with native bf16, 0.2 s where
    it is emulated (it stops at the first slow bf16 call). bf16 is kept when within 1.25x of fp32: it halves the memory
    of activations and dequantized weights.
    """
    import time

    cap = torch.backends.cpu.get_cpu_capability()
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    pairs = {dt: (a.to(dt), b.to(dt)) for dt in (torch.float32, torch.bfloat16)}
    for _ in range(3):
        for x, y in pairs.values():
            torch.matmul(x, y)  # warm-up: first-call dispatch, oneDNN's kernel generation, allocation

    def once(dtype) -> float:
        t0 = time.perf_counter()
        torch.matmul(*pairs[dtype])
        return time.perf_counter() - t0

    # Interleaved and best-of: a busy machine (another run, a test suite) slows single calls of either
    # dtype, never their minimum by much; measuring one dtype after the other let a burst of load land on
    # one side only, and the choice flipped between runs on one machine (a resumed run then continued in
    # another dtype). Emulated bf16 stops after the first call that is 10x slower than fp32's best.
    fp32 = bf16 = float("inf")
    for _ in range(15):
        fp32 = min(fp32, once(torch.float32))
        bf16 = min(bf16, once(torch.bfloat16))
        if bf16 > 10 * fp32:
            break
    ratio = bf16 / max(fp32, 1e-9)
    dtype = torch.bfloat16 if ratio <= 1.25 else torch.float32
    why = (f"auto: {str(dtype).removeprefix('torch.')} on this CPU (ATen capability {cap}; a bf16 matmul took "
           f"{ratio:.2f}x the float32 time)")
    log.info("quantization.compute_dtype=%s", why)
    return dtype, why


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
