"""BLEU (sacrebleu), shipped in the repo so ``evaluate.load`` needs no hub.

``bleu`` is sacrebleu's corpus BLEU / 100 (so it is in [0, 1] like the other generation metrics);
``per_example=True`` adds sentence BLEU with effective order (sacrebleu's recommendation for single
sentences: short answers are not zeroed for lacking 4-grams), which the promotion gate compares.
The corpus score is not the mean of the sentence scores.
"""

import datasets
import evaluate

_DESCRIPTION = "sacrebleu BLEU / 100: corpus score, and sentence scores (effective order) per example."
_KWARGS = """
Args:
    predictions (list[str]): generated answers.
    references (list[str]): expected answers (one per prediction).
    per_example (bool): also return per-example sentence BLEU / 100. Default False.
Returns:
    bleu (float): corpus BLEU / 100, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, per_example=False):
        from sacrebleu.metrics import BLEU

        out = {"bleu": BLEU().corpus_score(predictions, [references]).score / 100 if predictions else 0.0}
        if per_example:
            sentence = BLEU(effective_order=True)
            out["scores"] = [sentence.sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references)]
        return out
