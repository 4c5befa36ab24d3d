"""Training steps/s through our training stage vs a minimal PEFT loop on the same model and batches.

Both sides: the same pre-quantized base, LoRA config, gradient checkpointing setting, tokenized
batches (same collator, same order: no shuffling in the loop, and the Trainer's order does not
change the per-step work), and bitsandbytes' PagedAdamW8bit. The minimal loop does forward,
backward, clip, optimizer step and nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path


def minimal_loop_steps_per_s(base_path: str, data_path: str, cfg, steps: int, checkpointing: bool) -> float:
    import bitsandbytes as bnb
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from tasks.training.recipe import build_peft_model

    torch.manual_seed(cfg.train.seed)
    tok = AutoTokenizer.from_pretrained(base_path)
    ds = load_from_disk(data_path)["train"]
    model = build_peft_model(base_path, cfg.lora, checkpointing, quantized=True)
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=cfg.train.learning_rate)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    bs = cfg.train.per_device_train_batch_size
    batches = [collate([ds[j] for j in range(i * bs, (i + 1) * bs)]) for i in range(steps)]
    t0 = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def measure(config_path: str, workdir: Path, steps: int = 120) -> dict[str, float]:
    from qlora.config import load_config
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_adapter

    cfg = load_config(
        config_path,
        [f"workdir={workdir}", f"train.max_steps={steps}", "train.gradient_accumulation_steps=1",
         f"train.save_steps={steps * 10}", f"train.logging_steps={max(steps // 4, 1)}"],
    )
    data = tokenize_dataset(cfg.data, cfg.model, cfg.workdir)
    base = prepare_quantized_model(cfg.model, cfg.quantization, cfg.workdir)
    from datasets import load_from_disk

    from tasks.training.recipe import resolve_checkpointing

    checkpointing = resolve_checkpointing(base, cfg.train, load_from_disk(data.path)["train"])
    minimal = minimal_loop_steps_per_s(base.path, data.path, cfg, steps, checkpointing)
    adapter = train_adapter(base, data, cfg.lora, cfg.train, cfg.workdir)
    ours = adapter.global_step / adapter.train_runtime_s
    return {"trainer_steps_per_s": ours, "minimal_steps_per_s": minimal, "trainer_vs_minimal": ours / minimal}
