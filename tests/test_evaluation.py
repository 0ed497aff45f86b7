"""Tests of the official VQA-v2 accuracy: rwsan.evaluation, the evaluate metric and the evaluation script."""

import copy
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import pytest

from rwsan.evaluation import (
    VQA_ACCURACY_METRIC,
    compute_vqa_accuracy,
    evaluate_vqa,
    evaluate_vqa_detailed,
    normalize_answer,
    normalize_gt_answers,
    normalize_punctuation,
    vqa_accuracy,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT_PATH = REPO_ROOT / "data_scripts" / "evaluate_predictions.py"
METRIC_PATH = REPO_ROOT / "rwsan" / "metrics" / "vqa_accuracy"
ORIGINAL_REPO = Path(os.environ.get("RWSAN_ORIGINAL_REPO", "/work/.mirror/BrightQin+RWSAN/repo"))
# The official code's outputs on the inputs below (see test_reference_file_is_what_the_official_code_gives).
OFFICIAL_REFERENCE = Path(__file__).resolve().parent / "data" / "official_vqa_eval.json"


def _answers(*answers):
    """Official annotation entries, one per annotator, each with its own answer_id as in VQA-v2."""
    return [
        {"answer": answer, "answer_confidence": "yes", "answer_id": index + 1} for index, answer in enumerate(answers)
    ]


def _annotation(question_id, question_type, answer_type, answers):
    return {
        "question_id": question_id,
        "image_id": question_id // 10,
        "question_type": question_type,
        "answer_type": answer_type,
        "answers": answers,
    }


# Hand-computed: "two" -> "2", agreed by 2 of 10 -> 0.6; "Yes" -> "yes", agreed by all -> 1.0;
# "green" -> 0.0; "red", agreed by 3 of 10 -> 0.9 (see test_vqa_accuracy_counts_the_other_annotators).
SMALL_ANNOTATIONS = [
    _annotation(11, "how many", "number", _answers("2", "2", *["3"] * 8)),
    _annotation(22, "is the", "yes/no", _answers(*["yes"] * 10)),
    _annotation(33, "what color", "other", _answers(*["red"] * 3, *["blue"] * 7)),
    _annotation(44, "what color", "other", _answers(*["red"] * 3, *["blue"] * 7)),
]
SMALL_PREDICTIONS = {11: "two", 22: "Yes", 33: "green", 44: "red"}
SMALL_RESULTS = [{"question_id": key, "answer": answer} for key, answer in SMALL_PREDICTIONS.items()]
SMALL_QUESTIONS = {
    "info": {},
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "data_subtype": "val2014",
    "license": {},
    "questions": [
        {"question_id": annotation["question_id"], "image_id": annotation["image_id"], "question": "?"}
        for annotation in SMALL_ANNOTATIONS
    ],
}
# overall: 100 * (0.6 + 1 + 0 + 0.9) / 4 = 62.5; "other": 100 * (0 + 0.9) / 2 = 45.
SMALL_ACCURACY = {
    "overall": 62.5,
    "perQuestionType": {"how many": 60.0, "is the": 100.0, "what color": 45.0},
    "perAnswerType": {"number": 60.0, "yes/no": 100.0, "other": 45.0},
}
# What the original train/execution.py prints for it.
SMALL_REPORT = (
    "\n\nOverall Accuracy is: 62.50\n\n"
    "Per Answer Type Accuracy is the following:\n"
    "number : 60.00\nyes/no : 100.00\nother : 45.00\n"
    "\n\n"
)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Two", "2"),  # lower-cased, then number words become digits
        ("none", "0"),
        ("no one", "no 1"),  # word by word, whatever the meaning
        ("The Dog", "dog"),  # articles dropped
        ("an apple a day", "apple day"),
        ("dont", "don't"),  # contractions regain their apostrophe
        ("whats up?", "what's up"),  # "?" touches no space, so it becomes one; split() drops it
        ("Im", "im"),  # the official table's capitalised keys never match lower-cased words
        ("somebody'd", "somebodyd"),  # the official table maps this one backwards
        ("  Yes\n", "yes"),
        # Stripped before the punctuation step: a trailing mark then touches no space and becomes one.
        ("x-y-\n", "x y"),
        ("a/b/ ", "b"),
        ("left\tside", "left side"),
        ("t-shirt", "t shirt"),  # a mark touching no space becomes a space
        ("x - ray", "x ray"),  # a mark touching a space is deleted
        ("red, white", "red white"),
        ("1,000", "1000"),  # a digit-comma-digit group deletes every mark...
        ("(3,5) a-b", "35 ab"),  # ...anywhere in the answer
        ("3.5", "3.5"),  # a period stays only before a digit
        ("2.", "2"),
        ("one.two", "onetwo"),  # and is deleted, not turned into a space
        ("mr. smith", "mr smith"),
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods are deleted
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("", ""),
    ],
)
def test_normalize_answer_worked_examples(answer, expected):
    assert normalize_answer(answer) == expected


