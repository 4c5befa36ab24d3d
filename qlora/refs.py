"""What tasks hand each other: small, serialisable references (paths, fingerprints, ids), never objects."""

from __future__ import annotations

from pydantic import BaseModel

from qlora.template import PROMPT_TEMPLATE


class ChatContract(BaseModel):
    """How a chat model is served (``registry/chat.py``): consumers send conversations, rendered by the
    training template with the training kwargs; a version without one takes bare prompts (the demo)."""

    chat_template: str | None = None  # data.chat_template: used when the tokenizer has no template of its own
    kwargs: dict = {}  # data.chat_template_kwargs as training resolved them (qlora.template.template_kwargs)
    system: str | None = None  # the one system prompt every training row had: applied when a consumer sends none
    systems: int = 0  # distinct system prompts in the data (0: no row had one; >1: they vary, none is applied)
    rows_without_system: int = 0  # rows with no system turn, beside those with one (then none is applied either)


class TokenizedData(BaseModel):
    path: str  # datasets.DatasetDict.save_to_disk folder with "train" and "eval"
    fingerprint: str  # content key: data bytes + tokenizer + template + max_length + format
    train_rows: int
    eval_rows: int
    truncated_rows: int = 0
    max_length: int | None = None  # data.max_length it was tokenized with (train.packing: bfd's default bin size)
    format: str = "alpaca"
    prompt_template: str = PROMPT_TEMPLATE  # one-placeholder inference prompt (the same function rendered training)
    report_path: str | None = None  # report.md of the data report
    chat: ChatContract | None = None  # chat data or a chat template: consumers send conversations


class QuantizedModel(BaseModel):
    path: str  # pre-quantized checkpoint + tokenizer, loadable with from_pretrained alone
    base: str  # what the user asked for: hub id or local path
    revision: str | None = None
    hub_id: str | None = None  # set when the base came from the hub: consumers rebuild the 4-bit base from it
    commit: str | None = None  # the hub commit the revision resolved to when the base was loaded
    quantization: dict | None = None  # QuantizationConfig used (rebuilding from the hub must quantize alike)
    fingerprint: str
    footprint_bytes: int  # model.get_memory_footprint() after 4-bit load
    quantized: bool = True
    attn_implementation: str = "sdpa"  # what training and evaluation load it with
    compute_dtype: str | None = None  # the 4-bit matmuls' dtype, auto resolved on the machine that quantized
    dtype_choice: str | None = None  # why that dtype (config, GPU capability, or the CPU timing probe)


class Adapter(BaseModel):
    path: str  # PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    run_dir: str  # Trainer output_dir holding the checkpoints
    global_step: int
    train_loss: float
    first_loss: float | None = None
    last_loss: float | None = None
    resumed_from_step: int | None = None  # set when training continued from a checkpoint
    train_runtime_s: float | None = None  # Trainer's own wall time for train() (excludes model load)
    optim: str | None = None  # the optimizer that trained it (train.optim, auto resolved)
    # Set when generation eval ran during training (eval.every_steps): which checkpoint this adapter is and why.
    selected_step: int | None = None  # the checkpoint's step
    selected_by: str | None = None  # train.select_checkpoint resolved: task_metric, eval_loss or last
    selected_metric: str | None = None  # the metric that chose it (the gate's metric, or eval_loss)
    selected_value: float | None = None  # its value at that step, on the during-training slice
    evaluations: list[dict] = []  # every generation eval: {step, value (the gate's metric), eval_loss}
    checkpoint_model_id: str | None = None  # the selected checkpoint's MLflow LoggedModel (m-...)
    generation_eval_s: float | None = None  # seconds of training spent in those evals (this process's part)


class MlflowRun(BaseModel):
    tracking_uri: str
    run_id: str


class EvalReport(BaseModel):
    metrics: dict[str, float]  # eval/base/<m> and eval/tuned/<m>
    samples: list[dict]  # a few {prompt, reference, base, tuned} rows for people to read
    # What was scored and how: the registry's lineage tags and its consumer check need both.
    data: TokenizedData | None = None
    max_new_tokens: int | None = None


class RegisteredVersion(BaseModel):
    name: str
    version: str
    model_uri: str  # the logged model, models:/m-<id> (MLflow 3 logged-model URI)
    aliases: list[str]
    consumer_checked: int = 0  # eval prompts re-generated identically through models:/<name>/<version>
    decision: str = ""  # the promotion gate's reason, with its evidence
    awaiting_approval: bool = False  # gate passed, registry.require_approval holds champion back


class Trained(BaseModel):
    """What tokenize -> quantize -> train -> evaluate leave (one sweep trial): everything registering it needs."""

    data: TokenizedData
    base: QuantizedModel
    adapter: Adapter
    report: EvalReport
