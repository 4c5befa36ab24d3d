"""Gradient checkpointing only where memory needs it (``train.gradient_checkpointing: auto``).

Full recompute costs about a third more compute per step (one more forward in backward). Measured:
the demo on 2 CPU cores trained at 4.3 steps/s with it and 6.8 without (one thread each); a 7B model
on an H100 (seq 1024 x 4) needed 48.8 GB without it and 10.6 GB with it (6,609 vs 4,947 tokens/s).
So the activations of the largest micro-batch may take a third of the memory left after the weights:
when they fit, no layer is checkpointed; when they do not, only every n-th decoder layer is (transformers'
``every_n_layers``), n as large as fits, so the recompute costs what the memory needs and no more;
every layer when nothing less fits. The decision and its numbers are logged.
"""

from __future__ import annotations

import logging

log = logging.getLogger("qlora.train")
SHARE = 1 / 3  # activations may take this share of the free memory before checkpointing is switched on


def activation_bytes(model_config, tokens: int, bytes_per_value: int) -> int:
    """Activations a decoder keeps for backward, per micro-batch of ``tokens`` tokens (no checkpointing).

    Per layer and token about 10 h + 4 i values (h hidden, i MLP width): norm inputs and outputs, q/k/v,
    the attention output and its projection's input, the MLP's gate, up, activation and product. The
    attention scores are not kept (sdpa). Checked against the H100 numbers above: 7B, 4096 tokens, fp32
    norms (4 bytes) -> 44.6 GB estimated for the 38 GB measured.
    """
    h = model_config.hidden_size
    i = getattr(model_config, "intermediate_size", None) or 4 * h
    return model_config.num_hidden_layers * tokens * (10 * h + 4 * i) * bytes_per_value


def free_memory_bytes() -> tuple[int, str]:
    """(bytes free for training, where): this process's GPU, else the machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.cuda.current_device())
        return int(free), f"GPU {torch.cuda.current_device()}"
    import psutil

    return int(psutil.virtual_memory().available), "RAM"


def max_tokens_per_micro_batch(train_split, batch_size: int) -> int:
    """Longest padded micro-batch: batch x longest row. The same bound holds for packing: true (the batch's rows
    back to back) and for packing: bfd, given the packed split, whose rows are the bins."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(train_split.data.column("input_ids"))
    longest = pc.max(lengths).as_py() or 0
    return batch_size * int(longest)


def checkpoint_every(setting: bool | str, model_config, tokens: int, bytes_per_value: int, weights_bytes: int) -> int:
    """``train.gradient_checkpointing`` resolved to the decoder layers checkpointed: 0 none, 1 every layer, n every
    n-th layer (layers 0, n, 2n, ...). ``True`` is every layer; ``auto`` the largest n whose activations fit."""
    if setting != "auto":
        return 1 if setting else 0
    layers = model_config.num_hidden_layers
    full = activation_bytes(model_config, tokens, bytes_per_value)
    per_layer = full / layers
    kept_input = tokens * model_config.hidden_size * bytes_per_value  # all a checkpointed layer keeps

    def need(n: int) -> float:  # checkpointed layers keep their input; one is recomputed at a time in backward
        ckpt = -(-layers // n)
        return (layers - ckpt) * per_layer + ckpt * kept_input + per_layer

    free, where = free_memory_bytes()
    room = max(free - weights_bytes, 1)
    budget = SHARE * room
    every = 0 if full <= budget else next((n for n in range(layers, 1, -1) if need(n) <= budget), 1)
    what = f"1 in {every} decoder layers ({-(-layers // every)} of {layers})" if every > 1 else ["off", "every layer"][every]
    log.info("train.gradient_checkpointing=auto: %s (activations ~%.0f MB for %d tokens per micro-batch without it, "
             "%.1f%% of the %.1f GB %s left after the weights; a third may go to activations)", what, full / 2**20,
             tokens, 100 * full / room, room / 2**30, where)
    return every


OPTIM_SHARE = 1 / 10  # fp32 AdamW states may take this share of the free RAM before auto keeps 8-bit states


def resolve_optim(setting: str, on_gpu: bool, trainable_params: int) -> str:
    """``train.optim`` resolved: a named optimizer as it is; ``auto`` paged 8-bit AdamW (QLoRA's) on a GPU, where
    its states' memory matters and its kernels are fast, and torch's fused AdamW on a CPU, unless its fp32
    states (8 bytes per trainable parameter) would take more than a tenth of the free RAM (then 8-bit).

    Measured on 2 Xeon cores (AVX-512), the demo's LoRA (1.1 M parameters, r=64 all-linear): one optimizer step
    takes 40-52 ms with bitsandbytes' 8-bit AdamW (its blockwise re-quantization runs single-threaded), 10-16 ms
    with torch's AdamW (foreach or per tensor) and 1.4-1.7 ms fused; the demo trains at 6.3-6.4 steps/s fused
    against 4.8 with 8-bit (bf16, 200 steps)."""
    if setting != "auto":
        return setting
    if on_gpu:
        choice, why = "paged_adamw_8bit", "a GPU"
    else:
        states = 8 * trainable_params
        free, _ = free_memory_bytes()
        if states > OPTIM_SHARE * free:
            choice, why = "adamw_8bit", f"a CPU, fp32 AdamW states {states / 2**30:.1f} GB > a tenth of {free / 2**30:.1f} GB free RAM"
        else:
            choice, why = "adamw_torch_fused", f"a CPU, fp32 AdamW states {states / 2**20:.0f} MB"
    log.info("train.optim=auto: %s (%s)", choice, why)
    return choice
