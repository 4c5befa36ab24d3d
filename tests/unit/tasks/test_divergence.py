"""An absurd learning rate must not train to rc 0 and register garbage (issue 13, item 5): divergence beyond
NaN stops the run, and config values far outside sane ranges are refused or warned about early."""

from __future__ import annotations

import prefect.main  # noqa: F401  Prefect configures logging on import: bind its console handler now, not to a test's capture
import pytest

from qlora.config.files import load_config
from qlora.config.schema import DataConfig, LoraSection, ModelConfig, QuantizationConfig, TrainConfig
from qlora.errors import ConfigError, TrainingDiverged, is_transient
from tasks.train import run_dir_for, train_adapter

LORA = LoraSection(r=4, alpha=8, dropout=0.0)


def _train(**kw) -> TrainConfig:
    return TrainConfig(**({"max_steps": 12, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                           "logging_steps": 1, "save_steps": 100} | kw))


def test_learning_rate_1e9_stops_on_the_exploding_adapter_norm(prepared):
    """The reported case: default optimizer (paged 8-bit AdamW) and warmup, lr 1e9. No NaN ever appears: the
    LoRA weights jump by ~1e9 at the first update, the loss settles at ln(vocab) and the gradient at 0."""
    work, _, data, base = prepared
    train = _train(learning_rate=1e9)
    with pytest.raises(TrainingDiverged, match=r"weight norm grew from .* \(over 1000x\) by step [12] .*train.learning_rate=1e\+09") as e:
        train_adapter(base, data, LORA, train, work)
    assert not is_transient(e.value)
    assert not (run_dir_for(base, data, LORA, train, work) / "adapter").exists()


def test_loss_rising_far_above_its_start_stops_the_run(prepared):
    """A loss that climbs while every gradient stays finite. It is made to climb for sure: the LoRA gradients are
    reversed (gradient ascent), since whether a huge learning rate raises the loss of a random-weight base, which
    starts near ln(vocab), depends on the CPU's kernels (lr 10 with plain AdamW raised it at step 2 on a Zen 4 in
    bf16, and lowered it from 6.48 to 4.93 over 11 steps on a Xeon with AMX). With train.divergence_loss_factor
    lowered to 1.02 the climb is the divergence; the default 4 is for a real base, whose first loss is 1-2 nats and
    whose saturated loss is ln(vocab) ~ 12."""
    work, _, data, base = prepared
    ascent = _ReversedGradients()
    train = _train(learning_rate=1e-2, optim="adamw_torch", warmup_steps=0, divergence_loss_factor=1.02)
    with pytest.raises(TrainingDiverged, match=r"loss [\d.]+ at step \d+ is more than train.divergence_loss_factor=1.02 times its first value"):
        train_adapter(base, data, LORA, train, work, callbacks=(ascent.callback,))
    assert ascent.hooked > 0
    sane = _train(learning_rate=2e-3, max_steps=6)  # and a sane run with the defaults trains through
    assert train_adapter(base, data, LORA, sane, work).global_step == 6


class _ReversedGradients:
    """Reverses every LoRA gradient (a backward hook per trainable parameter): the optimizer then ascends the loss."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.hooked = 0

        class Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                for p in model.parameters():
                    if p.requires_grad:
                        p.register_hook(lambda g: -g)
                        outer.hooked += 1

        self.callback = Cb()


class _NanGradientAt:
    """Makes one LoRA matrix's gradient NaN at optimizer step ``step`` (a backward hook), and keeps the model."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        outer = self

        class Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.model = model
                outer.name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
                p.register_hook(lambda g: g * float("nan") if state.global_step + 1 == step else g)

        self.callback = Cb()


def test_a_nan_gradient_is_stopped_before_the_update_with_the_clipping_norm(prepared):
    """The Trainer's clipping norm (over the LoRA parameters, handed to the guard) catches a NaN gradient at
    its step, names the parameter, and the optimizer never applies it: the weights stay finite."""
    import torch

    work, _, data, base = prepared
    spy = _NanGradientAt(step=3)
    train = _train(learning_rate=1e-3, logging_steps=50)  # no log at step 3: the check is per step, not per log
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient in .*lora_B.* at step 3 ") as e:
        train_adapter(base, data, LORA, train, work, callbacks=(spy.callback,))
    assert spy.name.removeprefix("base_model.model.") in str(e.value) or spy.name in str(e.value)
    assert all(torch.isfinite(p).all() for p in spy.model.parameters() if p.requires_grad)


def test_an_inf_gradient_under_fp16_loss_scaling_is_the_scalers_to_skip():
    """On a GPU without bf16 the Trainer runs fp16 with a GradScaler whose first steps overflow by design (it
    then skips the step and lowers the scale). That must not stop the run; the same gradient in bf16/fp32 does."""
    from types import SimpleNamespace

    import torch
    from transformers import TrainerControl, TrainerState

    from tasks.training.callbacks import DivergenceGuard

    lora = torch.nn.Linear(4, 4)
    lora.weight.grad = torch.full((4, 4), float("inf"))
    model = torch.nn.Sequential(lora)
    state, control = TrainerState(), TrainerControl()
    norm = torch.nn.utils.get_total_norm([lora.weight.grad])

    def guard(fp16: bool) -> DivergenceGuard:
        g = DivergenceGuard(learning_rate=1e-3, max_grad_norm=0.3)
        g.on_train_begin(SimpleNamespace(fp16=fp16), state, control, model=model)
        return g

    # fp16: neither through the Trainer's clipping norm, nor the guard's own check, nor a logged grad_norm.
    guard(True).check_gradients(0, norm)
    guard(True).on_pre_optimizer_step(SimpleNamespace(fp16=True), state, control)
    guard(True).on_log(SimpleNamespace(fp16=True), state, control, logs={"grad_norm": float("inf")})
    with pytest.raises(TrainingDiverged, match="non-finite loss=nan"):  # a NaN loss is a divergence all the same
        guard(True).on_log(SimpleNamespace(fp16=True), state, control, logs={"loss": float("nan")})
    for check in (lambda g: g.check_gradients(0, norm), lambda g: g.on_pre_optimizer_step(SimpleNamespace(fp16=False), state, control)):
        with pytest.raises(TrainingDiverged, match=r"non-finite gradient in 0\.weight at step 1 "):
            check(guard(False))


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=0", "train.max_steps"), ("train.max_steps=-5", "train.max_steps"),
    ("eval.max_new_tokens=1000000000", "eval.max_new_tokens"), ("train.divergence_loss_factor=1", "train.divergence_loss_factor"),
])
def test_absurd_values_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_absurd_learning_rate_is_warned_about():
    from qlora.config.schema import config_warnings

    assert config_warnings(load_config(None)) == []
    for lr in ("1e9", "1e-9"):
        (warning,) = config_warnings(load_config(None, [f"train.learning_rate={lr}"]))
        assert "train.learning_rate" in warning and "1e-06..0.1" in warning


def test_max_length_beyond_the_base_context_fails_at_tokenize(tiny_base, tmp_path):
    """The tiny base has max_position_embeddings=2048: found with the tokenizer, before anything is written."""
    from tasks.tokenize import tokenize_dataset
    from tests.conftest import DEMO_DATA

    with pytest.raises(ConfigError, match=r"data\.max_length=4096 is more than the context of model\.name_or_path=.*\(2048 tokens"):
        tokenize_dataset(DataConfig(path=str(DEMO_DATA), max_length=4096), ModelConfig(name_or_path=str(tiny_base)), tmp_path)
    assert not (tmp_path / "tokenized").exists()
