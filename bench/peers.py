"""The same demo job run by what users would pick instead of this pipeline, for ``make bench``.

    python -m bench.peers trl|trl_fast|bare CONFIG [--set k=v ...] [--gradient-checkpointing true|false]

- ``trl``: TRL's ``SFTTrainer`` on prompt/completion rows (completion-only loss, EOS appended), the
  4-bit base loaded with the same ``BitsAndBytesConfig``, the same LoRA, schedule, warmup, clipping, batch,
  steps and checkpoint interval, and QLoRA's optimizer (paged 8-bit AdamW, whatever the config's ``train.optim``:
  this is the recipe users copy, and the baseline the CPU goals are stated against). TRL's own defaults otherwise: gradient checkpointing on, and bf16 autocast when the
  compute dtype is bf16.
- ``trl_fast``: the same, set by hand for speed as someone who profiled it would: gradient checkpointing
  off and torch's fused AdamW.
- ``bare``: a hand-written script: ``prepare_model_for_kbit_training`` + ``get_peft_model`` +
  ``transformers.Trainer`` with the same settings, gradient checkpointing on as in the QLoRA recipe.

Both read the same rows with the same held-out split as the pipeline and print one line
``PEER {"train_runtime": s, "steps": n, "compute_dtype": ...}``; the caller times the whole process.
TRL is a bench/dev extra (``pip install -e .[bench]``), never a dependency of the pipeline.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time


def _rows(cfg) -> list[dict]:
    """Training rows as prompt/completion, the pipeline's template and split (seeded hold-out)."""
    from qlora.template import format_prompt, user_message

    rows = [json.loads(line) for line in open(cfg.data.path, encoding="utf-8") if line.strip()]
    order = list(range(len(rows)))
    random.Random(cfg.data.seed).shuffle(order)
    held = set(order[: max(1, round(len(rows) * cfg.data.eval_fraction))])
    return [{"prompt": format_prompt(user_message(r["instruction"], r.get("input"))), "completion": r["output"]}
            for i, r in enumerate(rows) if i not in held]


def _base(cfg):
    """The 4-bit base as both peers load it: from the user's base folder, quantized on load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora.models import compute_dtype

    dtype = compute_dtype(cfg.quantization)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization.quant_type,
                               bnb_4bit_use_double_quant=cfg.quantization.double_quant, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"})
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    return model, tok, dtype


def _lora(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias=cfg.lora.bias, task_type="CAUSAL_LM")


def _common_args(cfg, out: str, checkpointing: bool, optim: str | None = None) -> dict:
    t = cfg.train
    optim = optim or "paged_adamw_8bit"  # QLoRA's, not the demo's fused AdamW: the baseline stays the same job
    return dict(output_dir=out, max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
                gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
                optim=optim, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
                max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_steps=t.save_steps,
                save_total_limit=t.save_total_limit, seed=t.seed, gradient_checkpointing=checkpointing,
                report_to="none", disable_tqdm=True)


def run_trl(cfg, checkpointing: bool, optim: str | None = None) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok, dtype = _base(cfg)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**_common_args(cfg, out, checkpointing, optim), max_length=cfg.data.max_length,
                         bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available())
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(cfg)), processing_class=tok,
                             peft_config=_lora(cfg))
        result = trainer.train()
    return {"train_runtime": result.metrics["train_runtime"], "steps": trainer.state.global_step, "compute_dtype": str(dtype)}


def run_bare(cfg, checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok, dtype = _base(cfg)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, _lora(cfg))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def encode(row):
        prompt = tok(row["prompt"])["input_ids"]
        answer = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + answer)[: cfg.data.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": ([-100] * len(prompt) + answer)[: cfg.data.max_length]}

    data = Dataset.from_list(_rows(cfg)).map(encode, remove_columns=["prompt", "completion"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**_common_args(cfg, out, checkpointing), use_cpu=not torch.cuda.is_available(),
                                 bf16=torch.cuda.is_available() and dtype == torch.bfloat16)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        result = trainer.train()
    return {"train_runtime": result.metrics["train_runtime"], "steps": trainer.state.global_step, "compute_dtype": str(dtype)}


def main(argv: list[str]) -> int:
    from qlora.config.files import load_config

    which, config = argv[0], argv[1]
    rest = argv[2:]
    overrides = [a for prev, a in zip([""] + rest, rest) if prev == "--set"]
    checkpointing = "--gradient-checkpointing" not in rest or rest[rest.index("--gradient-checkpointing") + 1] == "true"
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    if which == "trl_fast":
        out = run_trl(cfg, False, "adamw_torch_fused")
    else:
        out = {"trl": run_trl, "bare": run_bare}[which](cfg, checkpointing)
    out["in_process_s"] = time.perf_counter() - t0
    print("PEER " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
