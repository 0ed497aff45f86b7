"""Answers questions with a trained RWSAN: one question about one image, or a whole prepared split.

    # one question about an image's region features (.npz in the original release's layout)
    python -m rwsan.predict --model runs/rwsan --features COCO_val2014_000000000042.jpg.npz \\
        --question "What color is the bus?" --top_k 5 --plot attention.png [--image photo.jpg]

    # a split prepared by data_scripts/prepare_vqa.py, into the evaluation server's format: the whole test set
    # is one file for both its test-dev and test-std phases (--split test-dev answers the test-dev questions only)
    python -m rwsan.predict --model runs/rwsan --dataset_dir data/vqa --split test --output predictions.json
"""

import argparse
import json
import numbers
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.image import imread
from tqdm.auto import tqdm

from .data import VQACollator, load_vqa_dataset, questions_left_out
from .modeling_rwsan import RWSANForVQA
from .pipeline_rwsan import RWSANVQAPipeline
from .processing_rwsan import (
    RWSANProcessor,
    check_positive_int,
    check_processor_fits_model,
    check_same_vocabularies,
)
from .visualization import plot_attention


class PredictionError(Exception):
    """A problem with the command-line inputs, reported as `error: ...` without a traceback."""


def questions_left_out_warning(dataset_dir: str | os.PathLike, split: str) -> str | None:
    """A warning for predictions of a prepared `split` that lacks some of its questions (prepared with
    `--allow_incomplete_eval_splits`): the evaluation server expects an answer to each. None where none is
    missing."""
    left_out = questions_left_out(dataset_dir, split)
    if not left_out:
        return None
    counts = ", ".join(f"{name} {missing:,} of {total:,}" for name, (missing, total) in left_out.items())
    return (
        f"questions were left out when the split was prepared ({counts}); the predictions do not answer them, and "
        "the evaluation server expects an answer to every question"
    )


def repeated_question_ids(question_ids) -> list[int]:
    """The question ids that occur more than once in `question_ids` (a list or numpy array), in the order they first
    occur."""
    return [int(question_id) for question_id, count in Counter(np.asarray(question_ids).tolist()).items() if count > 1]


def check_each_question_once(question_ids, split: str):
    """Raises a `ValueError` where the joined splits `split` (named as the caller's option gives them) hold a
    question more than once, which its predictions file cannot answer twice: checked before the prediction pass,
    rather than by `write_predictions` after it."""
    repeated = repeated_question_ids(question_ids)
    if repeated:
        raise ValueError(
            f"{split}: {len(repeated)} questions are in more than one of its splits (e.g. "
            f"{', '.join(map(str, repeated[:5]))}), and the predictions file answers each question once: give one of "
            "them (test-dev is a part of test)"
        )


def write_predictions(
    question_ids: Sequence[int],
    answer_indices: Sequence[int],
    id2label: Mapping[int, str],
    path: str | os.PathLike,
) -> list[dict]:
    """
    Writes answers in the format of the VQA evaluation server: `[{"question_id": int, "answer": str}, ...]`.

    Args:
        question_ids (`Sequence[int]`): the questions, each exactly once (a list, numpy array or tensor).
        answer_indices (`Sequence[int]`): the index of each question's answer in `id2label` (e.g. the argmax of the
            logits).
        id2label (`Mapping[int, str]`): the answer vocabulary, e.g. `model.config.id2label`.
        path (`str` or `os.PathLike`): the JSON file to write; missing parent folders are created.

    Returns:
        `list[dict]`: what was written.
    """
    question_ids = _integer_vector("question_ids", question_ids)
    answer_indices = _integer_vector("answer_indices", answer_indices)
    bad_key = next((label_id for label_id in id2label if not _is_integer(label_id)), None)
    if bad_key is not None:
        raise ValueError(f"id2label must have integer keys, as config.id2label has; it has {bad_key!r}")
    if len(question_ids) != len(answer_indices):
        raise ValueError(f"{len(question_ids)} question ids but {len(answer_indices)} answers")
    if len(question_ids) == 0:
        raise ValueError("no questions to write: the evaluation server wants an answer to each of a split's")
    repeated = repeated_question_ids(question_ids)
    if repeated:
        raise ValueError(
            f"{len(repeated)} question ids appear more than once (e.g. {', '.join(map(str, repeated[:5]))}); the "
            "evaluation server wants each question exactly once"
        )
    used = {int(index) for index in answer_indices.tolist()}
    unknown = sorted(used - set(id2label))
    if unknown:
        raise ValueError(f"answer indices {unknown[:5]} are not in id2label (answer ids 0..{len(id2label) - 1})")
    not_text = sorted(index for index in used if not isinstance(id2label[index], str))
    if not_text:
        raise ValueError(f"id2label's answers must be strings; answer {not_text[0]} is {id2label[not_text[0]]!r}")
    predictions = [
        {"question_id": int(question_id), "answer": id2label[int(index)]}
        for question_id, index in zip(question_ids.tolist(), answer_indices.tolist())
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(predictions))
    return predictions


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integer_vector(name: str, values) -> np.ndarray:
    # Rounding a float question id (float32 holds integers exactly only up to 2**24) would give another question.
    array = np.asarray(values)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(
            f"{name} must be a one-dimensional sequence of integers, got {array.dtype} of shape {array.shape}"
        )
    return array


