"""VQA-v2 accuracy, computed exactly as the evaluation script shipped with RWSAN (its `utils/vqaEval.py`, which
MCAN ships too): the VQA API's `vqaEval.py` as it was before GT-Vision-Lab/VQA's commit a013f00 ("Fixed processing
answers bug"). The current script of GT-Vision-Lab/VQA scores some answers differently (see below).

A predicted answer earns, for each of the ten annotators, `min(1, matches / 3)` where `matches` counts the
*other* annotators who gave that answer; the question's accuracy is the mean over the ten leave-one-out
subsets. So 1, 2, 3 and 4 or more annotators agreeing with the prediction give 0.3, 0.6, 0.9 and 1.0.
Aggregates are percentages rounded to two decimals, `round(100 * sum / count, 2)`, like the official script.

Answers are compared after the normalisation of RWSAN's script, quirks included:

- the prediction is always normalised: newlines and tabs become spaces, it is stripped, punctuation is removed
  or turned into spaces, it is lower-cased, number words become digits, articles are dropped and contractions
  written without their apostrophe get it back;
- the ground-truth answers only go through the punctuation step, and only when the annotators disagree (with
  ten identical answers they are compared verbatim);
- a punctuation mark is deleted when it touches a space somewhere in the answer, or when the answer contains a
  digit-comma-digit group anywhere; otherwise it becomes a space;
- a period is deleted unless a digit follows it, and at most 32 periods are deleted per answer.

The current GT-Vision-Lab/VQA script differs in three ways: it normalises the prediction only when the annotators
disagree (with ten identical answers, the prediction is only stripped); it then also gives the ground-truth answers
the number, article and contraction step (`processDigitArticle`) after the punctuation one; and it turns newlines
and tabs of the ground-truth answers into spaces and strips them. For example, with the annotators' answers
2 x "2" + 8 x "two" and the prediction "2", this module scores 60 ("two" stays "two", so two annotators agree)
and the current script 100; 2 x "dog" + 8 x "a dog" with the prediction "dog" likewise. Numbers from here compare
with those of RWSAN's and MCAN's code, not with those of tools that use the current script.
"""

from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

# The official evaluation and the original's answer preprocessing (`prep_ans`) share their steps, quirks included;
# the processor, which must stay importable on its own, holds them.
from .processing_rwsan import normalize_answer_punctuation as normalize_punctuation
from .processing_rwsan import normalize_answer_words as normalize_words

DEFAULT_PRECISION = 2
# The `evaluate` metric's folder, wherever the package is installed: `evaluate.load(VQA_ACCURACY_METRIC)`.
VQA_ACCURACY_METRIC = str(Path(__file__).parent / "metrics" / "vqa_accuracy")

# Number of agreeing annotators that earns full credit.
_FULL_CREDIT_MATCHES = 3

# Answers repeat a lot (a few thousand distinct predictions, mostly short ground truths), so per-epoch
# evaluation mostly hits these caches.
_NORMALIZATION_CACHE_SIZE = 1 << 17

# Ids shown in error messages about mismatched question sets.
_MAX_IDS_IN_ERRORS = 5


_cached_punctuation = lru_cache(maxsize=_NORMALIZATION_CACHE_SIZE)(normalize_punctuation)


@lru_cache(maxsize=_NORMALIZATION_CACHE_SIZE)
def normalize_answer(answer: str) -> str:
    """Normalise a predicted answer as RWSAN's script does, always, before comparing it with the annotators'. Not
    the training labels' step (`rwsan.processing_rwsan.normalize_answer`, the original's `prep_ans`), which keeps
    tabs and newlines as they are while it strips punctuation."""
    single_line = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(normalize_punctuation(single_line))


def normalize_gt_answers(gt_answers: Sequence[str]) -> list[str]:
    """Normalise one question's annotator answers as RWSAN's script does: the punctuation step only, and only when
    the annotators disagree (the current official script differs: see the module docstring)."""
    if len(set(gt_answers)) > 1:
        return [_cached_punctuation(answer) for answer in gt_answers]
    return list(gt_answers)


