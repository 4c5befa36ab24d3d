"""Stage 3: QLoRA training with ``transformers.Trainer`` on the pre-quantized base.

The recipe is in ``tasks/training/recipe.py``; this entry decides where it runs. One run dir per
(base, data, LoRA, train config), locked while training, so a retry or a second flow run of the same
config never writes the same checkpoints: it waits, then returns the adapter the first one finished. Only a
training that has work to do takes a training slot of the worker (``qlora/locks.py``).
Training resumes from the newest *valid* checkpoint (``training/checkpoints.py``), a NaN/inf loss or
gradient stops it at once (``TrainingDiverged``, never retried), a CUDA OOM retries once with half the
micro-batch, and a tracking outage costs the loss curve, not the training (``training/callbacks.py``).
``train.num_processes > 1`` or FSDP runs the same recipe in N processes (``training/launch.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qlora.config.schema import LoraSection, TrainConfig, stable_hash
from qlora.errors import is_disk_full
from qlora.locks import locked_run_dir, training_slot
from qlora.refs import Adapter, MlflowRun, QuantizedModel, TokenizedData
from qlora.storage import cached, disk_full_error
from tasks.training.launch import LaunchSpec, run_launcher
from tasks.training.recipe import fit_with_oom_retry
from tasks.training.selection import GenerationEval

log = logging.getLogger("qlora.train")


def run_dir_for(base: QuantizedModel, data: TokenizedData, lora: LoraSection, train: TrainConfig, workdir,
                during: GenerationEval | None = None) -> Path:
    """Keyed by what is trained (not a timestamp), so a retry or re-run finds its checkpoints. Generation eval
    during training is part of the key only when on (it decides where training stops and which checkpoint is
    the adapter)."""
    what = {"base": base.fingerprint, "data": data.fingerprint, "lora": lora.key_fields(), "train": train.model_dump()}
    key = stable_hash(what | ({"during": during.model_dump()} if during else {}))
    return Path(workdir) / "runs" / key


def train_adapter(
    base: QuantizedModel,
    data: TokenizedData,
    lora: LoraSection,
    train: TrainConfig,
    workdir: str | Path,
    run: MlflowRun | None = None,
    callbacks: tuple = (),
    during: GenerationEval | None = None,
    progress=None,
) -> Adapter:
    """Train a LoRA adapter on ``base`` and save it; resumes from the newest valid checkpoint of the same run dir.

    ``callbacks`` are extra ``TrainerCallback``s for in-process training (how benchmarks and tests
    instrument the real stage: step timers, profilers, spies); ranks of a multi-process run get none.
    ``during``: generation eval during training and checkpoint selection (``training/selection.py``).
    ``progress(step, max_steps, line)``: a live view at every logging step (in-process training only).
    """
    run_dir = run_dir_for(base, data, lora, train, workdir, during)
    try:
        return _train_locked(base, data, lora, train, run_dir, run, callbacks, during, progress)
    except Exception as e:
        if is_disk_full(e):  # checkpoints are the resume points: a partial one is skipped on the re-run
            raise disk_full_error(run_dir, "checkpoints or the adapter") from None
        raise


def _train_locked(base, data, lora, train: TrainConfig, run_dir: Path, run, callbacks, during=None, progress=None) -> Adapter:
    # A completed training's adapter: its manifest and file index are written last; a folder cut short is
    # removed with a warning, and training resumes from its last checkpoint to write it again (qlora/storage.py).
    adapter = run_dir / "adapter"
    with locked_run_dir(run_dir):
        done = cached(adapter, "the trained adapter", Adapter)
        if done is not None:  # before the training slots: finding a finished adapter must not queue behind trainings
            log.info("adapter already trained for this exact config and data: %s", Path(done.path))
            return done
        with training_slot(train):
            if train.num_processes <= 1 and train.distributed == "ddp":
                return fit_with_oom_retry(base, data, lora, train, run_dir, run, tuple(callbacks), during, progress)
            if callbacks:
                log.warning("train_adapter: %d extra callback(s) ignored: the ranks of a multi-process run are "
                            "separate processes", len(callbacks))
            t0 = time.perf_counter()
            run_launcher(LaunchSpec(base=base, data=data, lora=lora, train=train, run_dir=str(run_dir), run=run, during=during))
        done = cached(adapter, "the trained adapter", Adapter)
        if done is None:
            raise RuntimeError(f"distributed training finished but rank 0 wrote no {run_dir / 'adapter' / 'manifest.json'}")
    log.info("distributed training (%d processes) done in %.1f s: %d steps", train.num_processes,
             time.perf_counter() - t0, done.global_step)
    return done
