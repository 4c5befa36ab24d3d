"""The one typed config: YAML in ``configs/`` loads into ``PipelineConfig``.

It is the flow's parameter (so the Prefect UI renders it as a form) and each task gets only its
own section. Key names are a contract with the tests, the CLI's ``--set`` and users' YAML files.
Read top to bottom: what every section shares (unknown keys fail, a stable fingerprint), the
sections in stage order, the whole tree with its cross-section rules, and last the values that load
but are almost certainly a mistake (``config_warnings``: warned when a run starts, not refused).
Checks against transformers' own names (optimizers, schedulers, ``TrainingArguments``) are in
``qlora/config/checks.py``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qlora.config.checks import check_train_field
from qlora.tracking.names import model_name_problem


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise: fail at load time, naming the key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def fingerprint(self) -> str:
        """Stable short hash of this section's values (cache keys, run directories)."""
        return stable_hash(self.model_dump(mode="json"))



def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


DEMO_BASE_DIR = ".qlora/demo-base"


class ModelConfig(Section):
    name_or_path: str = Field(
        DEMO_BASE_DIR,
        description="Base model: a Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local model directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin; ignored for local directories.")

    @field_validator("name_or_path")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"must name a local model directory or a hub id (the default, {DEMO_BASE_DIR}, is built by `make demo`)")
        return v.strip()

    trust_remote_code: bool = Field(False, description="Run model code shipped in the hub repo. Off unless you trust the repo.")
    hf_token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding a hub token for gated repos; else $HF_TOKEN is used. Never logged."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="Attention kernel; sdpa is fast everywhere, flash_attention_2 needs the flash-attn package. "
        "flex_attention is PyTorch's own (compiled on first use): with train.packing it computes only the blocks "
        "inside each packed example, where sdpa masks a square over the whole row; it trains on GPUs only (no "
        "backward on a CPU in torch 2.13).",
    )


class QuantizationConfig(Section):
    load_in_4bit: bool = Field(True, description="Load the frozen base in 4-bit (QLoRA). Off trains plain LoRA on a bf16/fp32 base.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA paper's choice.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the 4-bit matmuls; auto = bf16 on GPUs that have it (Ampere+), else fp16; on a CPU "
        "bf16 where a short timing probe finds native bf16 (Zen 4, Sapphire Rapids), else float32 (AVX2-only CPUs emulate "
        "bf16 ~130x slower). The choice is logged and recorded in the registered version's lineage."
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype the packed 4-bit weights are stored in; auto = uint8, or the compute dtype when "
        "train.distributed is fsdp (FSDP can only shard them in the same float dtype as the rest of the model).",
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank; 8-64 is typical, higher learns more and costs more memory.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r); 2*r is a common choice.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input; 0.05-0.1 for small datasets.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' (QLoRA paper) or a list such as [q_proj, v_proj]."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train alongside the adapters.")
    loraplus_lr_ratio: float | None = Field(None, ge=1.0, description=(
        "LoRA+ (Hayou et al., 2024): the lora_B matrices learn at this many times train.learning_rate, lora_A at "
        "train.learning_rate (PEFT's create_loraplus_optimizer, with the optimizer train.optim names). The paper "
        "uses 16 with a somewhat lower learning rate; unset: one learning rate for both (plain LoRA)."))

    def key_fields(self) -> dict:
        """What keys a run dir: a knob left at None is left out, so configs written before it existed keep theirs."""
        return self.model_dump(exclude={"loraplus_lr_ratio"} if self.loraplus_lr_ratio is None else set())


FORMATS = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"]