def _leave_one_out_accuracy(
    normalized_prediction: str,
    normalized_gt_answers: list[str],
    identical_entries: Sequence[int] | None = None,
) -> float:
    """Mean over annotators of min(1, matching answers among the others / 3), summed in the official order.

    The official code leaves out every annotation entry *equal* to the current one (whole dicts compared), not
    just the current one. `identical_entries[i]` counts the entries equal to entry i, itself included; None
    means all entries differ, as in real annotations where each carries its own answer_id.
    """
    total_matches = normalized_gt_answers.count(normalized_prediction)
    per_annotator = []
    for index, answer in enumerate(normalized_gt_answers):
        left_out = 0
        if answer == normalized_prediction:
            left_out = 1 if identical_entries is None else identical_entries[index]
        per_annotator.append(min(1.0, (total_matches - left_out) / _FULL_CREDIT_MATCHES))
    return sum(per_annotator) / len(per_annotator)


def _as_answer_list(gt_answers: Any, where: str) -> list[str]:
    if isinstance(gt_answers, str) or not isinstance(gt_answers, Iterable):
        raise TypeError(f"{where}: ground-truth answers must be a list of strings, got {type(gt_answers).__name__}")
    answers = list(gt_answers)
    if not answers:
        raise ValueError(f"{where}: the list of ground-truth answers is empty")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"{where}: ground-truth answers must be strings, got {answer!r}")
    return answers