def test_gt_answers_get_punctuation_only_and_only_when_annotators_disagree():
    assert normalize_gt_answers(["T-Shirt"] * 10) == ["T-Shirt"] * 10
    assert normalize_gt_answers(["T-Shirt", "the shirt", "Two"]) == ["T Shirt", "the shirt", "Two"]
    assert normalize_punctuation("Two, 1.5 Dogs.") == "Two 1.5 Dogs"


def test_vqa_accuracy_counts_the_other_annotators():
    # With k of the 10 annotators agreeing, each of those k sees k - 1 matches among the other nine and each
    # of the 10 - k others sees k, and an annotator gives min(1, matches / 3):
    #   k = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3
    #   k = 2: (2 * 1/3 + 8 * 2/3) / 10 = 6 / 10 = 0.6
    #   k = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9
    #   k = 4: (4 * 1 + 6 * 1) / 10 = 1.0
    for agreeing, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        gt_answers = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
        assert vqa_accuracy("cat", gt_answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_the_prediction_but_not_unanimous_ground_truth():
    assert vqa_accuracy("Two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    # Ten identical answers are compared verbatim, so a normalised prediction cannot match "T-Shirt".
    assert vqa_accuracy("T-Shirt", ["T-Shirt"] * 10) == 0.0
    # Disagreeing answers only get the punctuation step: "t-shirt" -> "t shirt", as the prediction.
    assert vqa_accuracy("T-Shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0


def test_ground_truth_answers_keep_number_words_and_articles_as_in_rwsans_script():
    """RWSAN's script predates GT-Vision-Lab/VQA's "Fixed processing answers bug", after which both examples score
    100: the current script turns "two" into "2" and "a dog" into "dog" in the annotators' answers too."""
    assert compute_vqa_accuracy(["2", "dog"], [["2"] * 2 + ["two"] * 8, ["dog"] * 2 + ["a dog"] * 8]) == {
        "accuracy": 60.0
    }


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ("yes", [["yes"] * 10] * 3),
            "predictions must be a sequence of strings, one per question, not a string: 'yes'",
        ),
        ((["yes"] * 3, [["yes"] * 10] * 3, "abc"), "answer_types must be a sequence of strings, one per question, "),
    ],
)
def test_a_string_is_not_taken_for_one_answer_per_character(arguments, message):
    with pytest.raises(TypeError, match=f"^{re.escape(message)}"):
        compute_vqa_accuracy(*arguments)


def test_compute_vqa_accuracy_overall_and_per_answer_type():
    predictions = [SMALL_PREDICTIONS[annotation["question_id"]] for annotation in SMALL_ANNOTATIONS]
    gt_answers = [[entry["answer"] for entry in annotation["answers"]] for annotation in SMALL_ANNOTATIONS]
    answer_types = [annotation["answer_type"] for annotation in SMALL_ANNOTATIONS]
    assert compute_vqa_accuracy(predictions, gt_answers, answer_types) == {
        "accuracy": 62.5,
        "accuracy_number": 60.0,
        "accuracy_yes/no": 100.0,
        "accuracy_other": 45.0,
    }
    # 100 * (0.6 + 1 + 0 + 0.9) / 4 = 62.5, and to 0 decimals 100 * 1.6 / 2 = 80 for the first two.
    assert compute_vqa_accuracy(predictions[:2], gt_answers[:2], precision=0) == {"accuracy": 80.0}


def test_compute_vqa_accuracy_rounds_to_the_precision_asked_for():
    """Not 2 decimals whatever the precision (33.33 for precision 0): no test told them apart before."""
    predictions, gt_answers = ["yes", "no", "no"], [["yes"] * 10] * 3
    # 100 * 1 / 3 = 33.333...
    assert compute_vqa_accuracy(predictions, gt_answers, precision=0) == {"accuracy": 33.0}
    assert compute_vqa_accuracy(predictions, gt_answers, precision=1) == {"accuracy": 33.3}
    assert compute_vqa_accuracy(predictions, gt_answers) == {"accuracy": 33.33}


