"""Score a VQA-v2 result file with the VQA accuracy of RWSAN's evaluation script (the VQA API's vqaEval.py before
GT-Vision-Lab/VQA's commit a013f00) and print it as the original RWSAN code does.

    python data_scripts/evaluate_predictions.py --predictions result.json \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json [--json accuracy.json]

The result file is in the evaluation server's format, a list of `{"question_id": ..., "answer": ...}`; it must answer
exactly the annotated questions, or, with `--answered_only`, some of them (a split prepared with
`--allow_incomplete_eval_splits` lacks the questions of images without features). With `--json`, the script's
accuracy dict (`overall`, `perQuestionType`, `perAnswerType`, in percent) is written there too.
"""

import argparse
import json
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from rwsan.evaluation import evaluate_vqa

ACCURACY_KEYS = ("overall", "perQuestionType", "perAnswerType")


def _load_json(path: Path, description: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{description} file not found: {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read the {description} file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{description} file {path} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{description} file {path} is not UTF-8 text (JSON): {error}") from None


def _require(condition: bool, path: Path, expected: str) -> None:
    if not condition:
        raise ValueError(f"{path} is not a VQA {expected}")


def print_accuracy_report(accuracy: dict[str, Any]) -> None:
    """Print the lines the original `train/execution.py` prints after its evaluation."""
    print("\n")
    print(f"Overall Accuracy is: {accuracy['overall']:.02f}\n")
    print("Per Answer Type Accuracy is the following:")
    for answer_type, value in accuracy["perAnswerType"].items():
        print(f"{answer_type} : {value:.02f}")
    print("\n")


def _is_accuracy_file(path: Path) -> bool:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.keys() == set(ACCURACY_KEYS)


def _question_ids(entries: list) -> set:
    # Malformed entries and ids are named by the evaluation itself.
    return {
        entry.get("question_id")
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("question_id"), Hashable)
    }


def _write_json(path: Path, content: Any) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2)
            handle.write("\n")
    except OSError as error:
        raise ValueError(f"cannot write the accuracy file {path}: {error.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--predictions", type=Path, required=True, help="result file, in the evaluation server's format"
    )
    parser.add_argument("--questions", type=Path, required=True, help="VQA-v2 question file")
    parser.add_argument("--annotations", type=Path, required=True, help="VQA-v2 annotation file")
    parser.add_argument(
        "--json", type=Path, help="also write the accuracy dict (overall, perQuestionType, perAnswerType) to this file"
    )
    parser.add_argument(
        "--answered_only",
        action="store_true",
        help="score only the annotated questions the predictions answer (a split prepared with "
        "--allow_incomplete_eval_splits lacks those of images without features); says how many",
    )
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists():
        for option in ("predictions", "questions", "annotations"):
            given = getattr(args, option)
            if given.exists() and args.json.samefile(given):
                parser.error(f"--json {args.json} is the --{option} file, which the accuracy would overwrite")
        # A mistyped path could name a model's config.json.
        if args.json.is_file() and args.json.stat().st_size > 0 and not _is_accuracy_file(args.json):
            parser.error(
                f"--json {args.json} exists and is no accuracy file, which would replace it; name another file"
            )

    try:
        predictions = _load_json(args.predictions, "predictions")
        questions = _load_json(args.questions, "questions")
        annotations = _load_json(args.annotations, "annotations")
        # The same shape checks the official loader asserts, naming the file instead of failing on a KeyError.
        _require(isinstance(predictions, list), args.predictions, "result file: expected a list of objects")
        _require(
            isinstance(questions, dict) and isinstance(questions.get("questions"), list),
            args.questions,
            "question file: expected an object with a 'questions' list",
        )
        _require(
            isinstance(annotations, dict) and isinstance(annotations.get("annotations"), list),
            args.annotations,
            "annotation file: expected an object with an 'annotations' list",
        )
        annotated, asked = _question_ids(annotations["annotations"]), _question_ids(questions["questions"])
        if not_asked := annotated - asked:
            raise ValueError(
                f"{args.questions} lacks {len(not_asked)} of the {len(annotated)} annotated questions of "
                f"{args.annotations}: the question file of another split?"
            )
        scored = annotations["annotations"]
        answered = _question_ids(predictions)
        if args.answered_only:
            scored = [entry for entry in scored if not isinstance(entry, dict) or entry.get("question_id") in answered]
            print(f"Scoring the {len(scored)} of the {len(annotated)} annotated questions that the predictions answer")
        elif answered < annotated:
            raise ValueError(
                f"the predictions answer {len(answered)} of the {len(annotated)} annotated questions: give "
                "--answered_only to score those (a split prepared with --allow_incomplete_eval_splits lacks the "
                "questions of images without features), or answer them all"
            )
        accuracy = evaluate_vqa(predictions, scored, questions)
        if args.json is not None:
            _write_json(args.json, accuracy)
    except (ValueError, TypeError) as error:
        sys.exit(f"error: {error}")

    print_accuracy_report(accuracy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
