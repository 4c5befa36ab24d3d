"""The ``train:`` section of the config (``qlora.config.schema.PipelineConfig.train``): Trainer hyperparameters,
the pipeline's own training switches, and the worker's training slots. Split from ``qlora/config/schema.py`` to
keep each file readable; import it from ``qlora.config.schema`` like every other section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from qlora.config.section import Section
from qlora.config.checks import check_train_field


class TrainConfig(Section):
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training split; ignored when max_steps > 0.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per device when computing eval loss.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Micro-batches per optimizer step (effective batch = batch * this * devices).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate; 1e-4 to 3e-4 is usual for QLoRA.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA parameters.")
    optim: str = Field("paged_adamw_8bit", description="Optimizer name as in TrainingArguments; paged 8-bit AdamW is QLoRA's.")
    lr_scheduler_type: str = Field("cosine", description="Learning-rate schedule as in TrainingArguments.")
    warmup_steps: float = Field(0.03, ge=0, description="Warmup: a float < 1 is a fraction of total steps, otherwise a step count.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm; 0.3 is the QLoRA paper's value.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward: far less memory, about a third more compute per step (demo on "
        "CPU: 4.3 vs 6.8 steps/s). true: every decoder layer. auto: none when the largest micro-batch's activations "
        "fit in a third of the free GPU memory (or RAM) left after the weights, else 1 in n decoder layers with n as "
        "large as fits (every layer when nothing less does); the decision is logged.",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length: less padding (0.95+ vs ~0.5 real tokens per batch token on Code Alpaca)."
    )
    packing: bool | Literal["bfd"] = Field(
        False,
        description="true: concatenate each batch into one padding-free row with per-example position_ids (no "
        "cross-example attention with sdpa/flash-attention in transformers 5). bfd: first bin-pack the training rows "
        "best-fit decreasing into bins of at most packing_tokens tokens (as TRL's bfd), one bin per batch row with "
        "position_ids restarting at each example (bins fill ~99%, so almost no padding): every micro-batch holds "
        "~batch x packing_tokens tokens, and an epoch has fewer, fuller steps. Either overrides group_by_length.",
    )
    packing_tokens: int | None = Field(
        None, gt=0,
        description="Bin size in tokens for packing: bfd; unset = data.max_length (never less: a row must fit a bin). "
        "A micro-batch is per_device_train_batch_size bins, so batch 1 and packing_tokens N is a token budget of N "
        "tokens per micro-batch.",
    )
    seed: int = Field(42, description="Seed for LoRA init, data order and dropout.")
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N optimizer steps.")
    save_steps: int = Field(100, gt=0, description="Write an adapter-only checkpoint every N optimizer steps (resume point).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk; older ones are deleted.")
    num_processes: int = Field(
        1, gt=0, le=64,
        description="Training processes (DDP): 1 trains in the task's process; N > 1 launches N ranks "
        "(accelerate on N GPUs, torchrun/gloo on CPU). Effective batch = batch * accumulation * N.",
    )
    fp32_norms: bool = Field(
        True,
        description="Upcast norms and embeddings of the 4-bit model to fp32 (peft's kbit preparation, QLoRA's "
        "default). false: keep them in the compute dtype and train under autocast: +23% tokens/s and 1.7 GB less on "
        "an H100 (7B, seq 1024), 1.56x steps/s for the demo on a bf16 CPU. train.distributed=fsdp always keeps them "
        "in the storage dtype.",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How N processes share the work: ddp replicates the 4-bit model on every GPU; fsdp "
        "(GPUs only, always via accelerate launch) shards it, so a base too big for one GPU trains on several.",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations (one per save_steps) without a lower eval loss; unset = off."
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Extra Trainer integrations (e.g. [tensorboard]) next to MLflow, which is always on through the "
        "pipeline's own callback (it survives a tracking outage); 'mlflow' here would log everything twice.",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other transformers.TrainingArguments field, e.g. {adam_beta2: 0.95, neftune_noise_alpha: 5}; "
        "checked against TrainingArguments when the config loads. Fields this section has are set there instead.",
    )

    slots_per_worker: int = Field(
        1, ge=1, le=64,
        description="Trainings that may run at once on one worker machine; more wait for a slot. Each run uses "
        "(cores available) / slots compute threads, so runs sharing a CPU worker queue or share it fairly.",
    )
    concurrency_limit: str | None = Field(
        "qlora-train-{host}",
        description="Prefect global concurrency limit the train stage holds a slot of, '{host}' being the worker's "
        "hostname; created with slots_per_worker slots when missing. Used with a Prefect server only (a bare "
        "`qlora run`'s temporary server loses its leases); null turns it off.",
    )
    divergence_loss_factor: float = Field(
        4.0, gt=1.0,
        description="After warmup, a logged loss above this many times the first logged loss (at least 1 nat) stops "
        "the run as diverged; an exploding adapter weight norm or a NaN/inf loss always does.",
    )

    @field_validator("optim", "lr_scheduler_type", "report_to", "extra_args")
    @classmethod
    def _known_to_transformers(cls, v, info):
        """Checked against transformers when the config loads, not when training starts (qlora/config/checks.py)."""
        return check_train_field(info.field_name, v, cls.model_fields[info.field_name].get_default(call_default_factory=True),
                                 set(cls.model_fields))

    @model_validator(mode="after")
    def _packing_tokens_with_bfd(self) -> "TrainConfig":
        if self.packing_tokens is not None and self.packing != "bfd":
            raise ValueError(f"train.packing_tokens={self.packing_tokens} sizes the bins of train.packing: bfd, but "
                             f"train.packing is {self.packing}: set train.packing: bfd or unset packing_tokens")
        return self

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 steps trains nothing: a positive step count, or -1 to use num_train_epochs")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_integral_above_one(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a value >= 1 is a step count and must be a whole number; use a float < 1 for a ratio")
        return v
