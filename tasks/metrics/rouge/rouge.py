"""ROUGE-L F1 (longest common subsequence), shipped in the repo so ``evaluate.load`` needs no hub.

Google's ``rouge_score`` implementation (what the hub's ``rouge`` metric wraps), with its default
tokenizer (lower-cased, non-alphanumerics dropped). ``per_example=True`` also returns each
example's F1, which the promotion gate compares (registry.gate_metric).
"""

import datasets
import evaluate

_DESCRIPTION = "ROUGE-L F1 of each prediction against its reference, averaged; 0 for an empty prediction."
_KWARGS = """
Args:
    predictions (list[str]): generated answers.
    references (list[str]): expected answers.
    per_example (bool): also return the list of per-example F1 scores. Default False.
Returns:
    rouge (float): mean ROUGE-L F1 in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, per_example=False):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        out = {"rouge": sum(scores) / len(scores) if scores else 0.0}
        if per_example:
            out["scores"] = scores
        return out