@pytest.mark.parametrize("precision, percent", [(0, 53.0), (1, 53.3), (2, 53.33)])
def test_evaluate_vqa_detailed_rounds_every_percentage_to_the_precision_asked_for(precision, percent):
    """The per-question accuracies (evalQA, evalQuesType, evalAnsType) too, not only the overall ones: no test
    told them from 2 decimals before."""
    # Two identical "red" entries and eight "blue": (2 * 0 + 8 * 2/3) / 10 = 0.5333 (see
    # test_evaluate_vqa_leaves_out_every_identical_answer_entry).
    answers = [{"answer": "red"}] * 2 + [{"answer": "blue"}] * 8
    detailed = evaluate_vqa_detailed({1: "red"}, [_annotation(1, "what color", "other", answers)], precision=precision)
    assert detailed == {
        "accuracy": {
            "overall": percent,
            "perQuestionType": {"what color": percent},
            "perAnswerType": {"other": percent},
        },
        "evalQA": {1: percent},
        "evalQuesType": {"what color": {1: percent}},
        "evalAnsType": {"other": {1: percent}},
    }


def test_evaluate_vqa_matches_hand_computed_values_for_both_prediction_formats():
    annotations = copy.deepcopy(SMALL_ANNOTATIONS)
    assert evaluate_vqa(SMALL_PREDICTIONS, annotations) == SMALL_ACCURACY
    assert evaluate_vqa(SMALL_RESULTS, annotations, SMALL_QUESTIONS) == SMALL_ACCURACY
    assert annotations == SMALL_ANNOTATIONS, "the annotations must not be modified"

    detailed = evaluate_vqa_detailed(SMALL_PREDICTIONS, annotations)
    assert detailed["evalQA"] == {11: 60.0, 22: 100.0, 33: 0.0, 44: 90.0}
    assert detailed["evalQuesType"]["what color"] == {33: 0.0, 44: 90.0}
    assert detailed["evalAnsType"]["number"] == {11: 60.0}


def test_evaluate_vqa_leaves_out_every_identical_answer_entry():
    # Entries without answer_id can be identical dicts; like the official script, all copies of the current
    # entry are left out. With two identical "red" entries and eight "blue": a "red" annotator sees 0 matching
    # answers among the rest and a "blue" one sees 2, so (2 * 0 + 8 * 2/3) / 10 = 0.5333 instead of 0.6.
    answers = [{"answer": "red"}] * 2 + [{"answer": "blue"}] * 8
    accuracy = evaluate_vqa({1: "red"}, [_annotation(1, "what color", "other", answers)])
    assert accuracy["overall"] == 53.33


