"""The QLoRA recipe: k-bit preparation -> LoRA on the configured modules -> ``transformers.Trainer`` with
AdamW (``train.optim: auto``: paged 8-bit on a GPU, fused on a CPU), cosine schedule with warmup, gradient clipping, gradient checkpointing where memory
needs it (``checkpoint_every`` below) and gradient accumulation. ``fit`` trains one run dir to its adapter; ``fit_with_oom_retry`` adds the one
CUDA out-of-memory retry. Every process of a multi-process run calls the latter (``launch.py``).
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from qlora.config.schema import LoraSection, TrainConfig
from qlora.errors import ConfigError
from qlora.models import load_base, load_tokenizer
from qlora.refs import Adapter, MlflowRun, QuantizedModel, TokenizedData
from qlora.storage import write_manifest
from qlora.tracking.outage import logging_to
from tasks.training.callbacks import DivergenceGuard, ProgressLog, safe_mlflow_callback, system_metrics
from tasks.training.checkpoints import (
    ADAPTER_WEIGHTS,
    gather_fsdp_adapter,
    latest_valid_checkpoint,
    save_adapter_tensors,
    training_ended_at,
)
from tasks.training.logged_models import checkpoint_model_id, checkpoint_model_logger
from tasks.training.packing import BinBatches, bin_capacity, pack_bfd
from tasks.training.selection import GenerationEval, GenerationEvalCallback, best, during_rows, evaluations

log = logging.getLogger("qlora.train")


def build_peft_model(model, lora: LoraSection, gradient_checkpointing: bool, quantized: bool, fsdp: bool = False,
                     fp32_norms: bool = True):
    """The loaded base (``load_base``), prepared for k-bit training and wrapped with the LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized and not upcasts_norms(fsdp, fp32_norms):
        # Skip the kbit preparation's fp32 upcast of norms and embeddings; training runs under bf16/fp16
        # autocast and RMSNorm still computes its variance in fp32. Profiled on an H100 (7B, seq 1024):
        # with fp32 norms every 4-bit matmul gets an fp32 input, and bitsandbytes converts each dequantized
        # weight to fp32 before autocast converts it back; those copies were 22% of the GPU time. On the
        # demo (2 CPU cores, bf16, 100 steps): 23.0 s with the upcast, 18.6 s without, 14.8 s without it and
        # with bf16 autocast (what training_arguments then turns on). FSDP needs it: each block's
        # parameters are flattened into one tensor of one dtype.
        if gradient_checkpointing:
            model.enable_input_require_grads()  # grads must reach the checkpointed blocks' inputs
    elif quantized:
        # Non-reentrant checkpointing: required for DDP with frozen 4-bit weights, and the faster path.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False  # the KV cache is useless during training and clashes with checkpointing
    cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        bias=lora.bias, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def upcasts_norms(fsdp: bool, fp32_norms: bool) -> bool:
    """Whether peft's k-bit preparation upcasts norms and embeddings of the 4-bit model to fp32."""
    return fp32_norms and not fsdp


def resolve_checkpointing(base: QuantizedModel, train: TrainConfig, train_split) -> int:
    """``train.gradient_checkpointing`` as the decoder layers checkpointed (``checkpoint_every``): 0 none,
    1 every layer, n every n-th layer."""
    if train.gradient_checkpointing != "auto":
        return int(bool(train.gradient_checkpointing))
    from transformers import AutoConfig

    fp32 = base.compute_dtype == "float32" or (base.quantized and upcasts_norms(train.distributed == "fsdp", train.fp32_norms))
    tokens = max_tokens_per_micro_batch(train_split, train.per_device_train_batch_size)
    return checkpoint_every("auto", AutoConfig.from_pretrained(base.path), tokens, 4 if fp32 else 2, base.footprint_bytes)