def file_writing_problem(path: str | os.PathLike, example_name: str) -> str | None:
    """Why no file can be written at `path`, its missing parent folders made (a folder is there, a file there or
    the folder to make it in cannot be written); None where one can. `example_name` is the file name a folder's
    message suggests. Nothing is made here: a run that fails before writing leaves nothing behind."""
    path = Path(path).absolute()
    if path.is_dir():
        return f"{path} is a folder; name the file to write, e.g. {path / example_name}"
    if path.is_file():
        try:
            # Opened for writing without truncating it: the file is left as it is until it is written.
            with open(path, "r+b"):
                pass
        except OSError as error:
            return f"cannot write {path}: {error}"
        return None
    existing = next(folder for folder in path.parents if folder.exists())
    if not existing.is_dir():
        return f"cannot write {path}: {existing} is a file, not a folder"
    if existing != path.parent:
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"cannot write {path}: no permission to make folders in {existing}"
        return None
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"cannot write {path}: {error}"
    return None


def check_writable(path: str | os.PathLike) -> None:
    """Raises a `PredictionError` unless a file can be written at `path` (`file_writing_problem`), and unless a file
    there is empty or an earlier predictions file (a mistyped path could name a model's config.json)."""
    path = Path(path).absolute()
    if path.is_file() and path.stat().st_size > 0 and not _is_predictions_file(path):
        raise PredictionError(
            f"{path} exists and is no predictions file ([{{question_id, answer}}, ...]), which would replace it; "
            "name another file"
        )
    if problem := file_writing_problem(path, "predictions.json"):
        raise PredictionError(problem)


def _is_predictions_file(path: Path) -> bool:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, list) and all(
        isinstance(item, dict) and item.keys() == {"question_id", "answer"} for item in content
    )


