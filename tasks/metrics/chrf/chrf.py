"""chrF (sacrebleu's character n-gram F-score), shipped in the repo so ``evaluate.load`` needs no hub.

Character n-grams suit code and morphologically rich text better than word BLEU. ``chrf`` is the
corpus score / 100; ``per_example=True`` adds sentence scores / 100 for the promotion gate.
"""

import datasets
import evaluate

_DESCRIPTION = "sacrebleu chrF / 100: corpus score, and sentence scores per example."
_KWARGS = """
Args:
    predictions (list[str]): generated answers.
    references (list[str]): expected answers (one per prediction).
    per_example (bool): also return per-example sentence chrF / 100. Default False.
Returns:
    chrf (float): corpus chrF / 100, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, per_example=False):
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        out = {"chrf": chrf.corpus_score(predictions, [references]).score / 100 if predictions else 0.0}
        if per_example:
            out["scores"] = [chrf.sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references)]
        return out
