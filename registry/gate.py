"""The promotion gate: does the challenger beat the incumbent by more than noise?

Both models are scored per example on the same fixed eval set with ``registry.gate_metric`` (exact
match 0/1 for short answers, ROUGE-L F1 for open-ended ones, or BLEU / chrF); the gate takes a
paired bootstrap confidence interval of the mean difference (challenger - incumbent) and promotes
only when its lower bound is above ``registry.min_improvement``. The incumbent is the current
champion or, with no champion, the base model.

Champion scores are not recomputed: every registered version logs its per-example scores of every
generation metric it was evaluated with to its MLflow run as
``registry/scores/<eval-set fingerprint>.<metric>.json``, and the gate reads the champion's file for
the challenger's eval set and metric (versions registered before metrics were named stored exact
match as ``<eval-set fingerprint>.json``, which is still read). Evaluation is greedy and deterministic, so the stored scores are
exactly what a re-score would give, at no cost (re-scoring means loading the champion's base and
adapter again: minutes for a real model, and its base may no longer be on disk). A champion with no
scores on this eval set (the eval set changed) is not comparable: the challenger is not promoted and
the reason says so; promote it by hand with ``qlora promote`` after looking at both.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel

from qlora.config.schema import RegistryConfig

SCORES_DIR = "registry/scores"


SHORT_ANSWER_WORDS = 5  # registry.gate_metric=auto: references all this short -> exact_match


class Decision(BaseModel):
    promote: bool
    reason: str
    against: str  # "base" or "champion v<N>"
    metric: str = "exact_match"  # the per-example score compared (registry.gate_metric, resolved)
    n: int = 0  # paired examples
    mean_diff: float | None = None  # challenger - incumbent, in the metric's units (0..1)
    ci_low: float | None = None
    ci_high: float | None = None
    level: float | None = None
    resamples: int | None = None
    eval_set: str | None = None  # fingerprint of the (prompt, reference) pairs scored

    def metrics(self) -> dict[str, float]:
        keys = ("n", "mean_diff", "ci_low", "ci_high")
        return {f"gate/{k}": float(getattr(self, k)) for k in keys if getattr(self, k) is not None} | {
            "gate/promote": float(self.promote)}


def eval_set_fingerprint(samples: list[dict]) -> str:
    """Content hash of the scored (prompt, reference) pairs, in order: same hash = same eval set."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s["prompt"], s["reference"]]).encode())
    return h.hexdigest()[:16]


def paired_bootstrap(challenger: list[float], incumbent: list[float], resamples: int, level: float,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of (challenger - incumbent) and its percentile bootstrap interval at ``level``."""
    import numpy as np

    if len(challenger) != len(incumbent) or not challenger:
        raise ValueError(f"paired bootstrap needs two equal, non-empty score lists (got {len(challenger)} and {len(incumbent)})")
    d = np.asarray(challenger, dtype=float) - np.asarray(incumbent, dtype=float)
    rng = np.random.default_rng(seed)  # fixed: the same evidence always gives the same decision
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(d.mean()), float(lo), float(hi)


def gate_metric(choice: str, samples: list[dict]) -> str:
    """``registry.gate_metric`` resolved: auto is exact_match when every scored reference is at most
    SHORT_ANSWER_WORDS words (right-or-wrong answers), else rouge (open-ended answers: exact match is ~0
    for base and tuned alike there, so it could never tell them apart)."""
    if choice != "auto":
        return choice
    return "exact_match" if all(len(s["reference"].split()) <= SHORT_ANSWER_WORDS for s in samples) else "rouge"


def decide(challenger: list[float], incumbent: list[float] | None, against: str, cfg: RegistryConfig,
           eval_set: str, metric: str = "exact_match") -> Decision:
    if incumbent is None:
        return Decision(promote=False, against=against, eval_set=eval_set, metric=metric,
                        reason=f"{against} has no per-example {metric} scores on eval set {eval_set} (eval set or "
                               "registry.gate_metric changed?); not comparable, kept as challenger; promote by hand "
                               "with `qlora promote` if it is better")
    mean, lo, hi = paired_bootstrap(challenger, incumbent, cfg.bootstrap_resamples, cfg.confidence_level)
    promote = lo > cfg.min_improvement
    verdict = "above" if promote else "not above"
    reason = (f"{metric} vs {against}: {mean:+.3f} on n={len(challenger)}, {cfg.confidence_level:.0%} CI "
              f"[{lo:+.3f}, {hi:+.3f}], lower bound {verdict} registry.min_improvement={cfg.min_improvement}")
    return Decision(promote=promote, reason=reason, against=against, metric=metric, n=len(challenger), mean_diff=mean,
                    ci_low=lo, ci_high=hi, level=cfg.confidence_level, resamples=cfg.bootstrap_resamples, eval_set=eval_set)


def log_scores(client, run_id: str, eval_set: str, scores: dict[str, list[float]]) -> None:
    """Store this version's per-example scores, one file per metric, keyed by eval set (read by ``stored_scores``)."""
    for metric, values in scores.items():
        client.log_dict(run_id, {"eval_set": eval_set, "metric": metric, "scores": values},
                        f"{SCORES_DIR}/{eval_set}.{metric}.json")


def stored_scores(run_id: str, eval_set: str, tracking_uri: str, metric: str = "exact_match") -> list[float] | None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    names = [f"{eval_set}.{metric}.json"] + ([f"{eval_set}.json"] if metric == "exact_match" else [])  # + the old name
    for name in names:
        try:
            return list(mlflow.artifacts.load_dict(f"runs:/{run_id}/{SCORES_DIR}/{name}")["scores"])
        except Exception:  # a missing artifact is an MlflowException or an OSError depending on the store
            continue
    return None