def test_evaluate_vqa_names_missing_and_unknown_question_ids():
    predictions = {22: "yes", 44: "red", 98: "no", 99: "no"}
    message = (
        "Predictions (4 questions) do not match the annotations (4 questions): "
        "2 annotated question(s) have no prediction (e.g. 11, 33); "
        "2 prediction(s) are for question ids not in the annotations (e.g. 98, 99)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate_vqa(predictions, SMALL_ANNOTATIONS)


@pytest.mark.parametrize(
    ("predictions", "annotations", "error", "message"),
    [
        (SMALL_RESULTS[:1] * 2, SMALL_ANNOTATIONS[:1], ValueError, "id 11 is predicted more than once"),
        ([{"question_id": 11}], SMALL_ANNOTATIONS[:1], ValueError, "Prediction 0 must be a dict with"),
        ({11: 2}, SMALL_ANNOTATIONS[:1], TypeError, "question id 11: the predicted answer must be a string"),
        ("2", SMALL_ANNOTATIONS[:1], TypeError, "predictions must be a dict"),
        ({11: "2"}, SMALL_ANNOTATIONS[:1] * 2, ValueError, "Question id 11 is annotated more than once"),
        ({11: "2"}, [], ValueError, "empty list of annotations"),
        ({11: "2"}, {"annotations": SMALL_ANNOTATIONS[:1]}, TypeError, "annotations must be the list"),
        ({1: "2"}, [{"question_id": 1, "answers": []}], ValueError, r"Annotation 0 lacks the key\(s\)"),
        ({1: "2"}, [3], ValueError, "Annotation 0 must be a dict, got 3"),
        ({1: "2"}, [_annotation(1, "what", "other", [])], ValueError, "question id 1 has no answers"),
        (
            {1: "2"},
            [_annotation(1, "what", "other", {"answer": "2"})],
            ValueError,
            "question id 1: answers must be a list of dicts with a string 'answer', got dict",
        ),
        (
            {1: "2"},
            [_annotation(1, "what", ["other"], [{"answer": "2"}])],
            ValueError,
            r"question id 1: answer_type must be a string or null, got \['other'\]",
        ),
        (
            [{"question_id": [11], "answer": "2"}],
            SMALL_ANNOTATIONS[:1],
            ValueError,
            r"^Prediction 0: question_id \[11\] is not a question id",
        ),
        ({True: "2"}, SMALL_ANNOTATIONS[:1], ValueError, "^A prediction: question_id True is not a question id"),
        (
            {11: "2"},
            [{**SMALL_ANNOTATIONS[0], "question_id": [11]}],
            ValueError,
            r"^Annotation 0: question_id \[11\] is not a question id",
        ),
    ],
)
def test_evaluate_vqa_rejects_bad_input(predictions, annotations, error, message):
    with pytest.raises(error, match=message):
        evaluate_vqa(predictions, annotations)


def test_evaluate_vqa_checks_multiple_choice_answers():
    questions = {
        "task_type": "Multiple Choice",
        "questions": [{"question_id": 11, "multiple_choices": ["2", "3"]}],
    }
    assert evaluate_vqa({11: "2"}, SMALL_ANNOTATIONS[:1], questions)["overall"] == 60.0
    with pytest.raises(ValueError, match="answer 'two' for question id 11 is not one of its choices"):
        evaluate_vqa({11: "two"}, SMALL_ANNOTATIONS[:1], questions)
    with pytest.raises(ValueError, match="a dict with a 'questions' list"):
        evaluate_vqa({11: "2"}, SMALL_ANNOTATIONS[:1], {"task_type": "Open-Ended"})
    without_id = {"task_type": "Multiple Choice", "questions": [{"multiple_choices": ["2"]}]}
    with pytest.raises(ValueError, match=r"questions\[0\] of the question file must be a dict with a 'question_id'"):
        evaluate_vqa({11: "2"}, SMALL_ANNOTATIONS[:1], without_id)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((["a", "b"], [["a"]]), ValueError, "Got 2 predictions but 1 lists of ground-truth answers"),
        ((["a"], [["a"]], ["x", "y"]), ValueError, "Got 2 answer types for 1 predictions"),
        (([], []), ValueError, "zero predictions"),
        ((["a"], ["a"]), TypeError, "question 0: ground-truth answers must be a list of strings, got str"),
        ((["a", "b"], [["a"], []]), ValueError, "question 1: the list of ground-truth answers is empty"),
        ((["a"], [[1]]), TypeError, "question 0: ground-truth answers must be strings, got 1"),
        (([None], [["a"]]), TypeError, "question 0: the predicted answer must be a string, got NoneType"),
    ],
)
def test_compute_vqa_accuracy_rejects_bad_input(arguments, error, message):
    with pytest.raises(error, match=message):
        compute_vqa_accuracy(*arguments)