class DataSource(Section):
    """One source of a dataset mixture (``data.sources``); read like data.path with its own format and columns."""

    path: str = Field(..., description="A .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder, or a hub dataset id.")
    format: FORMATS = Field("auto", description="Row format of this source; auto detects it from its first row.")
    weight: float = Field(..., gt=0, le=1, description=(
        "This source's share of the mixed training rows (all weights add up to 1). The mixture has as many training "
        "rows as the sources' usable training rows together (after each holds out data.eval_fraction); a source is "
        "subsampled without replacement, or, only when its share asks for more rows than it has, gives each row once "
        "plus seeded draws with replacement. Counts and repeats are in the data report."))
    columns: dict[str, str] = Field(default_factory=dict, description="Map this source's field names to the format's, as data.columns.")
    split: str = Field("train", description="Split to read from a hub dataset or a save_to_disk DatasetDict.")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    revision: str | None = Field(None, description="Hub dataset revision to pin; the cache key uses it.")


class DataConfig(Section):
    path: str | None = Field(
        "data/demo/reverse_words.jsonl",
        description="Training data: a .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk folder, or a hub dataset "
        "id (owner/name). Unset when data.sources is given.",
    )
    sources: list[DataSource] = Field(default_factory=list, description=(
        "A mixture instead of data.path: [{path, format, weight, columns}, ...], rows mixed by weight with data.seed. "
        "Each source holds out its own data.eval_fraction; the data report counts each one's rows read, dropped, used."))
    format: FORMATS = Field(
        "auto", description="Row format; auto detects it from the first row's keys (after data.columns mapping)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the format's field names to yours, e.g. {instruction: question, output: answer}.",
    )
    split: str = Field("train", description="Split to read from a hub dataset or a save_to_disk DatasetDict.")
    subset: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    revision: str | None = Field(None, description="Hub dataset revision to pin; the cache key uses it.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template used when the tokenizer has none; unset uses the built-in '### Instruction/### Response' template.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="Extra chat-template variables for every rendering (training, eval prompts, the consumers' prompt "
        "template), e.g. {enable_thinking: true}. Unset: {enable_thinking: false} when the template reads it (Qwen3: "
        "no empty <think></think> block is trained or prompted), else none.",
    )
    max_length: int = Field(512, gt=8, description="Maximum tokens per example (prompt + response + EOS).")
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Rows longer than max_length: cut at max_length, drop (counted), or fail the run."
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of rows held out (seeded) for evaluation when no eval_path is given.")
    eval_path: str | None = Field(None, description="Optional separate evaluation data in the same format; overrides eval_fraction.")
    seed: int = Field(42, description="Seed of the train/eval split.")
    max_drop_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Unusable rows are dropped and counted by reason; above this share the run fails."
    )
    num_proc: int = Field(1, ge=1, description="Tokenizer worker processes; pays off only above ~10k rows per worker.")

    @model_validator(mode="before")
    @classmethod
    def _path_or_sources(cls, raw: Any) -> Any:
        # Decided on the raw input: data.path has a default, so only the input tells whether it was also given.
        if isinstance(raw, dict) and raw.get("sources"):
            if raw.get("path") is not None:
                raise ValueError("set either data.path or data.sources, not both")
            raw = {**raw, "path": None}
        return raw

    @model_validator(mode="after")
    def _weights_are_shares(self) -> "DataConfig":
        if self.path is None and not self.sources:
            raise ValueError("set data.path (one dataset) or data.sources (a mixture)")
        if self.sources and abs((total := sum(s.weight for s in self.sources)) - 1.0) > 1e-6:
            raise ValueError(f"data.sources weights add up to {total:g} ({' + '.join(f'{s.weight:g}' for s in self.sources)}); "
                             "each is a share of the mixed training rows, so they must add up to 1")
        return self