def _check_prediction(prediction: Any, where: str) -> None:
    if not isinstance(prediction, str):
        raise TypeError(f"{where}: the predicted answer must be a string, got {type(prediction).__name__}")


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy (0 to 1), as RWSAN's script computes it, of one predicted answer against the annotators'
    answers (usually ten).

    Each string counts as a different annotator, as every entry of the official annotations does.
    """
    _check_prediction(prediction, "vqa_accuracy")
    answers = _as_answer_list(gt_answers, "vqa_accuracy")
    return _leave_one_out_accuracy(normalize_answer(prediction), normalize_gt_answers(answers))


def _percent(accuracies: Sequence[float], precision: int) -> float:
    return round(100 * sum(accuracies) / len(accuracies), precision)


def _percent_by_group(groups: Iterable[str], accuracies: Sequence[float], precision: int) -> dict[str, float]:
    """Accuracy of each group, e.g. answer type, in order of first appearance like the official dicts."""
    accuracies_by_group: dict[str, list[float]] = {}
    for group, accuracy in zip(groups, accuracies):
        accuracies_by_group.setdefault(group, []).append(accuracy)
    return {group: _percent(scores, precision) for group, scores in accuracies_by_group.items()}


def compute_vqa_accuracy(
    predictions: Sequence[str],
    gt_answers: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
    precision: int = DEFAULT_PRECISION,
) -> dict[str, float]:
    """Overall and per-answer-type VQA accuracy of many predictions (as RWSAN's script computes it), in percent,
    for training loops.

    Returns `{"accuracy": ..., "accuracy_<answer type>": ...}` (e.g. `accuracy_yes/no`, `accuracy_number`,
    `accuracy_other`, in order of first appearance), equal to the official `overall` and `perAnswerType`
    numbers for the same questions.
    """
    for name, values in (("predictions", predictions), ("answer_types", answer_types)):
        if isinstance(values, str):
            # A string is a sequence too: each of its characters would count as one question's.
            raise TypeError(f"{name} must be a sequence of strings, one per question, not a string: {values!r}")
    if len(predictions) != len(gt_answers):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(gt_answers)} lists of ground-truth answers; "
            "they must be aligned one to one."
        )
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(f"Got {len(answer_types)} answer types for {len(predictions)} predictions.")
    if len(predictions) == 0:
        raise ValueError("Cannot compute an accuracy over zero predictions.")

    accuracies = []
    for index, (prediction, answers) in enumerate(zip(predictions, gt_answers)):
        where = f"question {index}"
        _check_prediction(prediction, where)
        normalized_answers = normalize_gt_answers(_as_answer_list(answers, where))
        accuracies.append(_leave_one_out_accuracy(normalize_answer(prediction), normalized_answers))

    results = {"accuracy": _percent(accuracies, precision)}
    if answer_types is not None:
        for answer_type, percent in _percent_by_group(answer_types, accuracies, precision).items():
            results[f"accuracy_{answer_type}"] = percent
    return results


def _example_ids(question_ids: Iterable[Any]) -> str:
    examples = sorted(question_ids, key=repr)[:_MAX_IDS_IN_ERRORS]
    return ", ".join(repr(question_id) for question_id in examples)


def _check_question_id(question_id: Any, where: str) -> None:
    # JSON true and false load as bools, which would match questions 1 and 0; lists and objects cannot be looked up.
    if isinstance(question_id, bool) or not isinstance(question_id, Hashable):
        raise ValueError(f"{where}: question_id {question_id!r} is not a question id")


def _index_predictions(predictions: Mapping[Any, str] | Sequence[Mapping[str, Any]]) -> dict[Any, str]:
    if isinstance(predictions, Mapping):
        indexed = dict(predictions)
        for question_id in indexed:
            _check_question_id(question_id, "A prediction")
    elif isinstance(predictions, Sequence) and not isinstance(predictions, str):
        indexed = {}
        for index, result in enumerate(predictions):
            if not isinstance(result, Mapping) or "question_id" not in result or "answer" not in result:
                raise ValueError(
                    f"Prediction {index} must be a dict with 'question_id' and 'answer' keys, got {result!r}"
                )
            _check_question_id(result["question_id"], f"Prediction {index}")
            if result["question_id"] in indexed:
                raise ValueError(f"Question id {result['question_id']!r} is predicted more than once.")
            indexed[result["question_id"]] = result["answer"]
    else:
        raise TypeError(
            "predictions must be a dict {question_id: answer} or a list of {'question_id', 'answer'} dicts, "
            f"got {type(predictions).__name__}"
        )
    for question_id, answer in indexed.items():
        _check_prediction(answer, f"question id {question_id!r}")
    return indexed


_ANNOTATION_KEYS = ("question_id", "question_type", "answer_type", "answers")


def _check_annotations(annotations: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(annotations, (Mapping, str)) or not isinstance(annotations, Sequence):
        raise TypeError(
            "annotations must be the list of annotation dicts (the 'annotations' entry of the official "
            f"annotation file), got {type(annotations).__name__}"
        )
    if len(annotations) == 0:
        raise ValueError("Cannot evaluate against an empty list of annotations.")
    seen_ids = set()
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, Mapping):
            raise ValueError(f"Annotation {index} must be a dict, got {annotation!r}")
        missing_keys = [key for key in _ANNOTATION_KEYS if key not in annotation]
        if missing_keys:
            raise ValueError(f"Annotation {index} lacks the key(s) {missing_keys}.")
        question_id = annotation["question_id"]
        _check_question_id(question_id, f"Annotation {index}")
        if question_id in seen_ids:
            raise ValueError(f"Question id {question_id!r} is annotated more than once.")
        seen_ids.add(question_id)
        for key in ("question_type", "answer_type"):
            # The official script groups by them, so null groups as any other value.
            if not (annotation[key] is None or isinstance(annotation[key], str)):
                raise ValueError(
                    f"Annotation of question id {question_id!r}: {key} must be a string or null, got "
                    f"{annotation[key]!r}"
                )
        answers = annotation["answers"]
        if isinstance(answers, (str, Mapping)) or not isinstance(answers, Sequence):
            raise ValueError(
                f"Annotation of question id {question_id!r}: answers must be a list of dicts with a string "
                f"'answer', got {type(answers).__name__}"
            )
        if len(answers) == 0:
            raise ValueError(f"Annotation of question id {question_id!r} has no answers.")
        for entry in answers:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("answer"), str):
                raise ValueError(
                    f"Annotation of question id {question_id!r}: each answer must be a dict with a string "
                    f"'answer', got {entry!r}"
                )


def _check_same_questions(predicted_ids: Iterable[Any], annotated_ids: Iterable[Any]) -> None:
    """The official script asserts that results and annotations cover exactly the same question ids."""
    predicted_ids, annotated_ids = set(predicted_ids), set(annotated_ids)
    unanswered = annotated_ids - predicted_ids
    unknown = predicted_ids - annotated_ids
    problems = []
    if unanswered:
        problems.append(f"{len(unanswered)} annotated question(s) have no prediction (e.g. {_example_ids(unanswered)})")
    if unknown:
        problems.append(
            f"{len(unknown)} prediction(s) are for question ids not in the annotations (e.g. {_example_ids(unknown)})"
        )
    if problems:
        raise ValueError(
            f"Predictions ({len(predicted_ids)} questions) do not match the annotations "
            f"({len(annotated_ids)} questions): {'; '.join(problems)}."
        )


def _check_multiple_choice(predictions: Mapping[Any, str], questions: Mapping[str, Any]) -> None:
    """With a multiple-choice question file, the official script requires each answer to be a choice."""
    if not isinstance(questions, Mapping) or not isinstance(questions.get("questions"), Sequence):
        raise ValueError("questions must be the official question file contents: a dict with a 'questions' list.")
    if questions.get("task_type") != "Multiple Choice":
        return
    choices_by_id = {}
    for index, question in enumerate(questions["questions"]):
        if not isinstance(question, Mapping) or "question_id" not in question:
            raise ValueError(f"questions[{index}] of the question file must be a dict with a 'question_id'.")
        _check_question_id(question["question_id"], f"questions[{index}] of the question file")
        choices_by_id[question["question_id"]] = question.get("multiple_choices", ())
    for question_id, answer in predictions.items():
        if question_id not in choices_by_id:
            raise ValueError(f"Question id {question_id!r} is missing from the question file.")
        if answer not in choices_by_id[question_id]:
            raise ValueError(f"Predicted answer {answer!r} for question id {question_id!r} is not one of its choices.")


def _identical_entry_counts(answer_entries: Sequence[Mapping[str, Any]], normalized_answers: list[str]) -> list[int]:
    # Compared after normalisation, as the official code rewrites the entries in place before comparing them.
    normalized_entries = [{**entry, "answer": answer} for entry, answer in zip(answer_entries, normalized_answers)]
    return [normalized_entries.count(entry) for entry in normalized_entries]


def evaluate_vqa_detailed(
    predictions: Mapping[Any, str] | Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    questions: Mapping[str, Any] | None = None,
    precision: int = DEFAULT_PRECISION,
) -> dict[str, dict]:
    """Everything the official `VQAEval` computes: `accuracy`, `evalQA`, `evalQuesType` and `evalAnsType`.

    Args:
        predictions: `{question_id: answer}`, or the official result-file list of
            `{"question_id": ..., "answer": ...}` dicts. It must cover exactly the annotated questions.
        annotations: the `annotations` list of an official annotation file (dicts with `question_id`,
            `question_type`, `answer_type` and `answers`, a list of `{"answer": ..., "answer_id": ...}`).
        questions: the official question file contents; only used, as by the official script, to check
            multiple-choice answers against their choices.
        precision: decimals kept by the rounding of every percentage.

    Returns:
        `accuracy` as `{"overall", "perQuestionType", "perAnswerType"}`, and the per-question accuracies
        `evalQA` (`{question_id: percent}`), `evalQuesType` and `evalAnsType`
        (`{type: {question_id: percent}}`), all in percent.
    """
    predicted_answers = _index_predictions(predictions)
    _check_annotations(annotations)
    _check_same_questions(predicted_answers, (annotation["question_id"] for annotation in annotations))
    if questions is not None:
        _check_multiple_choice(predicted_answers, questions)

    all_accuracies = []
    eval_qa: dict[Any, float] = {}
    eval_question_type: dict[str, dict[Any, float]] = {}
    eval_answer_type: dict[str, dict[Any, float]] = {}
    for annotation in annotations:
        question_id = annotation["question_id"]
        answer_entries = annotation["answers"]
        gt_answers = normalize_gt_answers([entry["answer"] for entry in answer_entries])
        accuracy = _leave_one_out_accuracy(
            normalize_answer(predicted_answers[question_id]),
            gt_answers,
            _identical_entry_counts(answer_entries, gt_answers),
        )
        percent = round(100 * accuracy, precision)
        all_accuracies.append(accuracy)
        eval_qa[question_id] = percent
        eval_question_type.setdefault(annotation["question_type"], {})[question_id] = percent
        eval_answer_type.setdefault(annotation["answer_type"], {})[question_id] = percent

    question_types = [annotation["question_type"] for annotation in annotations]
    answer_types = [annotation["answer_type"] for annotation in annotations]
    return {
        "accuracy": {
            "overall": _percent(all_accuracies, precision),
            "perQuestionType": _percent_by_group(question_types, all_accuracies, precision),
            "perAnswerType": _percent_by_group(answer_types, all_accuracies, precision),
        },
        "evalQA": eval_qa,
        "evalQuesType": eval_question_type,
        "evalAnsType": eval_answer_type,
    }


def evaluate_vqa(
    predictions: Mapping[Any, str] | Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    questions: Mapping[str, Any] | None = None,
    precision: int = DEFAULT_PRECISION,
) -> dict[str, Any]:
    """The official `accuracy` dict, `{"overall", "perQuestionType", "perAnswerType"}`, in percent.

    Arguments as for `evaluate_vqa_detailed`.
    """
    return evaluate_vqa_detailed(predictions, annotations, questions, precision)["accuracy"]