# --- the evaluate metric ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa_accuracy_metric():
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def test_the_package_names_its_metric_folder_for_any_working_directory(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    assert Path(VQA_ACCURACY_METRIC) == METRIC_PATH
    monkeypatch.chdir(tmp_path)
    metric = evaluate.load(VQA_ACCURACY_METRIC, keep_in_memory=True)
    assert metric.compute(predictions=["yes"], references=[["yes"] * 10]) == {"accuracy": 100.0}


def test_the_wheel_holds_the_metric_and_its_readme(tmp_path):
    """The metric's folder is no Python package: setuptools once took it for data to be left out in a later
    release, and the README, its worked example, was not installed at all."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "rwsan", source / "rwsan", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "wheel", "."],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    assert "Package would be ignored" not in built.stdout + built.stderr
    (wheel,) = (source / "wheel").glob("rwsan-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    metric_folder = METRIC_PATH.relative_to(REPO_ROOT).as_posix()
    assert {f"{metric_folder}/vqa_accuracy.py", f"{metric_folder}/README.md", "rwsan/modeling_rwsan.py"} <= names


def test_evaluate_metric_loads_from_its_folder_and_matches(vqa_accuracy_metric):
    references = [["2", "2"] + ["3"] * 8, ["yes"] * 10]
    predictions = ["two", "yes"]
    assert vqa_accuracy_metric.compute(predictions=predictions, references=references) == {"accuracy": 80.0}
    assert vqa_accuracy_metric.compute(
        predictions=predictions, references=references, answer_types=["number", "yes/no"]
    ) == {"accuracy": 80.0, "accuracy_number": 60.0, "accuracy_yes/no": 100.0}

    vqa_accuracy_metric.add_batch(predictions=["two"], references=references[:1])
    vqa_accuracy_metric.add_batch(predictions=["no"], references=references[1:])
    assert vqa_accuracy_metric.compute(answer_types=["number", "yes/no"]) == {
        "accuracy": 30.0,
        "accuracy_number": 60.0,
        "accuracy_yes/no": 0.0,
    }


def test_evaluate_metric_rounds_to_two_decimals_as_the_official_script(vqa_accuracy_metric):
    # One question in three answered: 33.333... percent, 33.33 as the official script reports it.
    references = [["yes"] * 10] * 3
    assert vqa_accuracy_metric.compute(predictions=["yes", "no", "no"], references=references) == {"accuracy": 33.33}


def test_evaluate_metric_rejects_a_string_reference(vqa_accuracy_metric):
    with pytest.raises(ValueError, match="Got a string but expected a list instead"):
        vqa_accuracy_metric.compute(predictions=["two"], references=["2"])


# --- the evaluation script ----------------------------------------------------------------------------------


def _write_json(path, content):
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def small_files(tmp_path):
    return {
        "predictions": _write_json(tmp_path / "result.json", SMALL_RESULTS),
        "questions": _write_json(tmp_path / "questions.json", SMALL_QUESTIONS),
        "annotations": _write_json(tmp_path / "annotations.json", {"annotations": SMALL_ANNOTATIONS}),
    }


def _arguments(files):
    return [f"--{name}={path}" for name, path in files.items()]


@pytest.fixture(scope="module")
def evaluation_script():
    """The script imported from its path, for checking its errors without a subprocess per case."""
    spec = importlib.util.spec_from_file_location("evaluate_predictions", SCRIPT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_prints_the_original_report_and_writes_the_accuracy_json(small_files, tmp_path):
    json_path = tmp_path / "accuracy.json"
    command = [sys.executable, "data_scripts/evaluate_predictions.py", *_arguments(small_files)]
    completed = subprocess.run(
        [*command, "--json", str(json_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == SMALL_REPORT
    assert json.loads(json_path.read_text()) == SMALL_ACCURACY


def test_script_errors_name_the_file(evaluation_script, small_files, tmp_path):
    def error_of(files, *extra):
        with pytest.raises(SystemExit) as raised:
            evaluation_script.main([*_arguments(files), *extra])
        return str(raised.value.code)

    missing = tmp_path / "missing.json"
    assert error_of({**small_files, "predictions": missing}) == (f"error: predictions file not found: {missing}")

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert error_of({**small_files, "annotations": broken}).startswith(
        f"error: annotations file {broken} is not valid JSON: Expecting property name"
    )

    not_text = tmp_path / "not_text.json"
    not_text.write_bytes(b"\xff\xfe[]")
    assert error_of({**small_files, "predictions": not_text}).startswith(
        f"error: predictions file {not_text} is not UTF-8 text (JSON): 'utf-8' codec can't decode byte 0xff"
    )

    as_dict = _write_json(tmp_path / "as_dict.json", SMALL_PREDICTIONS)
    assert error_of({**small_files, "predictions": as_dict}) == (
        f"error: {as_dict} is not a VQA result file: expected a list of objects"
    )

    no_annotations = _write_json(tmp_path / "no_annotations.json", {"questions": []})
    assert error_of({**small_files, "annotations": no_annotations}) == (
        f"error: {no_annotations} is not a VQA annotation file: expected an object with an 'annotations' list"
    )

    partial = _write_json(tmp_path / "partial.json", [{"question_id": 11, "answer": "2"}])
    assert error_of({**small_files, "predictions": partial}) == (
        "error: the predictions answer 1 of the 4 annotated questions: give --answered_only to score those (a split "
        "prepared with --allow_incomplete_eval_splits lacks the questions of images without features), or answer "
        "them all"
    )
    # Another split's question file was taken without a word: only multiple-choice files are read for more.
    other_split = _write_json(tmp_path / "other_split.json", {"questions": [{"question_id": 11}, {"question_id": 99}]})
    assert error_of({**small_files, "questions": other_split}) == (
        f"error: {other_split} lacks 3 of the 4 annotated questions of {small_files['annotations']}: the question "
        "file of another split?"
    )

    unwritable = tmp_path / "no_such_folder" / "accuracy.json"
    assert error_of(small_files, "--json", str(unwritable)).startswith(
        f"error: cannot write the accuracy file {unwritable}"
    )


def test_script_errors_name_what_the_official_loader_would_trip_on(evaluation_script, small_files, tmp_path):
    """A question file of another shape, an unreadable path, and a prediction that is no string each end in one
    error line naming what is wrong, not in a traceback."""

    def error_of(files):
        with pytest.raises(SystemExit) as raised:
            evaluation_script.main(_arguments(files))
        return str(raised.value.code)

    annotations_as_questions = small_files["annotations"]
    assert error_of({**small_files, "questions": annotations_as_questions}) == (
        f"error: {annotations_as_questions} is not a VQA question file: expected an object with a 'questions' list"
    )
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert error_of({**small_files, "questions": folder}) == (
        f"error: cannot read the questions file {folder}: Is a directory"
    )
    # The question file's check must leave a malformed id for the evaluation to name, not fail on hashing it.
    listed_id = _write_json(
        tmp_path / "listed_id.json", {"annotations": [{**SMALL_ANNOTATIONS[0], "question_id": [11]}]}
    )
    assert error_of({**small_files, "annotations": listed_id}) == (
        "error: Annotation 0: question_id [11] is not a question id"
    )
    number = _write_json(tmp_path / "number.json", [*SMALL_RESULTS[1:], {"question_id": 11, "answer": 2}])
    assert error_of({**small_files, "predictions": number}) == (
        "error: question id 11: the predicted answer must be a string, got int"
    )


def test_script_writes_the_accuracy_json_indented_and_ends_it_with_a_newline(evaluation_script, small_files, tmp_path):
    json_path = tmp_path / "accuracy.json"
    # An earlier accuracy file is written over.
    json_path.write_text(json.dumps({"overall": 1.0, "perQuestionType": {}, "perAnswerType": {}}))
    assert evaluation_script.main([*_arguments(small_files), "--json", str(json_path)]) == 0
    assert json_path.read_text() == json.dumps(SMALL_ACCURACY, indent=2) + "\n"


def test_script_refuses_to_write_the_accuracy_over_another_file(evaluation_script, small_files, tmp_path, capsys):
    """A mistyped --json could name a model's config.json, which the accuracy replaced."""
    config = _write_json(tmp_path / "config.json", {"model_type": "rwsan"})
    with pytest.raises(SystemExit) as raised:
        evaluation_script.main([*_arguments(small_files), "--json", str(config)])
    assert raised.value.code == 2
    assert f"--json {config} exists and is no accuracy file, which would replace it" in capsys.readouterr().err
    assert json.loads(config.read_text()) == {"model_type": "rwsan"}


def test_script_scores_the_answered_questions_alone_when_told(evaluation_script, small_files, tmp_path, capsys):
    """A split prepared with --allow_incomplete_eval_splits lacks the questions of images without features; their
    predictions are scored as the questions they answer."""
    answered = [result for result in SMALL_RESULTS if result["question_id"] != 44]
    partial = _write_json(tmp_path / "partial.json", answered)
    assert evaluation_script.main([*_arguments({**small_files, "predictions": partial}), "--answered_only"]) == 0
    printed = capsys.readouterr().out
    assert "Scoring the 3 of the 4 annotated questions that the predictions answer" in printed
    annotations = [entry for entry in SMALL_ANNOTATIONS if entry["question_id"] != 44]
    expected = evaluate_vqa(answered, annotations)["overall"]
    assert f"Overall Accuracy is: {expected:.02f}" in printed
    assert expected != SMALL_ACCURACY["overall"]


def test_script_with_an_existing_json_file_still_names_a_missing_input(evaluation_script, small_files, tmp_path):
    """The check that --json is no input compares it with each input file that exists: a missing one is reported as
    missing, not as a FileNotFoundError traceback from that check."""
    json_path = tmp_path / "accuracy.json"
    json_path.write_text(json.dumps(SMALL_ACCURACY))
    missing = tmp_path / "missing.json"
    with pytest.raises(SystemExit) as raised:
        evaluation_script.main([*_arguments({**small_files, "predictions": missing}), "--json", str(json_path)])
    assert raised.value.code == f"error: predictions file not found: {missing}"
    assert json_path.read_text() == json.dumps(SMALL_ACCURACY)


@pytest.mark.parametrize("option", ["predictions", "questions", "annotations"])
def test_script_refuses_to_write_the_accuracy_over_an_input(evaluation_script, small_files, capsys, option):
    kept = small_files[option].read_text()
    with pytest.raises(SystemExit) as raised:
        evaluation_script.main([*_arguments(small_files), "--json", str(small_files[option])])
    assert raised.value.code == 2
    assert f"--json {small_files[option]} is the --{option} file, which the accuracy would overwrite" in (
        capsys.readouterr().err
    )
    assert small_files[option].read_text() == kept


def test_script_main_returns_zero(evaluation_script, small_files, capsys):
    assert evaluation_script.main(_arguments(small_files)) == 0
    assert capsys.readouterr().out == SMALL_REPORT


# --- cross-check against the official code from the original repository -------------------------------------


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The original utils/vqa.py and utils/vqaEval.py, imported from the mirror of the original repository."""
    if shutil.which("git") is None or not ORIGINAL_REPO.exists():
        pytest.skip("the original RWSAN repository (or git) is not available")
    folder = tmp_path_factory.mktemp("official")
    modules = {}
    for name in ("vqa", "vqaEval"):
        source = subprocess.run(
            ["git", "-C", str(ORIGINAL_REPO), "show", f"HEAD:utils/{name}.py"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        path = folder / f"official_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"official_{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and datetime.utcnow in the old code
            spec.loader.exec_module(modules[name])
    return types.SimpleNamespace(VQA=modules["vqa"].VQA, VQAEval=modules["vqaEval"].VQAEval)


TRICKY_ANSWERS = [
    "yes", "Yes", "no", "two", "2", "2.", "none", "0", "ten", "10", "the dog", "a dog", "dog", "dogs",
    "t-shirt", "T-Shirt", "t shirt", "1,000", "1000", "1,000 feet", "3.5", "3.50", ".5", "dont", "don't",
    "Im", "somebody'd", "red, white", "red white", "mr. smith", "mr smith", "x - ray", "(left)", "left",
    "what?", "50/50", "on the table.", "on table", "yes!", "  yes ", "yes\n", "an apple", "it's", "its",
    "a-b,c 1,2", "...", "@home", "c++", "a_b", "[1]", "{x}", "\"quoted\"", "back\\slash", "x<y>z", "`tick`",
]  # fmt: skip
_SEPARATORS = ["", "", " ", "  ", "\t", "\n", ".", ",", "-", " - ", ", ", "'"]


def _tricky_strings(count, seed):
    generator = random.Random(seed)
    strings = []
    for _ in range(count):
        pieces = generator.choices(TRICKY_ANSWERS, k=generator.randint(1, 4))
        text = pieces[0]
        for piece in pieces[1:]:
            text += generator.choice(_SEPARATORS) + piece
        strings.append(text)
    return strings


def _synthetic_vqa(seed, num_questions) -> dict:
    """Questions mixing unanimous and split annotators, answer types and tricky answers, as `[question id, question
    type, answer type, the ten answers]`, and a prediction for each as `[question id, answer]`, shuffled."""
    generator = random.Random(seed)
    question_types = ["how many", "is the", "what color", "what is", "where"]
    answer_types = ["number", "yes/no", "other"]
    question_ids = generator.sample(range(1, 10**7), num_questions)
    questions, predictions = [], []
    for question_id in question_ids:
        candidates = generator.sample(TRICKY_ANSWERS, 3)
        if generator.random() < 0.25:
            gt_answers = [candidates[0]] * 10
        else:
            gt_answers = generator.choices(candidates, weights=[5, 3, 2], k=10)
        question_type = generator.choice(question_types)
        questions.append([question_id, question_type, generator.choice(answer_types), gt_answers])
        predictions.append([question_id, generator.choice(candidates + _tricky_strings(1, seed=question_id))])
    generator.shuffle(predictions)
    return {"questions": questions, "predictions": predictions}


def _annotations_and_results(synthetic: dict, distinct_entries: bool) -> tuple[list[dict], list[dict]]:
    """`_synthetic_vqa`'s questions in the official annotation format, with or without answer ids (without, identical
    entries occur, which the official leave-one-out removes together), and its predictions as results."""
    annotations = []
    for question_id, question_type, answer_type, gt_answers in synthetic["questions"]:
        if distinct_entries:
            answers = _answers(*gt_answers)
        else:
            answers = [{"answer": answer, "answer_confidence": "yes"} for answer in gt_answers]
        annotations.append(_annotation(question_id, question_type, answer_type, answers))
    results = [{"question_id": question_id, "answer": answer} for question_id, answer in synthetic["predictions"]]
    return annotations, results


def _run_official(official, folder, annotations, results):
    questions = {**SMALL_QUESTIONS, "questions": [{"question_id": a["question_id"]} for a in annotations]}
    annotation_file = _write_json(folder / "annotations.json", {"annotations": annotations})
    question_file = _write_json(folder / "questions.json", questions)
    result_file = _write_json(folder / "results.json", results)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vqa = official.VQA(str(annotation_file), str(question_file))
        official_eval = official.VQAEval(vqa, vqa.loadRes(str(result_file), str(question_file)), n=2)
        official_eval.evaluate()
    return official_eval


def _normalisation_texts(official_eval) -> list[str]:
    contraction_keys = list(official_eval.contractions)
    return (
        TRICKY_ANSWERS
        + _tricky_strings(2000, seed=0)
        + contraction_keys
        + [key.capitalize() for key in contraction_keys]
        + [f"the {word}, {word}." for word in official_eval.manualMap]
        + ["." * 40 + "x", "a." * 40 + "5"]
    )


def _official_reference(official, folder: Path) -> dict:
    """What the official code gives: each text's answer normalisation (the steps its evaluate() applies to a
    prediction) and punctuation step, and the evaluation of two synthetic sets, with those sets."""
    official_eval = official.VQAEval(types.SimpleNamespace(getQuesIds=list), None)
    normalisation = []
    for text in _normalisation_texts(official_eval):
        single_line = text.replace("\n", " ").replace("\t", " ").strip()
        answer = official_eval.processDigitArticle(official_eval.processPunctuation(single_line))
        normalisation.append([text, answer, official_eval.processPunctuation(text)])
    synthetic = _synthetic_vqa(seed=0, num_questions=400)
    evaluations = {}
    for distinct_entries in (True, False):
        annotations, results = _annotations_and_results(synthetic, distinct_entries)
        evaluated = _run_official(official, folder, annotations, results)
        names = ("accuracy", "evalQA", "evalQuesType", "evalAnsType")
        evaluations[str(distinct_entries)] = {name: getattr(evaluated, name) for name in names}
    # Through JSON, as the committed file holds it (question ids as keys become strings).
    return json.loads(json.dumps({"normalisation": normalisation, "synthetic": synthetic, "evaluations": evaluations}))


def test_reference_file_is_what_the_official_code_gives(official, tmp_path):
    """The committed reference, which the tests below check against where the original repository is absent (as
    in CI), is the official code's output. `RWSAN_WRITE_OFFICIAL_REFERENCE=1` writes it afresh."""
    reference = _official_reference(official, tmp_path)
    if os.environ.get("RWSAN_WRITE_OFFICIAL_REFERENCE") == "1":
        OFFICIAL_REFERENCE.write_text(json.dumps(reference, separators=(",", ":")) + "\n")
    assert json.loads(OFFICIAL_REFERENCE.read_text()) == reference