class TrainConfig(Section):
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training split; ignored when max_steps > 0.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per device when computing eval loss.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Micro-batches per optimizer step (effective batch = batch * this * devices).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate; 1e-4 to 3e-4 is usual for QLoRA.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA parameters.")
    optim: str = Field(
        "auto",
        description="Optimizer name as in TrainingArguments, or auto: paged 8-bit AdamW (QLoRA's) on a GPU or for an "
        "adapter whose fp32 AdamW states would take over a tenth of the free RAM, else torch's fused AdamW (on a CPU "
        "bitsandbytes' 8-bit step is ~40 ms of the demo's ~150 ms step, fused AdamW ~1.5 ms). The choice is logged and "
        "recorded on the registered version (tag train.optim).",
    )
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
        None, gt=0, description="Stop after N evaluations without an improvement of early_stopping_metric; unset = off. "
        "Evaluations are eval.every_steps apart when that is set, else one per save_steps (eval loss only).",
    )
    early_stopping_metric: Literal["auto", "task_metric", "eval_loss"] = Field(
        "auto", description="What early stopping watches: task_metric (the promotion gate's metric on the during-training "
        "slice, higher is better; needs eval.every_steps) or eval_loss (lower is better). auto: task_metric when "
        "eval.every_steps is set, else eval_loss. A metric at its maximum (exact match 1.0) cannot improve, so the run "
        "stops early_stopping_patience evaluations later.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest change of early_stopping_metric that counts as an improvement (in its units: "
        "0.01 = one point of exact match, or 0.01 nats of eval loss).",
    )
    select_checkpoint: Literal["auto", "task_metric", "eval_loss", "last"] = Field(
        "auto", description="Which checkpoint becomes the adapter that is evaluated and registered: task_metric (highest "
        "gate metric on the during-training slice), eval_loss (lowest loss on that slice) or last. Ties go to the "
        "earlier step. task_metric and eval_loss need eval.every_steps. auto: task_metric when eval.every_steps is set, "
        "else last (or, with early_stopping_patience and no eval.every_steps, the lowest eval loss as before).",
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


GENERATION_METRICS = ("exact_match", "rouge", "bleu", "chrf")


class EvalConfig(Section):
    metrics: list[Literal["exact_match", "rouge", "bleu", "chrf", "perplexity"]] = Field(
        ["exact_match", "rouge", "perplexity"], min_length=1,
        description="Scores of base and tuned, logged as eval/{base,tuned}/<name>, all in [0, 1] but perplexity: "
        "exact_match (after strip), rouge (ROUGE-L F1), bleu and chrf (sacrebleu, /100) on greedy generations of the "
        "first max_samples eval rows; perplexity of the references on the whole eval split. Per-example scores are "
        "kept for the promotion gate (registry.gate_metric).",
    )
    max_new_tokens: int = Field(
        64, gt=0, le=32768, description="Generation budget per eval prompt (greedy decoding); at most 32768 and the base's context length."
    )
    max_samples: int = Field(200, gt=0, description="Eval rows used for generation metrics (first N of the eval split).")
    batch_size: int = Field(16, gt=0, description="Prompts generated per batch.")
    every_steps: int | None = Field(
        None, gt=0, description="Generation eval during training: every N optimizer steps, generate greedily on the "
        "during-training slice, score it with the promotion gate's metric (registry.gate_metric, auto resolved) and its "
        "eval loss, and write a checkpoint there (train.select_checkpoint picks among them). Unset = off.",
    )
    during_samples: int = Field(
        64, gt=0, description="Rows of the during-training slice: the LAST rows of the eval split, disjoint from the first "
        "max_samples rows that the final evaluation and the promotion gate score (rows that choose a checkpoint must not "
        "also judge it). Shrunk, with a warning, when the eval split has fewer than max_samples + during_samples rows.",
    )


class RegistryConfig(Section):
    model_name: str = Field(
        "qlora-demo", min_length=1,
        description="Registered model name in the MLflow Model Registry (no '/' or ':', as MLflow requires).",
    )
    gate_metric: Literal["auto", "exact_match", "rouge", "bleu", "chrf"] = Field(
        "auto",
        description="Per-example score the promotion gate compares (paired bootstrap), one of eval.metrics. auto: "
        "exact_match when every scored eval reference is at most 5 words (short answers: right or wrong), else rouge "
        "(open-ended answers, where exact match is ~0 for base and tuned alike).",
    )
    min_improvement: float = Field(
        0.0, ge=-1, le=1,
        description="Promote only when the CI's lower bound of (challenger - champion) gate_metric is above this (in its [0, 1] units).",
    )
    bootstrap_resamples: int = Field(2000, ge=100, description="Paired bootstrap resamples for the promotion gate's interval.")
    confidence_level: float = Field(0.95, gt=0.5, lt=1.0, description="Two-sided confidence level of the gate's interval.")
    consumer_check_prompts: int = Field(
        3, ge=0, description="Eval prompts re-generated through models:/<name>/<version> before promotion; 0 skips the check."
    )
    require_approval: bool = Field(
        False, description="Pause the flow for a human approval (Prefect UI) before moving the champion alias."
    )
    approval_timeout_s: int = Field(3600, gt=0, description="Seconds a paused flow waits for approval before it fails.")
    register_merged: bool = Field(
        False, description="Also register <model_name>-merged: the adapter merged into the bf16 base, for consumers without PEFT."
    )

    @field_validator("model_name")
    @classmethod
    def _name_mlflow_accepts(cls, v: str) -> str:
        # Checked now, not when registering after training (qlora/tracking/names.py has MLflow's rules).
        problem = model_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; unset means $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.")
    experiment_name: str = Field("qlora-finetune", min_length=1, description="MLflow experiment that holds the runs.")
    artifact_location: str = Field("mlartifacts", description="Artifact root for a new experiment when the store is local (sqlite/file).")


# Keys that existed once: a config that still sets one is refused naming the key and what replaced it, not as a typo.
_NOTIFICATIONS = ("removed: notifications are Prefect automations on the server now, not a run's config: "
                  "`qlora notifications setup --block TYPE/NAME` (or `make team QLORA_NOTIFY_BLOCK=TYPE/NAME`) sends flow "
                  "failures and champion moves to a Prefect notification block; delete this key (docs/team.md#notifications)")
REMOVED_KEYS = {"report.webhook_url": _NOTIFICATIONS, "report.webhook_secret": _NOTIFICATIONS,
                "report.notification_block": _NOTIFICATIONS}


class ReportConfig(Section):
    mlflow_ui_url: str | None = Field(
        None, description="MLflow UI base URL for links in the run report (e.g. http://127.0.0.1:5000); "
        "unset means the tracking URI when it is http(s), else no links.",
    )
    examples: int = Field(5, ge=0, le=50, description="Eval examples (prompt, reference, base, tuned) shown in the report table.")


class TimeoutsConfig(Section):
    """Wall-clock limits per stage: a hung hub download, a server that accepts the connection and never
    answers, or a collective waiting for a dead rank fails its stage with a message naming the stage and
    this key, instead of waiting forever. Each retry of a stage gets the limit afresh. Generous by default
    (sized for a 70B base on a slow link); null turns a limit off. Not part of the run's fingerprint: a
    limit changes when a run gives up, never what it computes."""

    tokenize: float | None = Field(3600, gt=0, description="Seconds for stage 1 (reading, a hub dataset download included, and tokenizing).")
    quantize: float | None = Field(4 * 3600, gt=0, description="Seconds for stage 2 (a hub base download included: ~140 GB for a 70B at 10 MB/s).")
    train: float | None = Field(72 * 3600, gt=0, description="Seconds for stage 3. A stalled collective inside it is bounded sooner by train.extra_args.ddp_timeout (transformers' default 1800 s).")
    evaluate: float | None = Field(6 * 3600, gt=0, description="Seconds for stage 4 (generation on the eval split, base and tuned).")
    registry: float | None = Field(3600, gt=0, description="Seconds for stage 5, register (logging the adapter, the consumer check, the aliases).")


class PipelineConfig(Section):
    """Everything one fine-tuning run needs. Sections map one-to-one onto pipeline stages."""

    workdir: str = Field(".qlora", description="Folder for caches: tokenized data, quantized checkpoints, training runs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model to fine-tune.")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="bitsandbytes 4-bit loading.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapter shape.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, format and split.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Trainer arguments that matter for QLoRA.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Base vs fine-tuned evaluation.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow Model Registry target.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking server or local store.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Run report and its links.")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, description="Wall-clock limit per stage; a stage that exceeds it fails naming itself.")

    def fingerprint(self) -> str:
        """The run's identity (its MLflow run record, cache keys): what it computes, so not its time limits."""
        return stable_hash(self.model_dump(mode="json", exclude={"timeouts"}))

    @model_validator(mode="after")
    def _gate_metric_is_evaluated(self) -> "PipelineConfig":
        wanted = ["exact_match", "rouge"] if self.registry.gate_metric == "auto" else [self.registry.gate_metric]
        if missing := [m for m in wanted if m not in self.eval.metrics]:
            raise ValueError(f"registry.gate_metric={self.registry.gate_metric} compares {' or '.join(wanted)}, but eval.metrics "
                             f"{self.eval.metrics} lacks {', '.join(missing)}: add it there or set registry.gate_metric")
        return self

    @model_validator(mode="after")
    def _selection_needs_generation_eval(self) -> "PipelineConfig":
        t, every = self.train, self.eval.every_steps
        if every is None:
            # Without it there is only the Trainer's own eval loss (early_stopping_metric: eval_loss, as before).
            needs = [("select_checkpoint", t.select_checkpoint)] * (t.select_checkpoint in ("task_metric", "eval_loss"))
            needs += [("early_stopping_metric", "task_metric")] * (t.early_stopping_metric == "task_metric")
            for key, value in needs:
                raise ValueError(f"train.{key}={value} compares evaluations during training, but eval.every_steps is "
                                 "unset: set eval.every_steps (e.g. to train.save_steps) or leave the key at auto")
        elif t.distributed == "fsdp":
            raise ValueError("eval.every_steps generates on one rank, which an FSDP-sharded model cannot do: unset "
                             "eval.every_steps with train.distributed=fsdp")
        return self

    @model_validator(mode="after")
    def _rows_fit_packing_bins(self) -> "PipelineConfig":
        t = self.train
        if t.packing == "bfd" and t.packing_tokens is not None and t.packing_tokens < self.data.max_length:
            raise ValueError(f"train.packing_tokens={t.packing_tokens} is less than data.max_length={self.data.max_length}: "
                             "a row of max_length tokens would fit no bin; raise packing_tokens or lower max_length")
        return self

    @model_validator(mode="after")
    def _fsdp_needs_float_quant_storage(self) -> "PipelineConfig":
        q = self.quantization
        if self.train.distributed != "fsdp" or not q.load_in_4bit:
            return self
        if q.quant_storage == "uint8":
            raise ValueError(
                "train.distributed=fsdp shards the 4-bit weights only when they are stored in a float dtype: "
                "set quantization.quant_storage to bfloat16 (or leave it at auto)"
            )
        if q.quant_storage == "auto":
            # Same dtype as the compute dtype (and the LoRA/norm weights): one flat FSDP parameter per block.
            storage = q.compute_dtype if q.compute_dtype in ("bfloat16", "float16") else "bfloat16"
            self.quantization = q.model_copy(update={"quant_storage": storage})
        return self


LEARNING_RATE_RANGE = (1e-6, 1e-1)  # QLoRA uses 1e-4..3e-4; full fine-tuning 1e-5..5e-5
LONG_GENERATION = 4096  # eval.max_new_tokens above this makes evaluation (two passes) very slow


def config_warnings(cfg: PipelineConfig) -> list[str]:
    out = []
    lo, hi = LEARNING_RATE_RANGE
    if not lo <= cfg.train.learning_rate <= hi:
        out.append(f"train.learning_rate={cfg.train.learning_rate:g} is far outside the usual {lo:g}..{hi:g} "
                   "(QLoRA: 1e-4..3e-4); the run is stopped if it diverges")
    if cfg.eval.max_new_tokens > LONG_GENERATION:
        out.append(f"eval.max_new_tokens={cfg.eval.max_new_tokens} generates that many tokens per eval prompt, "
                   f"twice (base and tuned) for eval.max_samples={cfg.eval.max_samples} prompts")
    return out
