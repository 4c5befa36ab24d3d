"""Stages 2-4 as plain functions (no Prefect, no MLflow) on the tiny Llama."""

import json
import shutil
from pathlib import Path

import pytest

from qlora.config.schema import EvalConfig, LoraSection, ModelConfig, QuantizationConfig, TrainConfig
from qlora.errors import ModelError
from qlora.models import count_4bit_layers, load_base
from tasks.evaluate import evaluate_adapter
from tasks.quantize import prepare_quantized_model
from tasks.train import train_adapter
from tasks.training.checkpoints import latest_valid_checkpoint
from tasks.training.recipe import build_peft_model


def test_quantized_checkpoint_is_4bit_and_smaller(prepared, tiny_base):
    work, model, _, base = prepared
    m = load_base(base.path, None)  # no quantization config passed: it comes from the checkpoint
    assert count_4bit_layers(m) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    full = load_base(str(tiny_base), None)
    assert base.footprint_bytes < full.get_memory_footprint()
    again = prepare_quantized_model(model, QuantizationConfig(), work)
    assert again == base  # content-keyed cache


def test_unknown_base_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="model.name_or_path"):
        prepare_quantized_model(ModelConfig(name_or_path="./no/such/dir"), QuantizationConfig(), tmp_path)


def test_only_lora_parameters_train(prepared):
    _, _, _, base = prepared
    model = build_peft_model(load_base(base.path), LoraSection(r=4, alpha=8), gradient_checkpointing=True, quantized=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert count_4bit_layers(model) == 2 * 7


def test_train_resume_and_evaluate(prepared):
    work, _, data, base = prepared
    lora = LoraSection(r=8, alpha=16, dropout=0.0)
    train = TrainConfig(max_steps=8, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                        learning_rate=2e-3, logging_steps=1, save_steps=4, save_total_limit=3)
    a = train_adapter(base, data, lora, train, work)
    assert a.global_step == 8
    assert a.last_loss < a.first_loss
    run_dir = Path(a.run_dir)
    assert latest_valid_checkpoint(run_dir).endswith("checkpoint-8")

    # A finished adapter is reused as is.
    assert train_adapter(base, data, lora, train, work) == a

    # Interrupted after checkpoint-4: a re-run resumes there and finishes at step 8, not from 0.
    shutil.rmtree(run_dir / "adapter")
    shutil.rmtree(run_dir / "checkpoint-8")
    b = train_adapter(base, data, lora, train, work)
    assert b.resumed_from_step == 4
    assert b.global_step == 8 and b.run_dir == str(run_dir)
    state = json.loads((run_dir / "checkpoint-8" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 9))  # one curve

    report = evaluate_adapter(base, a, data, EvalConfig(max_samples=4, max_new_tokens=4, batch_size=4))
    assert set(report.metrics) == {f"eval/{w}/{m}" for w in ("base", "tuned") for m in ("exact_match", "rouge", "loss", "perplexity")}
    assert report.metrics["eval/tuned/loss"] < report.metrics["eval/base/loss"]
    assert len(report.samples) == 4


def test_only_a_training_with_work_to_do_takes_a_training_slot(prepared):
    """Every training slot of the worker taken: a config whose adapter is already trained returns it at once (a
    re-run or a retry never queues behind other trainings to find it), and a new training starts only once a
    slot is free."""
    import threading
    import time

    from transformers import TrainerCallback

    from qlora.locks import machine_slot

    work, _, data, base = prepared
    lora = LoraSection(r=4, alpha=8, dropout=0.0)
    train = TrainConfig(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, save_steps=100, seed=11)
    done = train_adapter(base, data, lora, train, work)
    began: list[float] = []

    class Began(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            began.append(time.monotonic())

    got: dict[str, object] = {}

    def run(name, cfg):
        got[name] = train_adapter(base, data, lora, cfg, work, callbacks=(Began(),))

    with machine_slot(train.slots_per_worker):  # held by this thread: train_adapter in another one must wait for it
        again = threading.Thread(target=run, args=("again", train))
        again.start()
        again.join(30)
        assert got.get("again") == done  # returned while the slot was taken
        waiting = threading.Thread(target=run, args=("new", train.model_copy(update={"seed": 12})))
        waiting.start()
        time.sleep(2)
        released = time.monotonic()
    waiting.join(120)
    assert got["new"].global_step == 2 and got["new"].run_dir != done.run_dir
    assert len(began) == 1 and began[0] > released  # trained only after the slot was free


def test_training_uses_bitsandbytes_8bit_adamw_and_extra_callbacks_see_it(prepared):
    """optim=paged_adamw_8bit is bitsandbytes' 8-bit AdamW (paged on CUDA; bitsandbytes falls back to
    unpaged memory on CPU), with 8-bit state for the larger LoRA matrices. ``callbacks=`` is how tests
    and benchmarks look inside the real training stage; they apply to that call only."""
    import bitsandbytes as bnb
    import torch
    from transformers import TrainerCallback

    work, _, data, base = prepared
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            opt = getattr(optimizer, "optimizer", optimizer)
            seen["opt"] = opt
            seen["state1"] = [s["state1"].dtype for s in opt.state.values() if "state1" in s and s["state1"].numel() >= 4096]

    train = TrainConfig(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                        save_steps=100, seed=7, optim="paged_adamw_8bit")
    train_adapter(base, data, LoraSection(r=32, alpha=32, dropout=0.0), train, work, callbacks=(Spy(),))
    assert isinstance(seen["opt"], bnb.optim.optimizer.Optimizer8bit) and seen["opt"].is_paged
    assert seen["state1"] and set(seen["state1"]) == {torch.uint8}


def test_loraplus_gives_lora_b_its_own_learning_rate_and_leaves_other_run_dirs_alone(prepared):
    """lora.loraplus_lr_ratio: the optimizer train.optim names (here 8-bit AdamW), with lora_B at ratio x the
    learning rate through the cosine schedule and lora_A at 1x; unset, the run dir key is what it was before the
    knob existed, so earlier runs' checkpoints are still found."""
    import bitsandbytes as bnb
    from transformers import TrainerCallback

    from qlora.config.schema import stable_hash
    from tasks.train import run_dir_for

    work, _, data, base = prepared
    seen: list = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, model=None, **kw):
            opt = getattr(optimizer, "optimizer", optimizer)
            names = {id(p): n for n, p in model.named_parameters()}
            seen.append({("B" if "lora_B" in names[id(g["params"][0])] else "A"): g["lr"] for g in opt.param_groups if g["params"]})
            seen.append(opt)

    lora = LoraSection(r=4, alpha=8, dropout=0.0, loraplus_lr_ratio=16)
    train = TrainConfig(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                        save_steps=100, seed=3, optim="paged_adamw_8bit", warmup_steps=0)
    a = train_adapter(base, data, lora, train, work, callbacks=(Spy(),))
    assert a.global_step == 2 and isinstance(seen[1], bnb.optim.optimizer.Optimizer8bit)
    assert all(lrs["B"] == pytest.approx(16 * lrs["A"]) for lrs in seen[0::2])
    assert 0 < seen[0]["A"] < 1e-3  # the schedule applies to both groups
    plain = LoraSection(r=4, alpha=8, dropout=0.0)
    old_key = stable_hash({"base": base.fingerprint, "data": data.fingerprint, "lora": {k: v for k, v in plain.model_dump().items()
                                                                                    if k != "loraplus_lr_ratio"},
                           "train": train.model_dump()})
    assert run_dir_for(base, data, plain, train, work).name == old_key != run_dir_for(base, data, lora, train, work).name