def load_model_and_processor(model_dir: str | os.PathLike, device: str) -> tuple[RWSANForVQA, RWSANProcessor]:
    """Loads a saved `RWSANForVQA` and the `RWSANProcessor` saved beside it, the model in eval mode on `device`;
    refuses a processor that does not fit the model (see `check_processor_fits_model`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PredictionError(f"model folder not found: {model_dir}")
    for file_name, saved_by in (
        ("config.json", "model.save_pretrained"),
        ("processor_config.json", "processor.save_pretrained"),
    ):
        if not (model_dir / file_name).is_file():
            raise PredictionError(f"{model_dir} has no {file_name}; save one there with {saved_by}({model_dir})")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch built without CUDA asserts
        # The first line: torch goes on to list every backend it was built with.
        raise PredictionError(f"cannot use the device {device!r}: {str(error).splitlines()[0]}") from None
    if torch.device(device).type == "meta":
        raise PredictionError("cannot use the device 'meta': its tensors hold no values, so it answers nothing")
    model = RWSANForVQA.from_pretrained(model_dir).to(device).eval()
    processor = RWSANProcessor.from_pretrained(model_dir)
    try:
        check_processor_fits_model(processor, model.config, f"the model in {model_dir}", "the processor beside it")
    except ValueError as error:
        raise PredictionError(str(error)) from None
    return model, processor


def answer_question(
    model: RWSANForVQA,
    processor: RWSANProcessor,
    features_path: str | os.PathLike,
    question: str,
    top_k: int = 5,
    output_attentions: bool = False,
):
    """Answers one question about the image whose region features are in `features_path` (see the pipeline)."""
    if not Path(features_path).is_file():
        raise PredictionError(f"features file not found: {features_path}")
    vqa = RWSANVQAPipeline(model=model, processor=processor, device=model.device)
    return vqa(
        {"question": question, "image_features": str(features_path)},
        top_k=top_k,
        output_attentions=output_attentions,
    )


def predict_split(
    model: RWSANForVQA,
    processor: RWSANProcessor,
    dataset_dir: str | os.PathLike,
    split: str = "test",
    batch_size: int = 128,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """
    Answers every question of a split prepared by `data_scripts/prepare_vqa.py`.

    Returns:
        `(question_ids, answer_indices)`, numpy arrays in the order of the split, for [`write_predictions`].
    """
    check_positive_int("batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer of at least 0, got {num_workers!r}")
    if model.training:
        raise PredictionError(
            "the model is in training mode, where dropout makes the answers random: call model.eval()"
        )
    if not Path(dataset_dir).is_dir():
        raise PredictionError(f"dataset folder not found: {dataset_dir}")
    dataset = load_vqa_dataset(
        dataset_dir,
        split,
        max_question_length=processor.max_question_length,
        max_regions=processor.max_regions,
    )
    try:
        check_same_vocabularies(processor, dataset.processor, "the model's", f"{dataset_dir} (prepared)")
    except ValueError as error:
        raise PredictionError(str(error)) from None
    if dataset.feature_size != model.config.image_feature_size:
        raise PredictionError(
            f"{dataset_dir} (prepared) holds {dataset.feature_size} features a region, but the model takes "
            f"{model.config.image_feature_size}"
        )
    check_each_question_once(dataset.question_ids, f"split {split}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=VQACollator(
            model.config.num_labels,
            max_regions=processor.max_regions,
            max_question_length=processor.max_question_length,
        ),
        num_workers=num_workers,
    )
    question_ids, answer_indices = [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"Answering {split}", unit="batch"):
            # A copy: from a DataLoader worker the batch's tensors share one block, which a kept view would keep.
            question_ids.append(batch.pop("question_id").clone())
            batch.pop("labels", None)
            logits = model(**{name: tensor.to(model.device) for name, tensor in batch.items()}).logits
            answer_indices.append(logits.argmax(-1).cpu())
    return torch.cat(question_ids).numpy(), torch.cat(answer_indices).numpy()


def save_attention_plot(result: dict, path: str | os.PathLike, image_path: str | os.PathLike | None = None):
    """Plots a pipeline result with attention weights (see `rwsan.visualization.plot_attention`), on the image of
    `image_path` when given, else on a blank canvas of the stored image size."""
    if result["boxes"] is None:
        raise PredictionError("the features file has no 'bbox' array: the regions cannot be drawn")
    boxes = np.asarray(result["boxes"])
    image = result["image_size"]
    if image_path is not None:
        if not Path(image_path).is_file():
            raise PredictionError(f"image file not found: {image_path}")
        try:
            image = imread(image_path)
        except (OSError, ValueError) as error:
            raise PredictionError(f"cannot read the image {image_path}: {error}") from None
        if result["image_size"] is not None:
            # The boxes are in the pixels of the image the features were extracted from.
            stored_width, stored_height = result["image_size"]
            x_scale, y_scale = image.shape[1] / stored_width, image.shape[0] / stored_height
            boxes = boxes * np.array([x_scale, y_scale, x_scale, y_scale])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_attention(
        image,
        boxes,
        result["region_weights"],
        result["words"],
        result["word_weights"],
        result["answers"],
        question=result["question"],
        path=path,
    )


# Defaults of the options of one mode, filled in after the check that no option of the other mode was given.
MODE_DEFAULTS = {"top_k": 5, "split": "test", "batch_size": 128, "num_workers": 0}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rwsan.predict", description="Answer questions with a trained RWSAN model."
    )
    parser.add_argument("--model", required=True, help="Folder of the saved model and processor.")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: %(default)s)"
    )
    single = parser.add_argument_group("one question")
    single.add_argument("--features", help="The image's region features (.npz: x, bbox, image_h, image_w).")
    single.add_argument("--question")
    single.add_argument("--top_k", type=int, help=f"How many answers to print (default: {MODE_DEFAULTS['top_k']}).")
    single.add_argument("--plot", help="Write a picture of the attention weights here (e.g. attention.png).")
    single.add_argument("--image", help="The photo to draw the --plot regions on (default: a blank canvas).")
    split = parser.add_argument_group("a prepared split")
    split.add_argument("--dataset_dir", help="A folder written by data_scripts/prepare_vqa.py.")
    split.add_argument(
        "--split",
        help=f"The split to answer (default: {MODE_DEFAULTS['split']}). test, the whole test set, is the one file "
        "the evaluation server takes for its test-dev and test-std phases; test-dev answers its questions only.",
    )
    split.add_argument("--output", help="The predictions file, [{question_id, answer}, ...].")
    split.add_argument("--batch_size", type=int, help=f"(default: {MODE_DEFAULTS['batch_size']})")
    split.add_argument("--num_workers", type=int, help=f"(default: {MODE_DEFAULTS['num_workers']})")
    args = parser.parse_args(argv)

    if (args.dataset_dir is None) == (args.features is None):
        parser.error("give either --features and --question, or --dataset_dir and --output")
    # An option of the other mode would be ignored: nobody should wait for a file or a picture that is never made.
    used, unused = (single, split) if args.features is not None else (split, single)
    for action in unused._group_actions:
        if getattr(args, action.dest) is not None:
            parser.error(f"{action.option_strings[0]} is not used with {used._group_actions[0].option_strings[0]}")
    for name, default in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.features is not None and args.question is None:
        parser.error("--features needs --question")
    if args.dataset_dir is not None and args.output is None:
        parser.error("--dataset_dir needs --output")
    if args.image is not None and args.plot is None:
        parser.error("--image is only used with --plot")
    if args.image is not None and Path(args.image).resolve() == Path(args.plot).resolve():
        parser.error(f"--plot {args.plot} is the --image file, which the plot would overwrite")
    # Checked before the model is loaded and run. Without an extension matplotlib would add ".png" to the name, and
    # the file written would not be the one named.
    if args.plot is not None and Path(args.plot).suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        parser.error(
            f"--plot {args.plot}: the file name's extension gives the format, one matplotlib writes: "
            f"{', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))}"
        )
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.num_workers < 0:
        parser.error("--num_workers must be at least 0")
    return args


def main(argv: list[str] | None = None):
    args = parse_arguments(argv)
    if args.dataset_dir is not None:
        # Checked before answering, which takes a while on a whole split.
        check_writable(args.output)
    model, processor = load_model_and_processor(args.model, args.device)
    if args.dataset_dir is not None:
        question_ids, answer_indices = predict_split(
            model, processor, args.dataset_dir, args.split, args.batch_size, args.num_workers
        )
        try:
            write_predictions(question_ids, answer_indices, model.config.id2label, args.output)
        except OSError as error:
            raise PredictionError(f"cannot write the predictions to {args.output}: {error}") from None
        print(f"Wrote {len(question_ids)} answers to {args.output}")
        if warning := questions_left_out_warning(args.dataset_dir, args.split):
            print(f"warning: {warning}", file=sys.stderr)
        return

    result = answer_question(
        model, processor, args.features, args.question, args.top_k, output_attentions=args.plot is not None
    )
    answers = result["answers"] if args.plot is not None else result
    if args.plot is not None:
        # Before the answers are printed: a plot that cannot be drawn fails the command, which prints nothing then.
        save_attention_plot(result, args.plot, args.image)
    for rank, answer in enumerate(answers, start=1):
        print(f"{rank}. {answer['answer']}\t{answer['score']:.4f}")
    if "warning" in answers[0]:
        print(f"warning: {answers[0]['warning']}")
    if args.plot is not None:
        print(f"Wrote {args.plot}")


if __name__ == "__main__":
    try:
        main()
    except (PredictionError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
