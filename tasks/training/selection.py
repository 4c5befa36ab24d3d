"""Choosing the checkpoint the task says is best: generation eval during training (``eval.every_steps``),
checkpoint selection (``train.select_checkpoint``) and early stopping on the task metric.

Every ``every_steps`` optimizer steps ``GenerationEvalCallback`` generates greedily (batched, KV cache on) on
the during-training slice, scores it with the metric module evaluation uses (the promotion gate's metric,
resolved by the flow) plus its eval loss, and logs ``during_eval/<metric>`` and ``during_eval/loss`` through
``Trainer.log``: into ``state.log_history`` (saved in every checkpoint's ``trainer_state.json``, so a resumed
run has its whole eval history) and to MLflow. A checkpoint is written at every such eval; the best one is
``state.best_model_checkpoint``, which the Trainer's checkpoint rotation never deletes. Best-so-far and the
patience counter are not kept anywhere else: they are recomputed from the history, so a resume cannot lose
them. Ties go to the earlier step (a later step must be strictly better).

The slice is the LAST ``eval.during_samples`` rows of the eval split; the final evaluation and the gate score
the FIRST ``eval.max_samples`` rows, so the rows that choose a checkpoint never judge it.

Under DDP rank 0 generates on the whole slice and the other ranks wait for its result (a broadcast), so every
rank takes the same save/stop decision. FSDP is refused when the config loads (a sharded model cannot
generate on one rank).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

from pydantic import BaseModel
from transformers import TrainerCallback

from qlora.config.schema import EvalConfig, TrainConfig

log = logging.getLogger("qlora.train")

PREFIX = "during_eval/"  # log_history / MLflow keys of the generation evals
LOSS = PREFIX + "loss"


class GenerationEval(BaseModel):
    """What the train stage needs of ``eval`` and ``train`` for generation eval during training (None = off)."""

    every_steps: int
    samples: int  # eval.during_samples: the slice, taken from the end of the eval split
    gate_rows: int  # eval.max_samples: the first rows, scored by the final evaluation and the gate
    metric: str  # the gate's metric, resolved (registry.gate_metric auto -> exact_match or rouge)
    max_new_tokens: int
    batch_size: int
    select: Literal["task_metric", "eval_loss", "last"]
    stop_on: Literal["task_metric", "eval_loss"]
    patience: int | None = None
    min_delta: float = 0.0

    @classmethod
    def of(cls, train: TrainConfig, ev: EvalConfig, metric: str) -> "GenerationEval | None":
        if ev.every_steps is None:
            return None
        auto = "task_metric"
        return cls(every_steps=ev.every_steps, samples=ev.during_samples, gate_rows=ev.max_samples, metric=metric,
                   max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                   select=auto if train.select_checkpoint == "auto" else train.select_checkpoint,
                   stop_on=auto if train.early_stopping_metric == "auto" else train.early_stopping_metric,
                   patience=train.early_stopping_patience, min_delta=train.early_stopping_min_delta)


def during_rows(eval_rows: int, gate_rows: int, samples: int) -> tuple[range, str | None]:
    """The eval-split rows of the during-training slice (from the end, never among the first ``gate_rows``),
    and a warning when the split is too small for both."""
    start = max(gate_rows, eval_rows - samples)
    rows = range(start, eval_rows)
    if len(rows) == 0:
        return rows, (f"the eval split has {eval_rows} rows and the final evaluation scores the first eval.max_samples="
                      f"{gate_rows}: no row is left for the during-training slice; raise data.eval_fraction or lower "
                      "eval.max_samples")
    if len(rows) < samples:
        return rows, (f"the eval split has {eval_rows} rows: the during-training slice is rows {start}..{eval_rows - 1} "
                      f"({len(rows)} of eval.during_samples={samples}) so that it stays disjoint from the first "
                      f"eval.max_samples={gate_rows} the gate scores; raise data.eval_fraction for a larger slice")
    return rows, None


def row_roles(eval_rows: int, ev: EvalConfig) -> str:
    """The data report's paragraph on which eval rows do what."""
    gate = min(ev.max_samples, eval_rows)
    text = (f"- eval rows 0..{gate - 1} ({gate}): final evaluation (generation metrics) and the promotion gate; "
            f"eval loss and perplexity: all {eval_rows} rows\n")
    if ev.every_steps is None:
        return text + "- no generation eval during training (eval.every_steps unset)\n"
    rows, warning = during_rows(eval_rows, ev.max_samples, ev.during_samples)
    if len(rows):
        text += (f"- eval rows {rows.start}..{rows.stop - 1} ({len(rows)}): generation eval every {ev.every_steps} steps, "
                 "which chooses the checkpoint (disjoint from the gate's rows)\n")
    return text + (f"- **warning**: {warning}\n" if warning else "")


def evaluations(history: list[dict], metric: str) -> list[dict]:
    """The generation evals in a Trainer log history, in step order: ``{step, value, eval_loss}``."""
    return [{"step": int(h["step"]), "value": float(h[PREFIX + metric]), "eval_loss": float(h[LOSS])}
            for h in history if LOSS in h and PREFIX + metric in h]


def _better(new: float, old: float, by: str, min_delta: float = 0.0) -> bool:
    return new > old + min_delta if by == "task_metric" else new < old - min_delta


