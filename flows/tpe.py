"""Optuna's TPE over a sweep grid's values (``--sampler tpe --trials N``), for grids too large to run whole.

Optional: Optuna is the ``sweep`` extra (``pip install 'qlora-pipeline[sweep]'``) and is imported only here.
Every grid key becomes a categorical choice among its values (by index, so lists such as target_modules work).
Trials are asked for in batches of ``sweep.max_parallel`` and told their score when they finish, so later
batches learn from earlier ones; a failed trial is told as failed.
"""

from __future__ import annotations

import logging

from qlora.config.schema import PipelineConfig
from qlora.errors import ConfigError
from flows.sweep_plan import SweepConfig, Trial, TrialOutcome, trial_config


class TpeSearch:
    def __init__(self, config: PipelineConfig, sweep: SweepConfig):
        try:
            import optuna
        except ImportError:
            raise ConfigError("sweep.sampler=tpe (--sampler tpe) needs Optuna, which is optional: "
                              "pip install 'qlora-pipeline[sweep]' (the `sweep` extra)") from None
        optuna.logging.set_verbosity(logging.WARNING)
        self._optuna = optuna
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=sweep.seed))
        self.config, self.sweep = config, sweep
        self.asked = 0
        self._pending: dict[int, object] = {}
        for key, values in sweep.grid.items():  # every value checked now, not when TPE first picks it
            for v in values:
                trial_config(config, {key: v}, -1, where=f"--grid {key}={v}")

    @property
    def done(self) -> bool:
        return self.asked >= (self.sweep.trials or 0)

    def ask(self, n: int) -> list[Trial]:
        out = []
        while not self.done and len(out) < n:
            t = self.study.ask()
            values = {k: vals[t.suggest_categorical(k, list(range(len(vals))))] for k, vals in self.sweep.grid.items()}
            out.append(trial_config(self.config, values, self.asked))
            self._pending[self.asked] = t
            self.asked += 1
        return out

    def tell(self, outcome: TrialOutcome, metric: str) -> None:
        t = self._pending.pop(outcome.index)
        if outcome.trained is None:
            self.study.tell(t, state=self._optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(t, outcome.metrics.get(metric, 0.0))