@pytest.fixture(scope="module")
def official_reference() -> dict:
    return json.loads(OFFICIAL_REFERENCE.read_text())


def test_normalisation_matches_the_official_code(official_reference):
    for text, answer, punctuation_only in official_reference["normalisation"]:
        assert normalize_answer(text) == answer, repr(text)
        assert normalize_punctuation(text) == punctuation_only, repr(text)


@pytest.mark.parametrize("distinct_entries", [True, False])
def test_evaluation_matches_the_official_code(official_reference, distinct_entries):
    official = official_reference["evaluations"][str(distinct_entries)]
    annotations, results = _annotations_and_results(official_reference["synthetic"], distinct_entries)
    detailed = json.loads(json.dumps(evaluate_vqa_detailed(results, annotations)))
    assert detailed["accuracy"] == official["accuracy"]
    assert list(detailed["accuracy"]["perQuestionType"]) == list(official["accuracy"]["perQuestionType"])
    assert detailed["evalQA"] == official["evalQA"]
    assert detailed["evalQuesType"] == official["evalQuesType"]
    assert detailed["evalAnsType"] == official["evalAnsType"]

    if distinct_entries:
        answer_by_id = {result["question_id"]: result["answer"] for result in results}
        training_accuracy = compute_vqa_accuracy(
            [answer_by_id[annotation["question_id"]] for annotation in annotations],
            [[entry["answer"] for entry in annotation["answers"]] for annotation in annotations],
            [annotation["answer_type"] for annotation in annotations],
        )
        assert training_accuracy == {
            "accuracy": official["accuracy"]["overall"],
            **{f"accuracy_{name}": value for name, value in official["accuracy"]["perAnswerType"].items()},
        }