def best(evals: list[dict], by: str) -> dict | None:
    """The best evaluation by ``task_metric`` (highest) or ``eval_loss`` (lowest); ties: the earliest step."""
    key = "value" if by == "task_metric" else "eval_loss"
    chosen = None
    for e in evals:
        if chosen is None or _better(e[key], chosen[key], by):
            chosen = e
    return chosen


def evals_since_best(evals: list[dict], by: str, min_delta: float) -> int:
    """Evaluations since the last one that improved on the best so far by more than ``min_delta``."""
    key = "value" if by == "task_metric" else "eval_loss"
    top, wait = None, 0
    for e in evals:
        if top is None or _better(e[key], top, by, min_delta):
            top, wait = e[key], 0
        else:
            wait += 1
    return wait


class GenerationEvalCallback(TrainerCallback):
    """Generation eval every ``spec.every_steps`` steps (see the module docstring). ``log`` is the Trainer's
    own ``log`` (set once the Trainer exists); ``on_checkpoint(step, checkpoint_dir, record)`` is called on rank 0
    once the checkpoint of an evaluated step is on disk (fit() passes the LoggedModel writer)."""

    def __init__(self, spec: GenerationEval, rows, tok, on_checkpoint=None):
        from tasks.evaluate import load_metric

        self.spec, self.rows, self.tok = spec, rows, tok
        self.scorer = load_metric(spec.metric)
        self.log = None
        self.on_checkpoint = on_checkpoint
        self.model_ids: dict[int, str] = {}  # step -> the LoggedModel id on_checkpoint returned (this process)
        self.seconds = 0.0  # spent generating and scoring: its share of training time is what it costs

    def evaluate(self, model) -> dict[str, float]:
        """Score ``model`` on the slice: batched greedy generation with the KV cache, then the eval loss; the
        model is back in train mode (and without cache) afterwards."""
        from qlora.models import generate
        from tasks.evaluate import token_nll

        was_training, cache, side = model.training, model.config.use_cache, self.tok.padding_side
        # bitsandbytes (CPUs with AVX512-BF16) repacks every 4-bit weight into a CPU layout at the first forward in
        # eval mode and keeps that layout when training goes on, until a checkpoint save converts it back: training
        # numerics would depend on when evals ran, and a resumed run would not match an uninterrupted one (measured:
        # eval loss 5.9151 vs 5.9146 at the same step). Evaluate on the layout training uses.
        packers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
        for m in packers:
            m.support_avx512bf16_for_cpu = False
        model.eval()
        model.config.use_cache = True
        self.tok.padding_side = "left"  # batched generation continues each prompt from its last real token
        try:
            preds = generate(model, self.tok, self.rows["prompt"], self.spec.max_new_tokens, self.spec.batch_size)
            got = self.scorer.compute(predictions=preds, references=self.rows["reference"])
            nll, counts = token_nll(model, self.tok, self.rows, self.spec.batch_size)
        finally:
            self.tok.padding_side = side
            model.config.use_cache = cache
            model.train(was_training)
            for m in packers:
                m.support_avx512bf16_for_cpu = True
        return {PREFIX + self.spec.metric: float(got[self.spec.metric]), LOSS: sum(nll) / max(sum(counts), 1)}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.spec.every_steps or any(e["step"] == step for e in evaluations(state.log_history, self.spec.metric)):
            return
        t0 = time.perf_counter()
        record = _from_rank_zero(self.evaluate(model) if state.is_world_process_zero else None)
        self.seconds += time.perf_counter() - t0
        wanted_log = control.should_log  # the Trainer's on_log resets it: this step's loss must still be logged
        self.log(dict(record))  # Trainer.log: state.log_history (saved with the checkpoint) and MLflow, at this step
        control.should_log = wanted_log
        control.should_save = True
        evals = evaluations(state.log_history, self.spec.metric)
        if self.spec.select != "last":
            chosen = best(evals, self.spec.select)
            state.best_model_checkpoint = os.path.join(args.output_dir, f"checkpoint-{chosen['step']}")
            state.best_metric = chosen["value" if self.spec.select == "task_metric" else "eval_loss"]
        waited = evals_since_best(evals, self.spec.stop_on, self.spec.min_delta)
        if state.is_world_process_zero:  # the one rank that generated says so
            log.info("step %d: %s %.4f, eval loss %.4f on %d held-out rows (%.1f s); %d eval(s) without improvement",
                     step, self.spec.metric, record[PREFIX + self.spec.metric], record[LOSS], len(self.rows),
                     time.perf_counter() - t0, waited)
        if self.spec.patience is not None and waited >= self.spec.patience:
            log.info("early stopping at step %d: %s did not improve by more than %g for %d evaluations",
                     step, self.spec.stop_on, self.spec.min_delta, waited)
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        evals = evaluations(state.log_history, self.spec.metric)
        if self.on_checkpoint is None or not state.is_world_process_zero or not evals or evals[-1]["step"] != state.global_step:
            return
        model_id = self.on_checkpoint(state.global_step, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"), evals[-1])
        if model_id:
            self.model_ids[state.global_step] = model_id


def _from_rank_zero(record):
    """Rank 0's record on every rank (the others wait here while it generates); as is in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [record]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return record