def training_arguments(train: TrainConfig, output_dir: Path, compute_dtype, checkpointing: int | bool, optim: str,
                       loss_early_stopping: bool | None = None):
    """TrainingArguments of the recipe; ``checkpointing`` as ``resolve_checkpointing`` returns it (True = every layer).
    ``loss_early_stopping``: the Trainer's own eval-loss early stopping (default: with early_stopping_patience);
    off when generation eval during training (``selection.py``) does the evaluating instead. ``optim``: the
    optimizer ``resolve_optim`` chose for this model (``auto`` needs the trainable parameter count, so it is
    resolved once, by the caller, and the same name goes to the Trainer and the lineage)."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    amp = on_gpu or not upcasts_norms(train.distributed == "fsdp", train.fp32_norms)
    # Early stopping compares eval loss at each save; the best checkpoint is what gets saved as the adapter.
    early = {}
    if loss_early_stopping is None:
        loss_early_stopping = train.early_stopping_patience is not None
    if loss_early_stopping:
        early = dict(eval_strategy="steps", eval_steps=train.save_steps, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=False)
    args = dict(
        output_dir=str(output_dir),
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        optim=optim,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps,  # transformers 5: a float < 1 is a ratio
        max_grad_norm=train.max_grad_norm,
        activation_checkpointing=bool(checkpointing),
        # every_n_layers: the Trainer enables checkpointing after peft's k-bit preparation, so its choice stands
        activation_checkpointing_kwargs={"use_reentrant": False} | ({"every_n_layers": int(checkpointing)} if checkpointing > 1 else {}),
        seed=train.seed,
        # Length-grouped batches: measured padding efficiency 0.5 -> 0.95+ on Code Alpaca (bench/data.py).
        train_sampling_strategy="group_by_length" if train.group_by_length and not train.packing else "random",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # Autocast in the compute dtype: always on GPUs; on a CPU only without the fp32 upcast of the norms
        # (with it, autocast converts every activation back and forth: 30 s vs 23 s for 100 demo steps).
        bf16=amp and compute_dtype == torch.bfloat16,
        fp16=amp and compute_dtype == torch.float16,
        use_cpu=not on_gpu,
        # MLflow is attached by fit() as a callback that survives a tracking outage; others as configured.
        report_to=train.report_to or "none",
        # A NaN/inf loss must reach DivergenceGuard, not be averaged away by the Trainer.
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        dataloader_pin_memory=on_gpu,
        disable_tqdm=False,
        **early,
    )
    return TrainingArguments(**(args | train.extra_args))  # any other field; names checked at config load


def _trainer_class():
    from transformers import Trainer

    class QLoRATrainer(Trainer):
        """The Trainer, minus two pieces of per-step Python work.

        Its FLOP estimate calls ``model.num_parameters()`` every step, which walks all modules of the
        4-bit model (measured: ~3% of a CPU step on the demo). The count never changes: compute it once.
        """

        _n_params: int | None = None
        _trainable: list | None = None
        divergence_guard: DivergenceGuard | None = None  # set by fit(), which makes the guard
        loraplus_lr_ratio: float | None = None  # lora.loraplus_lr_ratio, set by fit()

        def create_optimizer(self, model=None):
            """``train.optim``'s optimizer as the Trainer builds it, with LoRA+'s two learning rates when asked for."""
            if not self.loraplus_lr_ratio or self.optimizer is not None:
                return super().create_optimizer(model)
            from peft.optimizers import create_loraplus_optimizer

            opt_model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = {k: v for k, v in kwargs.items() if k != "lr"} | {"loraplus_weight_decay": self.args.weight_decay}
            self.optimizer = create_loraplus_optimizer(opt_model, cls, lr=self.args.learning_rate,
                                                       loraplus_lr_ratio=self.loraplus_lr_ratio, **kwargs)
            return self.optimizer

        def _clip_grad_norm(self, model):
            """``clip_grad_norm_`` in its two halves, over the trainable parameters only (a list made once)
            instead of ``model.parameters()``: the same norm and clipping (frozen weights have no gradient)
            without walking every module of the 4-bit model each step. Between the halves the DivergenceGuard
            checks the norm, so it needs no gradient norm of its own and still sees the unclipped gradients.
            FSDP, DeepSpeed and the other engines that clip their own way keep the Trainer's path."""
            import torch
            from accelerate.utils import DistributedType

            plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
            if self.accelerator.distributed_type not in plain or self._has_mixed_mesh_grads(model):
                return super()._clip_grad_norm(model)
            if self._trainable is None:
                self._trainable = [p for p in model.parameters() if p.requires_grad]
            self.accelerator.unscale_gradients()  # what accelerate's clip_grad_norm_ does first (fp16 scaler)
            grads = [p.grad for p in self._trainable if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if self.divergence_guard is not None:
                self.divergence_guard.check_gradients(self.state.global_step, norm)
            torch.nn.utils.clip_grads_with_norm_(self._trainable, self.args.max_grad_norm, norm)
            return norm

        def floating_point_ops(self, inputs) -> int:
            ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
            if ids is None or not hasattr(self.model, "num_parameters"):
                return 0
            if self._n_params is None:
                self._n_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * ids.numel() * self._n_params

    return QLoRATrainer


def collator(tok, packing: bool | str):
    """Padded batches, or one flattened row per batch whose position_ids restart at each example
    (``packing: bfd``: one row per bin, restarting at each example inside it, ``packing.BinBatches``).

    transformers 5 turns restarting position_ids into a block-diagonal causal mask when no
    attention_mask is passed (masking_utils.find_packed_sequence_indices), for sdpa and eager alike,
    so packed examples never attend to each other; tests/unit/tasks/test_data_batches.py checks the loss.
    That detection is skipped when a KV cache exists: it relies on ``use_cache = False`` (set above).
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing == "bfd":
        return BinBatches(tok.pad_token_id)
    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)


def _compute_dtype(model):
    import torch

    quant = getattr(model.config, "quantization_config", None)
    dtype = getattr(quant, "bnb_4bit_compute_dtype", torch.float32) if quant else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_attention_trains_here(attn: str | None) -> None:
    """FlexAttention has no backward pass on a CPU (torch 2.13 raises NotImplementedError from the first
    backward): refuse before any model loads, naming the key, instead of failing inside the Trainer."""
    import torch

    if attn == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError("model.attn_implementation=flex_attention trains on a GPU only: PyTorch's FlexAttention has "
                          "no backward pass on a CPU. Use sdpa here (train.packing keeps packed examples apart with it too)")


def fit(base: QuantizedModel, data: TokenizedData, lora: LoraSection, train: TrainConfig, run_dir: Path,
        run: MlflowRun | None = None, callbacks: tuple = (), during: GenerationEval | None = None,
        progress=None) -> Adapter | None:
    """Train ``run_dir`` to its adapter, resuming from its newest valid checkpoint. Returns None on ranks
    other than 0 (rank 0 alone writes the adapter and its manifest). ``during``: generation eval during
    training, and the adapter is then the checkpoint ``during.select`` chooses (``selection.py``). ``progress(step,
    max_steps, line)``: called at every logging step (``callbacks.ProgressLog``), e.g. a Prefect progress artifact."""
    import torch
    from datasets import load_from_disk
    from transformers import EarlyStoppingCallback, set_seed

    check_attention_trains_here(base.attn_implementation)
    splits = load_from_disk(data.path)
    # Seed before the LoRA matrices are initialised (the Trainer seeds only later): the same config then
    # starts from the same adapter in every process, which is what makes a resumed run match an uninterrupted one.
    set_seed(train.seed)
    fsdp = train.distributed == "fsdp"
    train_split = splits["train"]
    if train.packing == "bfd":  # deterministic: every rank and every resume packs the same bins
        train_split = pack_bfd(train_split, bin_capacity(train.packing_tokens, data.max_length, train_split))
    checkpointing = resolve_checkpointing(base, train, train_split)
    tok, loaded = load_tokenizer(base.path), load_base(base.path, attn=base.attn_implementation, fsdp=fsdp)
    model = build_peft_model(loaded, lora, bool(checkpointing), base.quantized, fsdp, train.fp32_norms)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%)", lora.r, lora.target_modules, trainable, total, 100 * trainable / total)
    optim = resolve_optim(train.optim, torch.cuda.is_available(), trainable)

    guard = DivergenceGuard(train.learning_rate, train.max_grad_norm, train.divergence_loss_factor)
    gen_eval = _generation_eval(during, splits["eval"], tok, run)
    # Before the guard: it checks the weights when a checkpoint is about to be written, and this one asks for it.
    all_callbacks = [*([gen_eval] if gen_eval else []), guard, ProgressLog(progress), *callbacks]
    loss_early_stopping = train.early_stopping_patience is not None and during is None
    if loss_early_stopping:
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    trainer = _trainer_class()(
        model=model,
        args=training_arguments(train, run_dir, _compute_dtype(model), checkpointing, optim, loss_early_stopping),
        train_dataset=train_split,
        # The eval split also carries prompt/reference text for generation; the Trainer needs only tokens.
        eval_dataset=splits["eval"].select_columns(splits["train"].column_names)
        if loss_early_stopping else None,
        data_collator=collator(tok, train.packing),
        processing_class=tok,
        callbacks=all_callbacks,
    )
    trainer.divergence_guard = guard
    trainer.loraplus_lr_ratio = lora.loraplus_lr_ratio
    if gen_eval:
        gen_eval.log = trainer.log
    resume = latest_valid_checkpoint(run_dir)
    ended = resume is not None and training_ended_at(resume)
    t0 = time.perf_counter()
    if ended:  # killed after its last checkpoint, before the adapter: that checkpoint is the trained state
        from transformers import TrainerState
        from transformers.trainer_utils import TrainOutput

        log.info("%s was saved as training ended; taking it as it is (nothing left to train)", resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = TrainOutput(trainer.state.global_step, sum(logged) / max(len(logged), 1), {"train_runtime": 0.0})
    else:
        if resume:
            log.info("resuming from %s", resume)
        with logging_to(run, swallow=False) as attached:
            if attached is not None:
                trainer.add_callback(safe_mlflow_callback())
            with system_metrics(run if attached is not None else None, resumed=resume is not None):
                result = trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter_dir = run_dir / "adapter"
    state = gather_fsdp_adapter(trainer) if fsdp and not ended else None  # a collective: every rank takes part
    if not trainer.is_world_process_zero():
        return None
    evals = evaluations(trainer.state.log_history, during.metric) if during else []
    chosen = best(evals, during.select) if during and during.select != "last" else None
    if chosen is not None:
        copy_adapter(run_dir / f"checkpoint-{chosen['step']}", adapter_dir)
    elif ended:
        copy_adapter(Path(resume), adapter_dir)
    elif fsdp:
        save_adapter_tensors(model, state, adapter_dir)
    else:
        model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    if during and during.select != "last" and chosen is None:
        log.warning("no generation eval ran (%d steps, eval.every_steps=%d): the adapter is the last step's",
                    trainer.state.global_step, during.every_steps)
    ref = Adapter(
        path=str(adapter_dir.resolve()), run_dir=str(run_dir), global_step=trainer.state.global_step,
        train_loss=float(result.training_loss), first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        resumed_from_step=int(resume.rsplit("-", 1)[1]) if resume else None,
        train_runtime_s=float(result.metrics.get("train_runtime", 0.0)),
        optim=optim,
        **(_selection_fields(during, evals, chosen, trainer.state.global_step, gen_eval, run, run_dir) if during else {}),
    )
    write_manifest(adapter_dir, ref)  # last, with every file's size: its presence means complete
    log.info(
        "trained %d steps in %.1f s: loss %s -> %s; adapter -> %s",
        ref.global_step, time.perf_counter() - t0,
        f"{losses[0]:.3f}" if losses else "n/a", f"{losses[-1]:.3f}" if losses else "n/a", adapter_dir,
    )
    return ref


def _generation_eval(during: GenerationEval | None, eval_split, tok, run: MlflowRun | None):
    """The during-training eval callback on its slice (the end of the eval split), or None when off."""
    if during is None:
        return None
    rows, warning = during_rows(len(eval_split), during.gate_rows, during.samples)
    if warning:
        if not len(rows):
            raise ConfigError(warning)
        log.warning(warning)
    log.info("generation eval every %d steps on eval rows %d..%d (%s; the gate scores rows 0..%d); checkpoint by %s",
             during.every_steps, rows.start, rows.stop - 1, during.metric, min(during.gate_rows, len(eval_split)) - 1,
             during.select)
    rows = eval_split.select(rows)
    return GenerationEvalCallback(during, rows, tok, on_checkpoint=checkpoint_model_logger(run, during.metric, rows) if run else None)


def copy_adapter(checkpoint: Path, adapter_dir: Path) -> None:
    """The selected checkpoint's adapter (weights + config) as the run's adapter."""
    import shutil

    adapter_dir.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, "adapter_config.json"):
        if not (checkpoint / name).is_file():
            raise RuntimeError(f"the selected checkpoint {checkpoint} has no {name} (deleted by hand?); re-run to train again")
        shutil.copy2(checkpoint / name, adapter_dir / name)


def _selection_fields(during: GenerationEval, evals: list[dict], chosen: dict | None, last_step: int, gen_eval,
                      run: MlflowRun | None, run_dir: Path) -> dict:
    by = during.select if chosen is not None else "last"
    step = chosen["step"] if chosen is not None else last_step
    at = next((e for e in evals if e["step"] == step), None)
    value = None if at is None else at["value" if by != "eval_loss" else "eval_loss"]
    return dict(selected_step=step, selected_by=by, selected_metric="eval_loss" if by == "eval_loss" else during.metric,
                selected_value=value, evaluations=evals, generation_eval_s=gen_eval.seconds,
                # Logged by this process, or (resumed run) by the one before it.
                checkpoint_model_id=gen_eval.model_ids.get(step) or (checkpoint_model_id(run, step, run_dir.name) if run and at else None))


def fit_with_oom_retry(base, data, lora, train: TrainConfig, run_dir: Path, run: MlflowRun | None = None,
                       callbacks: tuple = (), during: GenerationEval | None = None, progress=None) -> Adapter | None:
    """``fit``; on a CUDA out-of-memory, once more with half the micro-batch and twice the accumulation
    (same effective batch, half the activation memory), resuming from the last valid checkpoint."""
    import torch

    try:
        return fit(base, data, lora, train, run_dir, run, callbacks, during, progress)
    except torch.OutOfMemoryError:
        if train.per_device_train_batch_size == 1:
            raise
        smaller = train.model_copy(update={
            "per_device_train_batch_size": train.per_device_train_batch_size // 2,
            "gradient_accumulation_steps": train.gradient_accumulation_steps * 2,
        })
        log.warning(
            "CUDA out of memory at per_device_train_batch_size=%d; retrying once with "
            "per_device_train_batch_size=%d, gradient_accumulation_steps=%d (same effective batch)",
            train.per_device_train_batch_size, smaller.per_device_train_batch_size, smaller.gradient_accumulation_steps,
        )
        with logging_to(run, swallow=False) as attached:
            if attached is not None:  # params cannot change in MLflow; the tag records what was used after
                import mlflow

                mlflow.set_tag("qlora.oom_retry", f"per_device_train_batch_size={smaller.per_device_train_batch_size},"
                               f"gradient_accumulation_steps={smaller.gradient_accumulation_steps}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return fit(base, data, lora, smaller, run_dir, run, callbacks, during, progress)


# ------------------------------------------------------------------ memory: checkpointing and the optimizer by what fits
# Gradient checkpointing only where memory needs it (``train.gradient_checkpointing: auto``).
# 
# Full recompute costs about a third more compute per step (one more forward in backward). Measured:
# the demo on 2 CPU cores trained at 4.3 steps/s with it and 6.8 without (one thread each); a 7B model
# on an H100 (seq 1024 x 4) needed 48.8 GB without it and 10.6 GB with it (6,609 vs 4,947 tokens/s).
# So the activations of the largest micro-batch may take a third of the memory left after the weights:
# when they fit, no layer is checkpointed; when they do not, only every n-th decoder layer is (transformers'
# ``every_n_layers``), n as large as fits, so the recompute costs what the memory needs and no more;
# every layer when nothing less fits. The decision and its numbers are logged.

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
