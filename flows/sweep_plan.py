"""Sweeps: which trials to run (a grid, or Optuna's TPE over the grid's values), each trial's config, and
which trial is best. Pure planning and bookkeeping; ``flows/sweep.py`` runs the trials.

A grid key is any config key ``--set`` takes (``train.learning_rate``, ``lora.r``, ``data.sources``...),
except what must be the same for every trial: where trials are registered and tracked (``registry``,
``tracking``, ``report``), the cache folder (``workdir``) and how they are scored (``eval``).

Optuna's TPE over a sweep grid's values (``--sampler tpe --trials N``), for grids too large to run whole.

Optional: Optuna is the ``sweep`` extra (``pip install 'qlora-pipeline[sweep]'``) and is imported only here.
Every grid key becomes a categorical choice among its values (by index, so lists such as target_modules work).
Trials are asked for in batches of ``sweep.max_parallel`` and told their score when they finish, so later
batches learn from earlier ones; a failed trial is told as failed.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlora.config.schema import PipelineConfig
from qlora.errors import ConfigError
from qlora.refs import MlflowRun, RegisteredVersion, Trained

FIXED = ("registry", "tracking", "report", "workdir", "eval")  # same for every trial (see the module docstring)


def sweepable_keys(model: Any = PipelineConfig, prefix: str = "") -> list[str]:
    """Every leaf key a grid may name (sections recursed into; FIXED ones left out)."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if key.split(".")[0] in FIXED:
            continue
        sub = field.annotation
        out += sweepable_keys(sub, key + ".") if isinstance(sub, type) and issubclass(sub, BaseModel) else [key]
    return out


SWEEPABLE = sweepable_keys()


