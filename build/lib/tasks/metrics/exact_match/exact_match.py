"""Exact match, shipped in the repo so ``evaluate.load`` needs no hub (tasks/evaluate.py loads it by path).

Scores 1.0 when prediction and reference are equal after stripping surrounding whitespace (and,
optionally, lower-casing), else 0.0. ``per_example=True`` also returns the 0/1 scores, which the
registry's promotion gate needs.
"""

import datasets
import evaluate

_DESCRIPTION = "Share of predictions that equal their reference exactly (after strip, optional lower-casing)."
_KWARGS = """
Args:
    predictions (list[str]): generated answers.
    references (list[str]): expected answers.
    ignore_case (bool): compare lower-cased strings. Default False.
    per_example (bool): also return the list of 0/1 scores. Default False.
Returns:
    exact_match (float): mean score in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, ignore_case=False, per_example=False):
        def norm(s):
            s = s.strip()
            return s.lower() if ignore_case else s

        scores = [float(norm(p) == norm(r)) for p, r in zip(predictions, references)]
        out = {"exact_match": sum(scores) / len(scores) if scores else 0.0}
        if per_example:
            out["scores"] = scores
        return out
