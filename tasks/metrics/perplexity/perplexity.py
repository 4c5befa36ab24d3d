"""Perplexity of the references from per-example token log-likelihoods, shipped in the repo.

The hub's ``perplexity`` metric loads a model by name; here the model is the one being evaluated
(4-bit base with and without the adapter), already in memory, so the evaluate stage computes each
example's summed negative log-likelihood over its trained (answer) tokens and this module turns
them into perplexities: the corpus value is exp(total NLL / total tokens), i.e. exp(eval loss).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "exp(mean token NLL) over all examples, and per example; capped at exp(50) against overflow."
_KWARGS = """
Args:
    nll (list[float]): summed negative log-likelihood (nats) of each example's scored tokens.
    n_tokens (list[int]): how many tokens each sum is over.
    per_example (bool): also return each example's perplexity. Default False.
Returns:
    perplexity (float): exp(sum(nll) / sum(n_tokens)).
"""
CAP = 50.0  # nats per token; a random model's loss on a large vocabulary stays far below


def _ppl(nll: float, n: int) -> float:
    return math.exp(min(nll / max(n, 1), CAP))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"nll": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, n_tokens, per_example=False):
        out = {"perplexity": _ppl(sum(nll), sum(n_tokens))}
        if per_example:
            out["scores"] = [_ppl(x, n) for x, n in zip(nll, n_tokens)]
        return out