class SweepConfig(BaseModel):
    """How to sweep: the flow parameter ``sweep`` of ``qlora-sweep`` (the UI form shows it next to ``config``)."""

    model_config = ConfigDict(extra="forbid")

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Config keys (dotted, as for --set) and the values to try, e.g. {train.learning_rate: [1e-4, 2e-4], "
        "lora.r: [16, 64]}; the grid sampler runs every combination (2 x 2 = 4 trials).",
        # In the parameter schema too: the Prefect API then refuses an unknown key before a flow run exists.
        json_schema_extra={"propertyNames": {"enum": SWEEPABLE}},
    )
    max_parallel: int = Field(
        1, ge=1, le=64,
        description="Trials in flight at once. Training and evaluation still queue on each machine's device slot (one "
        "at a time per GPU); with trial_deployment the trials spread over the work pool's workers.",
    )
    sampler: Literal["grid", "tpe"] = Field(
        "grid", description="grid: every combination; tpe: Optuna's TPE picks `trials` combinations of the grid's "
        "values, learning from the finished ones (needs the `sweep` extra: pip install 'qlora-pipeline[sweep]').",
    )
    trials: int | None = Field(None, ge=1, description="How many trials sampler=tpe runs; required for tpe, unused by grid.")
    seed: int = Field(0, description="Seed of the TPE sampler.")
    trial_deployment: str | None = Field(
        None, description="Run each trial as a flow run of this deployment (e.g. qlora-trial/trial) on its work pool, "
        "so the pool's workers share the trials; unset: trials are subflows in the sweep's own process.",
    )

    @field_validator("grid")
    @classmethod
    def _known_keys(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if problem := key_problem(key):
                raise ValueError(f"{key}: {problem}")
            if not values:
                raise ValueError(f"{key}: no values to try")
        return grid

    @model_validator(mode="after")
    def _tpe_needs_trials(self) -> "SweepConfig":
        if self.sampler == "tpe" and self.trials is None:
            raise ValueError("sampler=tpe needs trials (how many to run), e.g. --trials 8")
        if not self.grid:
            raise ValueError("grid is empty: give at least one key and its values, e.g. --grid train.learning_rate=1e-4,2e-4")
        return self


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be swept, or None: an unknown key, a section, or one every trial must share."""
    if key in SWEEPABLE:
        return None
    if key.split(".")[0] in FIXED:
        return f"cannot be swept: {', '.join(FIXED)} are the same for every trial (where and how trials are scored and kept)"
    if any(k.startswith(key + ".") for k in SWEEPABLE):
        return f"is a section; sweep its keys, e.g. {next(k for k in SWEEPABLE if k.startswith(key + '.'))}"
    return "unknown key (check the spelling; see configs/demo.yaml for the known keys)"


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["train.learning_rate=1e-4,2e-4", "lora.target_modules=[q_proj,v_proj],all-linear"]`` -> the grid.
    Values are YAML, as for --set; commas inside [...] or {...} do not split."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid {item}: expected dotted.key=value1,value2,..., e.g. --grid train.learning_rate=1e-4,2e-4")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {item}: values are not valid YAML ({getattr(e, 'problem', e)})") from None
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; put all its values in one --grid")
        grid[key] = values
    return grid


def sweep_config(**fields) -> SweepConfig:
    """``SweepConfig`` from CLI values, with a validation error as one ConfigError line per problem."""
    try:
        return SweepConfig(**fields)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where, msg = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
            lines.append(f"--grid {msg}" if where == "grid" else f"sweep{'.' + where if where else ''}: {msg}")
        raise ConfigError("\n".join(lines)) from None


class Trial(BaseModel):
    index: int
    values: dict[str, Any]  # the swept keys' values, as the validated config holds them
    config: PipelineConfig


def trial_config(config: PipelineConfig, overrides: dict[str, Any], index: int, where: str | None = None) -> Trial:
    """The base config with one grid point applied and validated; a bad value names the trial and the key."""
    raw = config.model_dump(mode="json")
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        where = where or f"sweep trial {index} ({_show(overrides)})"
        raise ConfigError("\n".join(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    return Trial(index=index, values={k: value_at(cfg, k) for k in overrides}, config=cfg)


def value_at(cfg: PipelineConfig, key: str) -> Any:
    node: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def grid_trials(config: PipelineConfig, sweep: SweepConfig) -> list[Trial]:
    """Every combination, in the order the keys and values were given; all validated before any runs."""
    keys = list(sweep.grid)
    return [trial_config(config, dict(zip(keys, combo)), i) for i, combo in enumerate(itertools.product(*sweep.grid.values()))]


def _show(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items())


class TrialOutcome(BaseModel):
    """One finished trial, as the sweep ranks and reports it."""

    index: int
    values: dict[str, Any]
    config: PipelineConfig
    status: str  # the trial flow run's final state type (COMPLETED, FAILED, CRASHED, ...)
    message: str = ""
    run: MlflowRun  # its child MLflow run
    flow_run_id: str | None = None
    duration_s: float = 0.0
    trained: Trained | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.trained.report.metrics if self.trained else {}


class SweepResult(BaseModel):
    version: RegisteredVersion
    best_trial: int
    metric: str  # eval/tuned/<name> the best was chosen by
    rows: list[dict]  # the comparison table


def ranking_metric(gate: str, outcomes: list[TrialOutcome]) -> str:
    """``eval/tuned/<gate>``, ``gate`` being ``registry.gate_metric`` as the registry resolves it (auto: exact_match
    or rouge by the eval references, ``registry.gate.gate_metric``); exact match when a trial did not log it."""
    done = [o for o in outcomes if o.trained]
    return f"eval/tuned/{gate}" if done and all(f"eval/tuned/{gate}" in o.metrics for o in done) else "eval/tuned/exact_match"


def best(outcomes: list[TrialOutcome], metric: str) -> TrialOutcome | None:
    """Highest ``metric`` on the eval split; ties (tiny models score 0 everywhere) go to the lower eval loss, then
    the earlier trial."""
    done = [o for o in outcomes if o.trained]
    return min(done, key=lambda o: (-o.metrics.get(metric, float("-inf")), o.metrics.get("eval/tuned/loss", float("inf")),
                                    o.index), default=None)


def table(outcomes: list[TrialOutcome], metric: str, winner: TrialOutcome | None) -> list[dict]:
    """The comparison table: one row per trial, same columns in every row (Prefect table artifacts need that)."""
    rows = []
    for o in sorted(outcomes, key=lambda o: o.index):
        m = o.metrics
        rows.append({
            "trial": o.index, **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in o.values.items()},
            metric: m.get(metric), "eval/tuned/loss": m.get("eval/tuned/loss"),
            "train_loss": o.trained.adapter.train_loss if o.trained else None,
            "steps": o.trained.adapter.global_step if o.trained else None, "duration_s": round(o.duration_s, 1),
            "status": o.status, "best": "yes" if winner is not None and o.index == winner.index else "",
            "mlflow_run": o.run.run_id,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                     ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])


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
