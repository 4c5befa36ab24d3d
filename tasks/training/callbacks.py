"""Trainer callbacks that decide what happens when something goes wrong mid-training: the divergence
guard (a non-finite loss or gradient stops the run, never retried) and the MLflow callback that survives a
tracking outage and logs synchronously.
"""

from __future__ import annotations

import contextlib
import logging
import math

from transformers import TrainerCallback

from qlora.errors import TrainingDiverged, is_transient
from qlora.refs import MlflowRun
from qlora.tracking.outage import mark_down
from tasks.training.selection import LOSS, PREFIX

log = logging.getLogger("qlora.train")


# Adapter weight norm, as a multiple of its norm when training started, that means divergence. Measured on
# the demo task (100 steps, paged 8-bit AdamW): learning rate 1e-2 grew it 3x, 1e-1 23x, 1.0 210x (all still
# learning); 100 reached 2,255x by step 3 and 1e9 reached 2e10x at step 2, both with the loss stuck at
# ln(vocab) and a gradient norm of exactly 0 (saturated, no NaN anywhere).
WEIGHT_NORM_LIMIT = 1000.0


class DivergenceGuard(TrainerCallback):
    """Stop a run that has diverged: at the first non-finite loss or gradient (before the optimizer applies
    it), when the LoRA weights' norm explodes (``WEIGHT_NORM_LIMIT``), or, after warmup, when the logged
    loss rises above ``loss_factor`` times its first logged value (issue 13, item 5: ``learning_rate=1e9``
    trained to rc 0 with weights near 2e9, a zero gradient and no NaN, and was registered).

    Gradients are checked every optimizer step, before the update: through the clipping norm the Trainer
    computes anyway (``check_gradients``, called by recipe.QLoRATrainer), else one fused norm over the LoRA
    gradients. The weight norm, the loss and grad_norm are checked when the Trainer is
    about to log, save, evaluate or stop: exploded weights stay exploded, so nothing is missed, no
    checkpoint of them is written, and the steps in between pay no norm and no host sync for it.
    Requires ``logging_nan_inf_filter=False``, otherwise the Trainer silently replaces a NaN loss by the
    running mean.
    """

    def __init__(self, learning_rate: float, max_grad_norm: float, loss_factor: float = 4.0):
        self.trainable: list = []
        self.norm0: float | None = None
        self._checked_step: int | None = None  # the step whose gradients the Trainer's clipping checked
        self.loss_scaled = False
        self.loss_factor = loss_factor
        self.hint = (
            f"train.learning_rate={learning_rate:g}, train.max_grad_norm={max_grad_norm:g}: lower the learning rate "
            "(or check the data for empty/garbage rows); checkpoints before this step are kept, nothing was registered"
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # fp16 (GPUs without bf16: T4, V100) trains under a loss scaler, whose first steps overflow by design: an
        # inf gradient there is the scaler's signal to skip the step and lower the scale, not a divergence. The
        # loss and weight checks still catch a real one.
        self.loss_scaled = bool(getattr(args, "fp16", False))
        # Looked up once: walking named_parameters() of a 4-bit model every step costs ~5% of a CPU step.
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if model is not None else []
        self.norm0 = self._weight_norm()

    def _weight_norm(self) -> float | None:
        import torch

        params = [p.detach() for _, p in self.trainable]
        return float(torch.stack(torch._foreach_norm(params)).float().norm()) if params else None

    def check_gradients(self, step: int, total_norm) -> None:
        """Called by the Trainer's clipping (recipe.QLoRATrainer) with this step's total gradient norm, before
        the gradients are clipped: finite only if every gradient is, and a bad one is still the only
        non-finite tensor, so it can be named (clipping by a NaN norm makes every gradient NaN)."""
        import torch

        self._checked_step = step
        if self.loss_scaled or bool(torch.isfinite(total_norm)):
            return
        self._raise_non_finite_gradient(step)

    def _raise_non_finite_gradient(self, step: int):
        import torch

        name = next((n for n, p in self.trainable if p.grad is not None and not torch.isfinite(p.grad).all()), "?")
        raise TrainingDiverged(f"non-finite gradient in {name} at step {step + 1} ({self.hint})")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        import torch

        if self.loss_scaled or self._checked_step == state.global_step:  # scaler's, or checked through clipping
            return
        grads = [p.grad for _, p in self.trainable if p.grad is not None]
        # One fused norm per tensor and a single host sync, instead of a sync per parameter.
        if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self._raise_non_finite_gradient(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (always first) has set the flags for this step by now.
        if not (control.should_log or control.should_save or control.should_evaluate
                or control.should_training_stop or state.global_step >= state.max_steps):
            return
        norm = self._weight_norm()
        if norm is not None and not math.isfinite(norm):
            raise TrainingDiverged(f"non-finite adapter weights (norm {norm}) at step {state.global_step} ({self.hint})")
        if norm is not None and self.norm0 and norm > WEIGHT_NORM_LIMIT * self.norm0:
            raise TrainingDiverged(f"the adapter's weight norm grew from {self.norm0:.3g} to {norm:.3g} (over "
                                   f"{WEIGHT_NORM_LIMIT:g}x) by step {state.global_step} ({self.hint})")

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Under fp16 loss scaling a logged grad_norm of inf is an overflow step the scaler skipped.
        for key in ("loss", "eval_loss") if self.loss_scaled else ("loss", "grad_norm", "eval_loss"):
            v = (logs or {}).get(key)
            if isinstance(v, (int, float)) and not math.isfinite(v):
                raise TrainingDiverged(f"non-finite {key}={v} at step {state.global_step} ({self.hint})")
        loss = (logs or {}).get("loss")
        first = next((h["loss"] for h in state.log_history if "loss" in h), None)
        if loss is None or first is None or state.global_step <= args.get_warmup_steps(state.max_steps):
            return
        # Floor of 1 nat: a base that already fits the data (first loss 0.1) may wobble to 0.5 without diverging.
        if loss > self.loss_factor * max(first, 1.0):
            raise TrainingDiverged(
                f"loss {loss:.4g} at step {state.global_step} is more than train.divergence_loss_factor="
                f"{self.loss_factor:g} times its first value {first:.4g} ({self.hint}; or raise "
                "train.divergence_loss_factor if such a rise is expected)"
            )


class _SynchronousMlflow:
    """The ``mlflow`` module as the Trainer's callback sees it, with its params and metrics logged
    synchronously. Measured here (300 demo steps on 2 CPU cores, same process otherwise): the callback's
    default ``synchronous=False`` made the training loop 44-46 s instead of 36-38 s, with only 12
    metric batches logged; synchronous logging: 37.5 s. A log call costs milliseconds every
    ``train.logging_steps`` steps. The price: if the tracking server vanishes mid-training, one log call
    waits out MLflow's HTTP retries before the callback gives up (MLFLOW_HTTP_REQUEST_MAX_RETRIES)."""

    def __init__(self, mlflow_module):
        self._m = mlflow_module

    def __getattr__(self, name):
        return getattr(self._m, name)

    def log_params(self, params, synchronous=None, **kw):
        return self._m.log_params(params, synchronous=True, **kw)

    def log_metrics(self, metrics, step=None, synchronous=None, **kw):
        return self._m.log_metrics(metrics, step=step, synchronous=True, **kw)


def safe_mlflow_callback():
    """The Trainer's MLflow callback, except that a tracking failure warns once and training goes on,
    and it logs synchronously (see ``_SynchronousMlflow``)."""
    from transformers.integrations import MLflowCallback

    class SafeMLflowCallback(MLflowCallback):
        _broken = False

        def __init__(self):
            super().__init__()
            self._ml_flow = _SynchronousMlflow(self._ml_flow)

        def _disable(self, e: Exception) -> None:
            self._broken = True
            active = self._ml_flow.active_run()
            if active is None:
                log.warning("MLflow logging failed (%s: %s); training continues without tracking",
                            type(e).__name__, str(e).splitlines()[0][:200])
                return
            # The outage's one warning for the whole run: evaluation then skips tracking too (qlora/tracking/outage.py).
            mark_down(MlflowRun(tracking_uri=self._ml_flow.get_tracking_uri(), run_id=active.info.run_id), e)

        def _guard(self, fn, *a, **kw):
            if self._broken:
                return None
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - only tracking faults are swallowed
                if not (is_transient(e) or type(e).__module__.startswith("mlflow")):
                    raise
                self._disable(e)
                return None

        def setup(self, args, state, model):
            try:
                super().setup(args, state, model)
            except Exception as e:  # noqa: BLE001
                if is_transient(e):
                    self._disable(e)
                elif type(e).__module__.startswith("mlflow"):
                    # e.g. the OOM retry re-logs per_device_train_batch_size with a new value: MLflow
                    # refuses to change a param, but the metrics of the same run are still wanted.
                    log.warning("MLflow kept this run's earlier params (%s)", str(e).splitlines()[0][:200])
                else:
                    raise
            finally:
                self._initialized = True  # do not retry setup at every log

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            # Generation evals are logged by the checkpoint's LoggedModel writer, against its model_id and dataset
            # (selection.py, logged_models.py); here they would be a second, unlinked copy of the same points.
            logs = {k: v for k, v in (logs or {}).items() if not k.startswith(PREFIX)}
            if not logs:
                return None
            return self._guard(super().on_log, args, state, control, logs, model=model, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            return self._guard(super().on_train_end, args, state, control, **kwargs)

    return SafeMLflowCallback()


class ProgressLog(TrainerCallback):
    """A line per logging step in the log (step/max, loss, learning rate, the latest generation-eval metric, ETA)
    and ``report(step, max_steps, line)`` for a live view (the flow's train task updates a Prefect progress
    artifact with it). The Trainer's own progress bar goes to the terminal, which a task run's log does not see."""

    def __init__(self, report=None):
        self.report = report
        self._t0: float | None = None
        self._step0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        self._t0, self._step0 = time.perf_counter(), state.global_step  # a resumed run times its own steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        import time

        logs = logs or {}
        if not state.is_world_process_zero or "loss" not in logs or self._t0 is None:
            return
        step, total = state.global_step, state.max_steps
        done = step - self._step0
        eta = (time.perf_counter() - self._t0) / done * (total - step) if done > 0 else None
        latest = next((h for h in reversed(state.log_history) if LOSS in h), None)  # the latest generation eval
        task = "" if latest is None else "".join(
            f", {k[len(PREFIX):]} {v:.3f} (step {latest['step']})" for k, v in latest.items() if k.startswith(PREFIX) and k != LOSS)
        line = (f"step {step}/{total}: loss {logs['loss']:.4f}, learning rate {logs.get('learning_rate', float('nan')):.3g}"
                f"{task}, ETA {'?' if eta is None else f'{eta:.0f} s'}")
        log.info(line)
        if self.report is not None:
            try:
                self.report(step, total, line)
            except Exception as e:  # noqa: BLE001 - a live view that fails must not stop training
                log.warning("progress report failed (%s: %s); training goes on", type(e).__name__, e)
                self.report = None


SYSTEM_METRICS_INTERVAL_S = 10.0  # one psutil sample (CPU, memory, disk, network; GPU with nvidia-ml-py) per 10 s


@contextlib.contextmanager
def system_metrics(run: MlflowRun | None, resumed: bool = False):
    """MLflow system metrics (``system/*``) on ``run`` while the block trains; nothing without a run. A resumed
    run continues its curves. A monitor that cannot start costs the curves, not the training."""
    if run is None:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resumed,
                                       tracking_uri=run.tracking_uri)
        monitor.start()
    except Exception as e:  # noqa: BLE001 - e.g. psutil missing
        log.warning("MLflow system metrics are off for this run (%s: %s)", type(e).__name__, e)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()
