"""VQA-v2 accuracy as RWSAN's evaluation script computes it, as an `evaluate` metric:
`evaluate.load(rwsan.evaluation.VQA_ACCURACY_METRIC)`, the path of this folder."""

import datasets
import evaluate

from rwsan.evaluation import compute_vqa_accuracy

_DESCRIPTION = """
VQA accuracy as computed by the VQA-v2 evaluation script shipped with RWSAN (and MCAN): the VQA API's
vqaEval.py before GT-Vision-Lab/VQA's commit a013f00 ("Fixed processing answers bug"). The predicted answer is
always normalised as that script does, the annotators' answers only get the punctuation step (when they
disagree), and for each of the ten annotators the prediction earns min(1, matching answers among the other
nine / 3); a question scores the mean over the ten annotators, so 1, 2, 3 and 4 or more annotators agreeing
with the prediction give 0.3, 0.6, 0.9 and 1.0. Results are percentages rounded to two decimals.

The current GT-Vision-Lab/VQA script normalises the prediction only when the annotators disagree, and then
gives the annotators' answers the number, article and contraction step too: with the answers 2 x "2" + 8 x
"two" and the prediction "2", this metric gives 60 and the current script 100.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the predicted answer of each question.
    references (`list` of `list` of `str`): the annotators' answers of each question (ten in VQA-v2).
    answer_types (`list` of `str`, *optional*): the answer type of each question ("yes/no", "number",
        "other"), aligned with `predictions`; given to `compute`, also after `add_batch` calls.
Returns:
    accuracy (`float`): overall accuracy in percent, equal to the official `overall`.
    accuracy_<answer type> (`float`): with `answer_types`, the accuracy of each answer type in percent,
        equal to the official `perAnswerType`.
Examples:
    >>> from rwsan.evaluation import VQA_ACCURACY_METRIC
    >>> vqa_accuracy = evaluate.load(VQA_ACCURACY_METRIC)
    >>> vqa_accuracy.compute(predictions=["two"], references=[["2", "2"] + ["3"] * 8])
    {'accuracy': 60.0}
"""

_CITATION = """
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in
         Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}
"""


class VqaAccuracy(evaluate.Metric):
    """VQA-v2 accuracy (as RWSAN's evaluation script computes it) of predicted answers against the annotators'."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            # The script this metric reproduces, then the task's page (which describes the current script).
            reference_urls=["https://github.com/BrightQin/RWSAN", "https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references, answer_types=None):
        return compute_vqa_accuracy(predictions, references, answer_types)
