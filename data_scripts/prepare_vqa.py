"""Converts the raw VQA-v2 (and Visual Genome) files of the original RWSAN release into `datasets` Arrow
tables, once, so that training reads memory-mapped arrays instead of one `.npz` file per question.

Input layout (the original README's):

    DATA_ROOT/vqa/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    DATA_ROOT/vqa/v2_mscoco_{train2014,val2014}_annotations.json
    DATA_ROOT/vqa/VG_{questions,annotations}.json                  (optional; VG questions use COCO images)
    DATA_ROOT/coco_extract/{train2014,val2014,test2015}/COCO_<split>_<image id>.jpg.npz
        (`x` (2048, N) or (N, 2048); optional, as the original reads only `x`: `bbox` (N, 4), `num_bbox`,
        `image_h`, `image_w`)

and/or bottom-up-attention TSV files given with `--features_tsv` (columns image_id, image_w, image_h,
num_boxes, boxes, features; the last two base64 float32 of shapes (N, 4) and (N, 2048)). Splits whose question
files are absent, or none of whose images is in any feature source (test2015 with trainval TSV files), are
skipped and said so; their questions still count for the question vocabulary.

Output layout (`OUTPUT_DIR/`):

    images/              one row per image: image_id, features (num_regions, feature_size) float16, boxes
                         (num_regions, 4), image_width, image_height (each null where the `.npz` lacks it, or
                         holds a faulty one: a problem in report.json), num_regions
    questions/<split>/   one row per question of train, val, test, test-dev, vg: question_id, image_id,
                         image_index (its row in images/), question, input_ids and, for annotated splits,
                         question_type, answer_type, answers (the annotators'), multiple_choice_answer (null
                         where VG's file has none), label_ids / label_scores (the sparse soft scores)
    processor/           the `RWSANProcessor` with the question and answer vocabularies
    report.json          counts, a summary of the regions per image, and every problem found

Both vocabularies reproduce the original's, order included. Images whose features cannot be used (unreadable
file, another feature size, NaN/inf values, ...), and questions or annotations that are repeated or disagree,
are listed in report.json and their questions left out; `--strict` stops at the first such problem instead. A
val, test or test-dev question left out (no usable image features, no annotation, or an annotation about another
image) stops the conversion unless `--allow_incomplete_eval_splits` is given, and so does a split that would keep
none of its questions; questions of images without a feature file are found before any image is converted.
All-zero feature rows are padding, which the original's mask hides, and are not stored.

The output is written into a temporary sibling folder that replaces OUTPUT_DIR only once everything succeeded.
OUTPUT_DIR must lie apart from DATA_ROOT and the TSV files, and `--overwrite` replaces only an earlier
prepared dataset.

Usage:
    python data_scripts/prepare_vqa.py --data_root datasets --output_dir data/vqa --num_proc 2
"""

import argparse
import base64
import binascii
import codecs
import contextlib
import functools
import json
import multiprocessing
import os
import reprlib
import secrets
import shutil
import signal
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import pyarrow as pa
from datasets import DatasetInfo, Features, List, Value
from datasets.fingerprint import generate_random_fingerprint
from tqdm.auto import tqdm

from rwsan.data import vocabulary_fingerprint
from rwsan.processing_rwsan import (
    HALF_CHARACTER,
    PAD_TOKEN,
    UNK_TOKEN,
    RWSANProcessor,
    answer_scores,
    build_question_tokenizer,
    is_text,
    normalize_answer,
    split_question,
)
from rwsan.region_files import image_size_fault, parse_size, read_region_archive, regions_first, shown_size

QUESTIONS_FOLDER = "vqa"
FEATURES_FOLDER = "coco_extract"


@dataclass(frozen=True)
class SplitFiles:
    """Where the original release keeps one split (cfgs/path_cfgs.py)."""

    questions: str
    annotations: str | None


SPLIT_FILES = {
    "train": SplitFiles("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"),
    "val": SplitFiles("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
    "test": SplitFiles("v2_OpenEnded_mscoco_test2015_questions.json", None),
    "test-dev": SplitFiles("v2_OpenEnded_mscoco_test-dev2015_questions.json", None),
    "vg": SplitFiles("VG_questions.json", "VG_annotations.json"),
}
FEATURE_FOLDERS = ("train2014", "val2014", "test2015")

# utils/proc_ansdict.py of the original counts the multiple-choice answers of train then val (not VG) and
# keeps those seen more than 8 times, in order of first occurrence.
ANSWER_VOCABULARY_SPLITS = ("train", "val")
MIN_ANSWER_OCCURRENCES = 9
# data/load_data.py of the original numbers question words in order of first occurrence over train, val,
# test2015 and VG questions (`stat_ques_list`); test-dev is a subset of test2015 and is not read.
QUESTION_VOCABULARY_SPLITS = ("train", "val", "test", "vg")
# Their scores are computed on every question (val) or by the evaluation server, which rejects a results file
# that misses questions (test-dev, test): a question left out silently changes or breaks them.
EVALUATION_SPLITS = ("val", "test", "test-dev")
# What a prepared dataset consists of: --overwrite replaces only a folder of these (or an empty one), so that a
# mistyped output_dir cannot delete anything else.
PREPARED_DATASET_ENTRIES = ("images", "questions", "processor", "report.json")
MAX_NAMES_SHOWN = 5
# The file in a conversion's work folder whose lock tells that its run is alive.
WORK_LOCK = ".lock"
# How much of a feature file is read at the start to tell that it is text.
TEXT_CHECK_BYTES = 2**16

FEATURE_DTYPES = ("float16", "float32")
# Question and image ids are stored as int64.
INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
# The original pads and cuts every image to 100 regions; the processor records it for the loader.
MAX_REGIONS = 100
# Decoded images travel from the workers and into Arrow in groups of about this size, which bounds memory.
WRITE_BATCH_BYTES = 16 * 2**20
MAX_SHARD_BYTES = 500 * 2**20
# Enough to keep a few dozen workers busy; a TSV line of 100 regions is about 1 MB.
MAX_IMAGES_IN_FLIGHT = 128
QUESTIONS_PER_BATCH = 10_000
REGION_HISTOGRAM_EDGES = (1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 101)


def build_answer_vocabulary(answer_lists: Iterable[Iterable[str]]) -> list[str]:
    """The original's answer vocabulary: normalised multiple-choice answers seen more than 8 times, in order of
    first occurrence over the lists (those of train, then val)."""
    occurrences = Counter()
    for answers in answer_lists:
        occurrences.update(normalize_answer(answer) for answer in answers)
    # Counter keeps first-occurrence order, which is the order of the original's dict.
    return [answer for answer, count in occurrences.items() if count >= MIN_ANSWER_OCCURRENCES]


def build_question_vocabulary(question_lists: Iterable[Iterable[str]]) -> dict[str, int]:
    """The original's question vocabulary: PAD=0, UNK=1, then every word of `split_question` in order of first
    occurrence over the lists of questions (those of train, val, test2015, VG)."""
    vocabulary = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for questions in question_lists:
        for question in questions:
            for word in split_question(question):
                vocabulary.setdefault(word, len(vocabulary))
    return vocabulary


@dataclass
class Problem:
    """One bad input that was left out. `kind` groups problems on screen; `reason` says what is wrong."""

    kind: str
    path: str
    reason: str
    image_id: int | None = None
    question_id: int | None = None


class ProblemLog:
    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[Problem] = []

    def add(self, problem: Problem):
        if self.strict:
            raise ValueError(f"{problem.path}: {problem.reason} (stopped by --strict)")
        self.problems.append(problem)

    def counts(self) -> dict[str, int]:
        return dict(Counter(problem.kind for problem in self.problems))


def describe_problems(problems: list[Problem]) -> str:
    """The problems counted by kind, most common first, each with its first problem's path and reason: an error
    message has to carry them, as a failed run writes no report.json."""
    first_of_kind: dict[str, Problem] = {}
    for problem in problems:
        first_of_kind.setdefault(problem.kind, problem)
    counts = Counter(problem.kind for problem in problems)
    return ", ".join(
        f"{count} x {kind} (first: {first_of_kind[kind].path}: {first_of_kind[kind].reason})"
        for kind, count in counts.most_common()
    )


@dataclass
class RawInputs:
    data_root: Path
    question_files: dict[str, Path] = field(default_factory=dict)
    annotation_files: dict[str, Path] = field(default_factory=dict)
    feature_folders: list[Path] = field(default_factory=list)
    features_tsv: list[Path] = field(default_factory=list)
    # split -> why it is not converted (its questions may still count for the question vocabulary)
    skipped_splits: dict[str, str] = field(default_factory=dict)

    @property
    def converted_splits(self) -> list[str]:
        return [split for split in self.question_files if split not in self.skipped_splits]

    def skip(self, split: str, reason: str):
        self.skipped_splits[split] = reason
        print(f"Skipping {split}: {reason}")

    def feature_sources(self) -> str:
        return ", ".join(map(str, [*self.feature_folders, *self.features_tsv]))


def locate_inputs(data_root: Path, features_tsv: list[Path]) -> RawInputs:
    """Finds the raw files, stopping with the path of any required file that is missing."""
    questions_dir = data_root / QUESTIONS_FOLDER
    if not questions_dir.is_dir():
        raise FileNotFoundError(f"{questions_dir} not found: it should hold the VQA-v2 question files")
    inputs = RawInputs(data_root)
    for split, files in SPLIT_FILES.items():
        questions_path = questions_dir / files.questions
        annotations_path = questions_dir / files.annotations if files.annotations else None
        if not questions_path.is_file():
            if annotations_path is not None and annotations_path.is_file():
                raise FileNotFoundError(f"{questions_path} not found, but its annotations {annotations_path} are")
            inputs.skip(split, f"{questions_path} not found")
            continue
        if annotations_path is not None:
            if not annotations_path.is_file():
                raise FileNotFoundError(
                    f"{annotations_path} not found: the {split} questions {questions_path} need their annotations"
                )
            inputs.annotation_files[split] = annotations_path
        inputs.question_files[split] = questions_path
    if not inputs.question_files:
        raise FileNotFoundError(
            f"no question files in {questions_dir} (expected e.g. {SPLIT_FILES['train'].questions})"
        )
    if not any(split in inputs.annotation_files for split in ANSWER_VOCABULARY_SPLITS):
        raise FileNotFoundError(
            f"neither {questions_dir / SPLIT_FILES['train'].annotations} nor "
            f"{questions_dir / SPLIT_FILES['val'].annotations} found: the answer vocabulary comes from them"
        )

    for path in features_tsv:
        # Not is_file(): a named pipe is a valid source too.
        if not path.exists():
            raise FileNotFoundError(f"feature file {path} not found")
        if path.is_dir():
            raise IsADirectoryError(f"feature file {path} is a folder: name the .tsv files in it")
        if path.is_file():
            check_starts_as_text(path)
    inputs.features_tsv = list(features_tsv)
    features_dir = data_root / FEATURES_FOLDER
    inputs.feature_folders = [features_dir / name for name in FEATURE_FOLDERS if (features_dir / name).is_dir()]
    if not inputs.feature_folders and not inputs.features_tsv:
        raise FileNotFoundError(
            f"no image features: none of {', '.join(FEATURE_FOLDERS)} exists in {features_dir} "
            "and no --features_tsv was given"
        )
    return inputs


def check_starts_as_text(path: Path):
    """Refuses a feature file that does not start as UTF-8 text (a compressed `.tsv.gz`, say) now, rather than
    once every `.npz` folder has been converted. A pipe is not read ahead: what is read from it is gone."""
    with open(path, "rb") as file:
        start = file.read(TEXT_CHECK_BYTES)
    try:
        # Incremental: the read may end inside a character.
        codecs.getincrementaldecoder("utf-8")().decode(start)
    except UnicodeDecodeError as error:
        raise ValueError(f"feature file {path} is not UTF-8 text ({error}); is it compressed?") from None


def check_output_apart_from_inputs(output_dir: Path, data_root: Path, features_tsv: list[Path]):
    """Refuses an output_dir that overlaps the inputs: replacing it (--overwrite) would delete them, and inside
    data_root it could be a folder the inputs are read from."""
    output = output_dir.resolve()
    root = data_root.resolve()
    if output == root:
        relation = "is"
    elif output.is_relative_to(root):
        relation = "lies inside"
    elif root.is_relative_to(output):
        relation = "contains"
    else:
        relation = None
    if relation:
        raise ValueError(
            f"output_dir {output_dir} {relation} data_root {data_root}: choose an output_dir apart from the raw "
            "data, which --overwrite would otherwise delete"
        )
    for path in features_tsv:
        if path.resolve().is_relative_to(output):
            raise ValueError(
                f"output_dir {output_dir} holds the feature file {path}: choose an output_dir apart from it, "
                "which --overwrite would otherwise delete"
            )


class QuestionRecord(NamedTuple):
    question_id: int
    image_id: int
    question: str


class AnnotationRecord(NamedTuple):
    question_id: int
    # Optional: only compared with the question's.
    image_id: int | None
    question_type: str | None
    answer_type: str | None
    # Needed only where the answer vocabulary is counted (train, val): the original reads just `answers` for
    # training, so its Visual Genome files need not hold it.
    multiple_choice_answer: str | None
    answers: tuple[str, ...]


def _id_fault(value) -> str | None:
    # JSON true and false load as bool, a subclass of int, but are no ids.
    if not isinstance(value, int) or isinstance(value, bool):
        return f" is {reprlib.repr(value)}, expected an integer"
    if not INT64_MIN <= value <= INT64_MAX:
        return f" is {reprlib.repr(value)}, beyond the 64-bit integers ids are stored as"
    return None


def _unencodable_fault(text: str) -> str | None:
    return None if is_text(text) else f" is {reprlib.repr(text)}, which {HALF_CHARACTER}"


def _text_fault(value) -> str | None:
    if not isinstance(value, str):
        return f" is {reprlib.repr(value)}, expected a string"
    return _unencodable_fault(value)


def _answers_fault(value) -> str | None:
    # By the time an annotation is checked, `compact_json_object` has turned its well-formed answers into strings.
    if not isinstance(value, list):
        return f' is {reprlib.repr(value)}, expected a list of {{"answer": <string>}} objects'
    if not value:
        # Accuracy is taken over a question's answers: an evaluation would fail on it only after training.
        return ' is [], expected at least one {"answer": <string>} object'
    for position, answer in enumerate(value):
        if not isinstance(answer, str):
            return f'[{position}] is {reprlib.repr(answer)}, expected an {{"answer": <string>}} object'
        if fault := _unencodable_fault(answer):
            return f"[{position}]{fault}"
    return None


# field -> what is wrong with its value (None when nothing), for the fields read here
RECORD_FIELDS = {
    QuestionRecord: {"question_id": _id_fault, "image_id": _id_fault, "question": _text_fault},
    AnnotationRecord: {"question_id": _id_fault, "answers": _answers_fault},
}
# The same for fields that may also be absent or null.
OPTIONAL_RECORD_FIELDS = {
    QuestionRecord: {},
    AnnotationRecord: {
        "image_id": _id_fault,
        "question_type": _text_fault,
        "answer_type": _text_fault,
        "multiple_choice_answer": _text_fault,
    },
}


def record_fault(content: dict, record_type: type) -> str | None:
    """What keeps a parsed JSON object from being a `record_type` (" has no ...", ".field is ..."), or None."""
    required = RECORD_FIELDS[record_type]
    for name, fault_of in required.items():
        if name not in content:
            return f" has no {name} (it needs {', '.join(required)})"
        if fault := fault_of(content[name]):
            return f".{name}{fault}"
    for name, fault_of in OPTIONAL_RECORD_FIELDS[record_type].items():
        if content.get(name) is not None and (fault := fault_of(content[name])):
            return f".{name}{fault}"
    return None


def _interned(value):
    return sys.intern(value) if isinstance(value, str) else value


def compact_json_object(record_type: type, content: dict):
    """`json.load` object hook that turns the questions or annotations (`record_type`) and annotators' answers
    into compact records as soon as they are parsed: VQA files hold millions of these small objects, which would
    take gigabytes as dicts. Objects unfit for a record stay dicts, for `load_records` to report."""
    if "question_id" not in content:
        # An annotator's answer; the many repeated answers share one string.
        return _interned(content["answer"]) if isinstance(content.get("answer"), str) else content
    if record_fault(content, record_type) is not None:
        return content
    if record_type is QuestionRecord:
        return QuestionRecord(content["question_id"], content["image_id"], content["question"])
    return AnnotationRecord(
        content["question_id"],
        content.get("image_id"),
        _interned(content.get("question_type")),
        _interned(content.get("answer_type")),
        _interned(content.get("multiple_choice_answer")),
        tuple(content["answers"]),
    )


def load_records(path: Path, key: str, record_type: type) -> list:
    """The `key` list of a VQA JSON file as records, checking that every entry has the fields used here, of
    the right types, and that there is at least one."""
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file, object_hook=functools.partial(compact_json_object, record_type))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (JSON): {error}") from None
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        raise ValueError(f"{path} has no '{key}' list")
    records = content[key]
    if not records:
        raise ValueError(f"{path}: its '{key}' list is empty")
    for position, record in enumerate(records):
        if not isinstance(record, record_type):
            fault = (
                record_fault(record, record_type)
                if isinstance(record, dict)
                else f" is {reprlib.repr(record)}, expected an object"
            )
            raise ValueError(f"{path}: {key}[{position}]{fault}")
    return records


@dataclass(frozen=True)
class DecodeSettings:
    feature_size: int
    feature_dtype: str


@dataclass
class DecodedImage:
    image_id: int
    features: np.ndarray  # (num_regions, feature_size) in the output dtype
    # The boxes, (num_regions, 4) float32, and the image size are None where the `.npz` does not hold them.
    boxes: np.ndarray | None
    width: int | None
    height: int | None
    path: str
    # Problems of the boxes or the size, which were left out for them.
    left_out: list[Problem] = field(default_factory=list)


def checked_image(
    image_id: int,
    features: np.ndarray,
    boxes: np.ndarray | None,
    num_boxes: int | np.ndarray | None,
    width: int | np.ndarray | None,
    height: int | np.ndarray | None,
    path: str,
    settings: DecodeSettings,
) -> DecodedImage | Problem:
    """Validates an image's region features (rows, feature_size), drops their all-zero rows and converts them to
    the output dtype. All-zero rows are padding (some extractors pad every image to a fixed count), which the
    original's `make_mask` hides from the model: stored, they would count as regions, and left out they change no
    logit (nothing in the model depends on a region's place). Faulty boxes or image sizes are left out, the image
    kept, with a problem each in `DecodedImage.left_out`."""

    def problem(kind: str, reason: str) -> Problem:
        return Problem(kind, path, reason, image_id=image_id)

    # The original's model takes floats alone; complex values would lose their imaginary part unseen.
    if features.dtype.kind != "f":
        return problem("unreadable", f"features of dtype {features.dtype}, expected floating-point values")
    if len(features) == 0:
        return problem("no_regions", "no regions")
    if not np.isfinite(features).all():
        return problem("non_finite", f"{np.count_nonzero(~np.isfinite(features))} NaN or infinite feature values")
    real_rows = np.flatnonzero(features.any(axis=1))
    if len(real_rows) == 0:
        return problem("no_regions", f"all its {len(features)} feature rows are zero, which marks padding")
    num_regions = int(real_rows[-1]) + 1
    # Wider floats than those stored may hold values the stored dtype cannot, which it would make infinite.
    largest = float(np.abs(features).max())
    if largest > float(np.finfo(settings.feature_dtype).max):
        return problem(
            f"{settings.feature_dtype}_overflow",
            f"feature values up to {largest:g} overflow {settings.feature_dtype}"
            + ("; use --feature_dtype float32" if settings.feature_dtype == "float16" else ""),
        )
    stored = np.ascontiguousarray(features[real_rows], dtype=settings.feature_dtype)
    # A row of values all below the stored dtype's smallest would be stored as zeros, which mark padding: the
    # region would silently drop out of training.
    vanished = real_rows[~stored.any(axis=1)]
    if len(vanished):
        region = int(vanished[0])
        return problem(
            f"{settings.feature_dtype}_underflow",
            f"region {region}'s feature values (at most {np.abs(features[region]).max():g}) are all too small for "
            f"{settings.feature_dtype} and would be stored as zeros, which mark padding"
            + ("; use --feature_dtype float32" if settings.feature_dtype == "float16" else ""),
        )
    # The model reads the features alone (the original reads only `x`): faulty boxes or sizes are left out, each a
    # problem, and the image kept.
    left_out = []
    if boxes is not None and (fault := _boxes_fault(boxes, num_boxes, num_regions, len(features))):
        left_out.append(problem("boxes_left_out", fault))
        boxes = None
    if fault := image_size_fault(width, height):
        left_out.append(problem("image_size_left_out", fault))
        width = height = None
    return DecodedImage(
        image_id,
        stored,
        None if boxes is None else np.ascontiguousarray(boxes[real_rows], dtype=np.float32),
        None if width is None else parse_size(width),
        None if height is None else parse_size(height),
        path,
        left_out,
    )


def _boxes_fault(
    boxes: np.ndarray, num_boxes: int | np.ndarray | None, num_regions: int, num_rows: int
) -> str | None:
    """What is wrong with an image's boxes, or None. They and `num_boxes` (where the file has it) may count the
    feature rows with or without their trailing zero padding."""
    if boxes.dtype.kind not in "iuf":
        return f"boxes of dtype {boxes.dtype}, expected numbers"
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        return f"boxes have shape {boxes.shape}, expected (num_regions, 4)"
    for name, count in (("boxes", len(boxes)), ("num_bbox", num_boxes)):
        if count is not None and parse_size(count) not in (num_regions, num_rows):
            padding = f" ({num_regions} before their zero padding)" if num_regions < num_rows else ""
            return f"{num_rows} feature rows{padding} but {name} counts {shown_size(count)}"
    if not np.isfinite(boxes).all():
        return "boxes hold NaN or infinite values"
    return None


# The problem kind of each optional array of an image's `.npz` that cannot be read.
_LEFT_OUT_WITH = {
    "bbox": "boxes_left_out",
    "num_bbox": "boxes_left_out",
    "image_w": "image_size_left_out",
    "image_h": "image_size_left_out",
}


@dataclass
class NpzImage:
    """An image's `.npz` from coco_extract/: `x` is (feature_size, N) as the original ships it, or (N,
    feature_size). The original reads only `x`; `bbox`, `num_bbox`, `image_w` and `image_h` are kept or
    checked where the file holds them."""

    path: str
    image_id: int

    def decode(self, settings: DecodeSettings) -> DecodedImage | Problem:
        try:
            arrays, unreadable = read_region_archive(self.path)
        except ValueError as error:
            return Problem("unreadable", self.path, str(error), image_id=self.image_id)
        try:
            region_features = regions_first(arrays["x"], settings.feature_size)
        except ValueError as error:
            return Problem("feature_size", self.path, str(error), image_id=self.image_id)
        # Boxes that cannot be checked against their count, and a size missing a side, are left out whole.
        boxes_readable = not {"bbox", "num_bbox"} & unreadable.keys()
        size_readable = not {"image_w", "image_h"} & unreadable.keys()
        boxes, num_boxes = (arrays.get("bbox"), arrays.get("num_bbox")) if boxes_readable else (None, None)
        width, height = (arrays.get("image_w"), arrays.get("image_h")) if size_readable else (None, None)
        decoded = checked_image(self.image_id, region_features, boxes, num_boxes, width, height, self.path, settings)
        if isinstance(decoded, DecodedImage):
            decoded.left_out.extend(
                Problem(_LEFT_OUT_WITH[name], self.path, f"{name} {reason}", image_id=self.image_id)
                for name, reason in unreadable.items()
            )
        return decoded


TSV_COLUMNS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class TsvImage:
    """One line of a bottom-up-attention TSV file."""

    path: str
    line_number: int
    line: str
    image_id: int

    def decode(self, settings: DecodeSettings) -> DecodedImage | Problem:
        where = f"{self.path}:{self.line_number}"
        fields = self.line.rstrip("\r\n").split("\t")
        if len(fields) != len(TSV_COLUMNS):
            return Problem(
                "unreadable",
                where,
                f"{len(fields)} tab-separated columns, expected {len(TSV_COLUMNS)}: {', '.join(TSV_COLUMNS)}",
                image_id=self.image_id,
            )
        try:
            width, height, num_boxes = int(fields[1]), int(fields[2]), int(fields[3])
            boxes = np.frombuffer(base64.b64decode(fields[4], validate=True), dtype=np.float32)
            region_features = np.frombuffer(base64.b64decode(fields[5], validate=True), dtype=np.float32)
        except (ValueError, binascii.Error) as error:
            return Problem("unreadable", where, f"cannot decode: {error}", image_id=self.image_id)
        if boxes.size != 4 * num_boxes:
            return Problem(
                "unreadable", where, f"{boxes.size} box values for {num_boxes} boxes", image_id=self.image_id
            )
        if region_features.size != num_boxes * settings.feature_size:
            return Problem(
                "feature_size",
                where,
                f"{region_features.size} feature values for {num_boxes} boxes, expected {num_boxes} x "
                f"{settings.feature_size}",
                image_id=self.image_id,
            )
        return checked_image(
            self.image_id,
            region_features.reshape(num_boxes, settings.feature_size),
            boxes.reshape(num_boxes, 4),
            None,
            width,
            height,
            where,
            settings,
        )


def image_id_from_file_name(path: Path) -> int:
    """The original's parsing (data/load_data.py): COCO_train2014_000000000009.jpg.npz -> 9."""
    return int(path.name.split("_")[-1].split(".")[0])


def npz_files(inputs: RawInputs) -> Iterator[tuple[Path, int | None]]:
    """The `.npz` files of the feature folders, in order, with the image id of each (None where the name has none).
    Hidden files (the `._*` that macOS adds to archives) are not features, and the original's glob skips them too."""
    for folder in inputs.feature_folders:
        for path in sorted(folder.glob("*.npz")):
            if path.name.startswith("."):
                continue
            try:
                yield path, image_id_from_file_name(path)
            except ValueError:
                yield path, None


def list_images(
    inputs: RawInputs, wanted_image_ids: set[int], problems: ProblemLog, skipped: Counter
) -> Iterator[NpzImage | TsvImage]:
    """The images to convert, in a fixed order (feature folders, then TSV files). Images no question refers to
    are counted in `skipped` instead of being decoded."""
    for path, image_id in npz_files(inputs):
        if image_id is None:
            problems.add(Problem("bad_file_name", str(path), "no image id in the file name"))
        elif image_id in wanted_image_ids:
            yield NpzImage(str(path), image_id)
        else:
            skipped["unreferenced"] += 1
    for path in inputs.features_tsv:
        with open(path, "rb") as file:
            for line_number, line in _numbered_text_lines(file, path):
                try:
                    image_id = int(line[: line.find("\t")])
                except ValueError:
                    problems.add(Problem("unreadable", f"{path}:{line_number}", "no image id in the first column"))
                    continue
                if image_id in wanted_image_ids:
                    yield TsvImage(str(path), line_number, line, image_id)
                else:
                    skipped["unreferenced"] += 1


def _numbered_text_lines(file, path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a file opened in binary, as text ending in "\\n", with their numbers from 1. Each is decoded on
    its own (a text stream decodes ahead, by blocks) so that bytes that are not UTF-8 raise a `ValueError` naming
    their line."""
    for line_number, line in enumerate(file, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{line_number} is not UTF-8 text: {error}") from None
        if text.endswith("\r\n"):  # as a text stream reads Windows line ends
            text = text[:-2] + "\n"
        yield line_number, text


def decode_image(image: NpzImage | TsvImage, settings: DecodeSettings) -> DecodedImage | Problem:
    return image.decode(settings)


def decode_images(
    images: Iterable[NpzImage | TsvImage], settings: DecodeSettings, workers: ProcessPoolExecutor | None
) -> Iterator[DecodedImage | Problem]:
    """Decodes images in input order, in the worker processes if given, with a bounded number in flight so
    that memory does not grow with the number of images."""
    if workers is None:
        for image in images:
            yield decode_image(image, settings)
        return
    pending = deque()
    for image in images:
        pending.append(workers.submit(decode_image, image, settings))
        if len(pending) >= MAX_IMAGES_IN_FLIGHT:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def image_features_schema(feature_size: int, feature_dtype: str) -> Features:
    # A list of fixed-size rows keeps each image's features one contiguous (num_regions, feature_size) block,
    # which the loader reads as a zero-copy slice of the memory-mapped file.
    return Features(
        {
            "image_id": Value("int64"),
            "features": List(List(Value(feature_dtype), length=feature_size)),
            "boxes": List(List(Value("float32"), length=4)),
            "image_width": Value("int32"),
            "image_height": Value("int32"),
            "num_regions": Value("int32"),
        }
    )


def regions_column(rows: list[np.ndarray | None], column_type: pa.ListType) -> pa.ListArray:
    """A list<fixed_size_list> column from per-image (num_regions, width) arrays; None rows are null."""
    row_type = column_type.value_type
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([0 if row is None else len(row) for row in rows], out=offsets[1:])
    present = [row.reshape(-1) for row in rows if row is not None]
    values = pa.array(np.concatenate(present) if present else [], type=row_type.value_type)
    is_null = [row is None for row in rows]
    return pa.ListArray.from_arrays(
        pa.array(offsets),
        pa.FixedSizeListArray.from_arrays(values, row_type.list_size),
        mask=pa.array(is_null) if any(is_null) else None,
    )


class StreamedDatasetWriter:
    """Writes a folder that `datasets.load_from_disk` reads (what `Dataset.save_to_disk` writes: Arrow
    stream shards, state.json, dataset_info.json) one record batch at a time. `save_to_disk` itself would
    have to read a whole table back, which pages all of it into this process."""

    def __init__(self, folder: Path, features: Features):
        self.folder = folder
        self.features = features
        self.schema = features.arrow_schema
        self.shard_paths: list[Path] = []
        self.shard_bytes = 0
        self.writer = None
        self.sink = None
        folder.mkdir(parents=True)

    def write_batch(self, columns: dict[str, pa.Array | list]):
        batch = pa.RecordBatch.from_pydict(columns, schema=self.schema)
        if self.writer is None or self.shard_bytes >= MAX_SHARD_BYTES:
            self._open_shard()
        self.writer.write_batch(batch)
        self.shard_bytes += batch.nbytes

    def _open_shard(self):
        self._close_shard()
        path = self.folder / f"shard-{len(self.shard_paths)}.arrow"
        self.shard_paths.append(path)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.shard_bytes = 0

    def _close_shard(self):
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = None

    def close(self):
        if not self.shard_paths:
            self._open_shard()
        self._close_shard()
        num_shards = len(self.shard_paths)
        file_names = [f"data-{index:05d}-of-{num_shards:05d}.arrow" for index in range(num_shards)]
        for path, file_name in zip(self.shard_paths, file_names):
            path.rename(self.folder / file_name)
        state = {
            "_data_files": [{"filename": file_name} for file_name in file_names],
            "_fingerprint": generate_random_fingerprint(),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = asdict(DatasetInfo(features=self.features))
        (self.folder / "dataset_info.json").write_text(json.dumps({key: info[key] for key in sorted(info)}, indent=2))


@dataclass
class ImageTable:
    """What the question tables need from the converted images."""

    row_of_image: dict[int, int] = field(default_factory=dict)
    num_regions: list[int] = field(default_factory=list)
    # image id -> the problem that left it out
    left_out: dict[int, Problem] = field(default_factory=dict)
    unreferenced: int = 0

    def holds(self, image_id: int) -> bool:
        """Whether a feature source held the image, usable or not."""
        return image_id in self.row_of_image or image_id in self.left_out


def write_images(
    inputs: RawInputs,
    wanted_image_ids: set[int],
    folder: Path,
    settings: DecodeSettings,
    workers: ProcessPoolExecutor | None,
    problems: ProblemLog,
) -> ImageTable:
    table = ImageTable()
    skipped = Counter()
    writer = StreamedDatasetWriter(folder, image_features_schema(settings.feature_size, settings.feature_dtype))
    pending: list[DecodedImage] = []

    def flush():
        writer.write_batch(
            {
                "image_id": [image.image_id for image in pending],
                "features": regions_column([image.features for image in pending], writer.schema.field("features").type),
                "boxes": regions_column([image.boxes for image in pending], writer.schema.field("boxes").type),
                "image_width": [image.width for image in pending],
                "image_height": [image.height for image in pending],
                "num_regions": [len(image.features) for image in pending],
            }
        )
        pending.clear()

    first_path_of_image: dict[int, str] = {}
    images = list_images(inputs, wanted_image_ids, problems, skipped)
    with contextlib.closing(decode_images(images, settings, workers)) as decoded_images:
        for decoded in tqdm(decoded_images, desc="Image features", unit=" images"):
            if isinstance(decoded, Problem):
                problems.add(decoded)
                if decoded.image_id not in table.row_of_image:  # else a usable copy was read before
                    table.left_out[decoded.image_id] = decoded
                continue
            if decoded.image_id in first_path_of_image:
                problems.add(
                    Problem(
                        "duplicate_image",
                        decoded.path,
                        f"image {decoded.image_id} already read from {first_path_of_image[decoded.image_id]}",
                        image_id=decoded.image_id,
                    )
                )
                continue
            first_path_of_image[decoded.image_id] = decoded.path
            for problem in decoded.left_out:
                problems.add(problem)
            table.left_out.pop(decoded.image_id, None)  # an earlier copy was unusable
            table.row_of_image[decoded.image_id] = len(table.num_regions)
            table.num_regions.append(len(decoded.features))
            pending.append(decoded)
            if sum(image.features.nbytes for image in pending) >= WRITE_BATCH_BYTES:
                flush()
    if pending:
        flush()
    writer.close()
    table.unreferenced = skipped["unreferenced"]
    return table


def question_schema(annotated: bool) -> Features:
    columns = {
        "question_id": Value("int64"),
        "image_id": Value("int64"),
        "image_index": Value("int64"),
        "question": Value("string"),
        "input_ids": List(Value("int32")),
    }
    if annotated:
        columns |= {
            "question_type": Value("string"),
            "answer_type": Value("string"),
            "answers": List(Value("string")),
            "multiple_choice_answer": Value("string"),
            "label_ids": List(Value("int32")),
            "label_scores": List(Value("float32")),
        }
    return Features(columns)


def first_of_each_question(records: list, key: str, path: str, kind: str, problems: ProblemLog) -> dict:
    """The records (of the `key` list in `path`) by question id, in order; of records that repeat a question id
    the first is kept and each later one is a problem of `kind`."""
    position_of: dict[int, int] = {}
    for position, record in enumerate(records):
        first_position = position_of.setdefault(record.question_id, position)
        if first_position != position:
            problems.add(
                Problem(
                    kind,
                    path,
                    f"{key}[{position}] repeats question {record.question_id} of {key}[{first_position}]; "
                    "only the first is kept",
                    question_id=record.question_id,
                )
            )
    return {question_id: records[position] for question_id, position in position_of.items()}


def missing_image_problem(
    question: QuestionRecord, questions_path: str, image_problem: Problem | None = None
) -> Problem:
    """The problem of a question left out for want of its image's features: none, or `image_problem` made them
    unusable."""
    if image_problem:
        left_out = f"{image_problem.kind}: {image_problem.path}: {image_problem.reason}"
        reason = f"its image {question.image_id} was left out ({left_out})"
    else:
        reason = f"its image {question.image_id} has no features"
    return Problem(
        "missing_image", questions_path, reason, image_id=question.image_id, question_id=question.question_id
    )


def joined_questions(
    split: str,
    questions: list[QuestionRecord],
    annotations: list[AnnotationRecord] | None,
    inputs: RawInputs,
    images: ImageTable,
    problems: ProblemLog,
) -> list[tuple[QuestionRecord, AnnotationRecord | None]]:
    """The questions of a split whose image was converted, each with its annotation (None for test splits).
    Every question left out, and every repeated question or annotation, is a problem."""
    questions_path = str(inputs.question_files[split])
    question_of = first_of_each_question(questions, "questions", questions_path, "duplicate_question", problems)
    annotation_of = None
    if annotations is not None:
        annotations_path = str(inputs.annotation_files[split])
        annotation_of = first_of_each_question(
            annotations, "annotations", annotations_path, "duplicate_annotation", problems
        )
        for question_id in annotation_of:
            if question_id in question_of:
                continue
            problems.add(
                Problem(
                    "missing_question",
                    annotations_path,
                    f"question {question_id} is annotated but not in {questions_path}",
                    question_id=question_id,
                )
            )
    kept = []
    for question in question_of.values():
        annotation = None
        if annotation_of is not None:
            annotation = annotation_of.get(question.question_id)
            if annotation is None:
                problems.add(
                    Problem(
                        "missing_annotation",
                        questions_path,
                        f"question {question.question_id} has no annotation in {annotations_path}",
                        question_id=question.question_id,
                    )
                )
                continue
            if annotation.image_id is not None and annotation.image_id != question.image_id:
                problems.add(
                    Problem(
                        "image_mismatch",
                        annotations_path,
                        f"the annotation of question {question.question_id} is about image {annotation.image_id}, "
                        f"the question in {questions_path} about image {question.image_id}",
                        image_id=question.image_id,
                        question_id=question.question_id,
                    )
                )
                continue
        if question.image_id not in images.row_of_image:
            problems.add(missing_image_problem(question, questions_path, images.left_out.get(question.image_id)))
            continue
        kept.append((question, annotation))
    return kept


# The problems that leave a question out of its split.
QUESTION_DROPPING_PROBLEMS = ("missing_annotation", "image_mismatch", "missing_image")


def check_kept_questions(
    split: str,
    questions_path: Path,
    num_questions: int,
    num_kept: int,
    split_problems: list[Problem],
    allow_incomplete_eval_splits: bool,
):
    """Stops where a split lost all its questions (mismatched files, say), or an evaluation split any of them."""
    if num_kept == 0:
        raise ValueError(
            f"{split}: none of its {num_questions} questions ({questions_path}) is kept: "
            f"{describe_problems(split_problems)}"
        )
    dropped = [problem for problem in split_problems if problem.kind in QUESTION_DROPPING_PROBLEMS]
    if split in EVALUATION_SPLITS and dropped and not allow_incomplete_eval_splits:
        raise incomplete_eval_split_error(split, num_questions, dropped)


def incomplete_eval_split_error(split: str, num_questions: int, dropped: list[Problem]) -> ValueError:
    return ValueError(
        f"{split}: {len(dropped)} of its {num_questions} questions would be left out ({describe_problems(dropped)}); "
        "an evaluation split needs every question, pass --allow_incomplete_eval_splits to leave them out"
    )


def question_columns(
    joined: list[tuple[QuestionRecord, AnnotationRecord | None]],
    tokenizer,
    max_question_length: int,
    label2id: dict[str, int],
    images: ImageTable,
) -> dict[str, list]:
    questions = [question for question, _ in joined]
    texts = [question.question for question in questions]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_question_length)
    columns = {
        "question_id": [question.question_id for question in questions],
        "image_id": [question.image_id for question in questions],
        "image_index": [images.row_of_image[question.image_id] for question in questions],
        "question": texts,
        "input_ids": encoded["input_ids"],
    }
    annotations = [annotation for _, annotation in joined]
    if annotations[0] is None:
        return columns
    scores = [sorted(answer_scores(annotation.answers, label2id).items()) for annotation in annotations]
    return columns | {
        "question_type": [annotation.question_type for annotation in annotations],
        "answer_type": [annotation.answer_type for annotation in annotations],
        "answers": [annotation.answers for annotation in annotations],
        "multiple_choice_answer": [annotation.multiple_choice_answer for annotation in annotations],
        "label_ids": [[answer_id for answer_id, _ in pairs] for pairs in scores],
        "label_scores": [[score for _, score in pairs] for pairs in scores],
    }


def write_questions(
    folder: Path,
    joined: list[tuple[QuestionRecord, AnnotationRecord | None]],
    annotated: bool,
    tokenizer,
    max_question_length: int,
    label2id: dict[str, int],
    images: ImageTable,
) -> int:
    """Writes the split's questions; returns how many of them have annotator answers none of which is in the
    answer vocabulary."""
    writer = StreamedDatasetWriter(folder, question_schema(annotated))
    without_known_answer = 0
    for start in range(0, len(joined), QUESTIONS_PER_BATCH):
        chunk = joined[start : start + QUESTIONS_PER_BATCH]
        columns = question_columns(chunk, tokenizer, max_question_length, label2id, images)
        writer.write_batch(columns)
        without_known_answer += sum(not label_ids for label_ids in columns.get("label_ids", []))
    writer.close()
    return without_known_answer


def _hold_lock(folder: Path) -> int | None:
    """Holds an exclusive lock on the file `WORK_LOCK` in `folder` for as long as this process lives (the lock dies
    with it, however it ends); returns the descriptor that holds it. The file is locked under another name and then
    renamed, so that no other run sees it unlocked while this one starts. None where the file system has no locks
    (Windows, some network shares): its leftovers are then kept, to be removed by hand."""
    if fcntl is None:
        return None
    starting = folder / f"{WORK_LOCK}.starting"
    # Opened for writing: NFS clients emulate flock with fcntl locks, whose exclusive kind needs it.
    descriptor = os.open(starting, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError:  # no locks on this file system (ENOLCK, ENOSYS, ...)
        os.close(descriptor)
        starting.unlink()
        return None
    starting.rename(folder / WORK_LOCK)
    return descriptor


def _is_abandoned(folder: Path) -> bool:
    """Whether a run killed outright left `folder`: its lock file is there and no live process holds it. Process ids
    would not tell (a container's runs all have the same one). A folder without the file (a run starting, or one
    on a file system without locks) is kept."""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(folder / WORK_LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live run (BlockingIOError), or no locks here
        return False
    finally:
        os.close(descriptor)
    return True


def check_output_dir(output_dir: Path, overwrite: bool):
    """Refuses an existing output_dir unless --overwrite is given and it holds an earlier prepared dataset (or
    nothing): replacing it then deletes nothing that this script cannot write again."""
    if not output_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it")
    if not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder")
    entries = {entry.name for entry in output_dir.iterdir()}
    foreign = sorted(entries - set(PREPARED_DATASET_ENTRIES))
    missing = [name for name in PREPARED_DATASET_ENTRIES if name not in entries]
    if entries and (foreign or missing):
        shown = ", ".join(foreign[:MAX_NAMES_SHOWN]) + (" ..." if len(foreign) > MAX_NAMES_SHOWN else "")
        found = f"it holds {shown}" if foreign else f"it has no {', '.join(missing)}"
        raise FileExistsError(
            f"{output_dir} is not a prepared dataset ({found}), and --overwrite replaces only a folder of "
            f"{', '.join(PREPARED_DATASET_ENTRIES)}: remove it yourself or choose another output_dir"
        )


def _sibling(output_dir: Path, kind: str) -> Path:
    """A new name `.<output_dir name>.<kind>-<random>` beside `output_dir`, of nothing yet: Windows renames nothing
    onto an existing folder."""
    return output_dir.parent / f".{output_dir.name}.{kind}-{secrets.token_hex(6)}"


@contextlib.contextmanager
def partial_output(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `output_dir` to write into. It replaces `output_dir` when the block succeeds and
    is removed when it fails, so that a stopped conversion never leaves a half-written dataset. A symbolic link
    as `output_dir` is followed: the dataset replaces its target, beside which it is written."""
    output_dir = Path(os.path.realpath(output_dir))
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # A run killed outright (SIGKILL, out of memory) cannot clean up; its leftovers are the unlocked ones.
    for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*"):
        if not stale.is_dir():
            continue
        if _is_abandoned(stale):
            print(f"Removing {stale}, left by an interrupted conversion")
            shutil.rmtree(stale)
        else:
            print(f"Keeping {stale}: a conversion may still be writing it (remove it by hand if none is)")
    # mkdir, not tempfile.mkdtemp: the dataset gets the permissions the umask gives, not a private folder's.
    work_dir = _sibling(output_dir, "partial")
    work_dir.mkdir()
    lock = None
    try:
        try:
            lock = _hold_lock(work_dir)
            yield work_dir
            # Whatever appeared there since the start is checked again before it is deleted.
            check_output_dir(output_dir, overwrite)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        # The lock stays held through the descriptor; the dataset must not carry the file.
        (work_dir / WORK_LOCK).unlink(missing_ok=True)
        _move_into_place(work_dir, output_dir)
    finally:
        if lock is not None:
            os.close(lock)


class DatasetNotMovedError(OSError):
    """The dataset is prepared, but could not take the place of the output folder."""


def _move_into_place(work_dir: Path, output_dir: Path):
    """Renames the finished `work_dir` to `output_dir`, replacing an earlier dataset there. Where the file system
    refuses (`output_dir` a mount point, say), the earlier dataset stays and the finished one is kept, not deleted:
    the conversion may have taken hours."""
    replaced = None
    try:
        if output_dir.exists():
            replaced = _sibling(output_dir, "replaced")
            output_dir.rename(replaced)
        work_dir.rename(output_dir)
    except OSError as error:
        if replaced is not None and replaced.exists() and not output_dir.exists():
            replaced.rename(output_dir)
        kept = work_dir.with_name(work_dir.name.replace(".partial-", ".finished-", 1))
        work_dir.rename(kept)
        raise DatasetNotMovedError(
            f"the dataset is prepared, in {kept}, but could not replace {output_dir} ({error.strerror}): move it "
            "there yourself"
        ) from error
    if replaced is not None:
        shutil.rmtree(replaced)


def regions_summary(num_regions: list[int]) -> dict:
    if not num_regions:
        return {}
    counts = np.asarray(num_regions)
    edges = (*REGION_HISTOGRAM_EDGES, max(counts.max() + 1, REGION_HISTOGRAM_EDGES[-1] + 1))
    histogram, _ = np.histogram(counts, bins=edges)
    labels = [f"{low}-{high - 1}" for low, high in zip(edges[:-2], edges[1:-1])] + [f">{edges[-2] - 1}"]
    return {
        "min": int(counts.min()),
        "max": int(counts.max()),
        "mean": round(float(counts.mean()), 2),
        "median": float(np.median(counts)),
        f"over_{MAX_REGIONS}_cut": int(np.count_nonzero(counts > MAX_REGIONS)),
        "histogram": dict(zip(labels, histogram.tolist())),
    }


def check_multiple_choice_answers(path: Path, annotations: list[AnnotationRecord]):
    """Refuses annotations of a split that the answer vocabulary is counted from, but that lack the answer it
    counts."""
    for position, annotation in enumerate(annotations):
        if annotation.multiple_choice_answer is None:
            raise ValueError(
                f"{path}: annotations[{position}] has no multiple_choice_answer, which the answer vocabulary is "
                f"counted from (in the {' and '.join(ANSWER_VOCABULARY_SPLITS)} annotations)"
            )


@dataclass
class RawQuestions:
    """The parsed question and annotation files, and the vocabularies built from them."""

    questions: dict[str, list[QuestionRecord]]
    annotations: dict[str, list[AnnotationRecord]]
    answers: list[str]
    vocabulary: dict[str, int]


def load_raw_questions(inputs: RawInputs) -> RawQuestions:
    questions = {
        split: load_records(path, "questions", QuestionRecord) for split, path in inputs.question_files.items()
    }
    annotations = {
        split: load_records(path, "annotations", AnnotationRecord) for split, path in inputs.annotation_files.items()
    }
    answer_splits = [split for split in ANSWER_VOCABULARY_SPLITS if split in annotations]
    for split in answer_splits:
        check_multiple_choice_answers(inputs.annotation_files[split], annotations[split])
    if len(answer_splits) < len(ANSWER_VOCABULARY_SPLITS):
        print(
            f"Note: the answer vocabulary comes from {' and '.join(answer_splits)} alone; the paper's (its "
            f"answer_dict.json, 3,129 answers) counts {' and '.join(ANSWER_VOCABULARY_SPLITS)}, so a model trained "
            "on this one answers from another list than the paper's checkpoints"
        )
    answers = build_answer_vocabulary(
        [annotation.multiple_choice_answer for annotation in annotations[split]] for split in answer_splits
    )
    if not answers:
        raise ValueError(
            f"the answer vocabulary is empty: no multiple-choice answer occurs {MIN_ANSWER_OCCURRENCES} or more "
            f"times in {' and '.join(str(inputs.annotation_files[split]) for split in answer_splits)}"
        )
    vocabulary = build_question_vocabulary(
        [question.question for question in questions[split]]
        for split in QUESTION_VOCABULARY_SPLITS
        if split in questions
    )
    return RawQuestions(questions, annotations, answers, vocabulary)


def check_eval_images_have_feature_files(inputs: RawInputs, raw: RawQuestions, allow_incomplete_eval_splits: bool):
    """Stops before any image is decoded where an evaluation split's questions name images without a feature file,
    which the check after decoding finds only once every image is converted (hours at full scale). Only feature
    folders can be listed ahead: TSV files would have to be read through. A split none of whose images has a
    file is left to be skipped, as after decoding."""
    if allow_incomplete_eval_splits or inputs.features_tsv:
        return
    listed = {image_id for _, image_id in npz_files(inputs)}
    for split in inputs.converted_splits:
        questions = raw.questions[split]
        if split not in EVALUATION_SPLITS or listed.isdisjoint(question.image_id for question in questions):
            continue
        questions_path = str(inputs.question_files[split])
        without_file = {
            question.question_id: missing_image_problem(question, questions_path)
            for question in questions
            if question.image_id not in listed
        }
        if without_file:
            raise incomplete_eval_split_error(split, len(questions), list(without_file.values()))


def write_prepared_dataset(
    work_dir: Path,
    inputs: RawInputs,
    raw: RawQuestions,
    settings: DecodeSettings,
    max_question_length: int,
    workers: ProcessPoolExecutor | None,
    problems: ProblemLog,
    allow_incomplete_eval_splits: bool,
) -> dict:
    """Writes images/, questions/, processor/ and report.json into `work_dir`; returns the report."""
    check_eval_images_have_feature_files(inputs, raw, allow_incomplete_eval_splits)
    wanted_image_ids = {question.image_id for split in inputs.converted_splits for question in raw.questions[split]}
    images = write_images(inputs, wanted_image_ids, work_dir / "images", settings, workers, problems)
    if not images.num_regions:
        cause = describe_problems(problems.problems) if problems.problems else "no feature source holds any of them"
        raise ValueError(
            f"none of the {len(wanted_image_ids)} images the questions refer to has usable features in "
            f"{inputs.feature_sources()}: {cause}"
        )
    for split in inputs.converted_splits:
        image_ids = {question.image_id for question in raw.questions[split]}
        if not any(map(images.holds, image_ids)):
            # Features of some splits only (trainval TSV files): missing images are then expected, not problems.
            inputs.skip(
                split, f"no image features: none of its images ({len(image_ids)}) is in {inputs.feature_sources()}"
            )

    label2id = {answer: answer_id for answer_id, answer in enumerate(raw.answers)}
    tokenizer = build_question_tokenizer(raw.vocabulary, max_length=max_question_length)
    split_counts = {}
    # Trained towards no answer, as in the original: all their soft scores are zero.
    without_known_answer = {}
    for split in inputs.converted_splits:
        first_problem = len(problems.problems)
        joined = joined_questions(split, raw.questions[split], raw.annotations.get(split), inputs, images, problems)
        # A record that repeats a question id is the same question again, answered once its first is kept.
        num_questions = len({question.question_id for question in raw.questions[split]})
        check_kept_questions(
            split,
            inputs.question_files[split],
            num_questions,
            len(joined),
            problems.problems[first_problem:],
            allow_incomplete_eval_splits,
        )
        annotated = split in inputs.annotation_files
        without_answer = write_questions(
            work_dir / "questions" / split, joined, annotated, tokenizer, max_question_length, label2id, images
        )
        split_counts[split] = {"questions": num_questions, "kept": len(joined)}
        if without_answer:
            without_known_answer[split] = without_answer
    processor = RWSANProcessor(
        tokenizer=tokenizer,
        id2label=dict(enumerate(raw.answers)),
        max_question_length=max_question_length,
        max_regions=MAX_REGIONS,
        image_feature_size=settings.feature_size,
    )
    processor.save_pretrained(str(work_dir / "processor"))
    report = {
        "data_root": str(inputs.data_root),
        "features_tsv": [str(path) for path in inputs.features_tsv],
        "splits": split_counts,
        "questions_without_known_answer": without_known_answer,
        "skipped_splits": inputs.skipped_splits,
        "images": {
            "converted": len(images.num_regions),
            "left_out": len(images.left_out),
            "unreferenced_not_converted": images.unreferenced,
            "feature_size": settings.feature_size,
            "feature_dtype": settings.feature_dtype,
        },
        "regions_per_image": regions_summary(images.num_regions),
        "vocabularies": {
            "answers": len(raw.answers),
            "question_words": len(raw.vocabulary),
            "fingerprint": vocabulary_fingerprint(processor),
        },
        "max_question_length": max_question_length,
        "problem_counts": problems.counts(),
        "problems": [asdict(problem) for problem in problems.problems],
    }
    (work_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


@contextlib.contextmanager
def decoding_workers(num_proc: int) -> Iterator[ProcessPoolExecutor | None]:
    """`num_proc` processes that decode feature files (None for decoding in this process)."""
    if num_proc == 1:
        yield None
        return
    executor = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"))
    try:
        # With "fork" the executor starts all its processes at the first task: start them now.
        executor.submit(int).result()
        yield executor
    finally:
        executor.shutdown(cancel_futures=True)


def prepare_vqa(
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    features_tsv: str | os.PathLike | list[str | os.PathLike] | None = None,
    num_proc: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    max_question_length: int = 16,
    feature_size: int = 2048,
    feature_dtype: str = "float16",
    allow_incomplete_eval_splits: bool = False,
) -> dict:
    """Converts the raw VQA files under `data_root` into `output_dir` (see the module docstring) and returns
    the report also saved as `output_dir/report.json`."""
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}")
    if max_question_length < 1:
        raise ValueError(f"max_question_length must be at least 1, got {max_question_length}")
    if feature_size < 1:
        raise ValueError(f"feature_size must be at least 1, got {feature_size}")
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    data_root, output_dir = Path(data_root), Path(output_dir)
    if isinstance(features_tsv, (str, os.PathLike)):
        features_tsv = [features_tsv]
    features_tsv = [Path(path) for path in features_tsv or []]
    check_output_apart_from_inputs(output_dir, data_root, features_tsv)
    check_output_dir(output_dir, overwrite)
    inputs = locate_inputs(data_root, features_tsv)

    # Forked before the question files are parsed, the decoding workers hold none of them, and they start
    # without importing anything again.
    with decoding_workers(num_proc) as workers:
        raw = load_raw_questions(inputs)
        with partial_output(output_dir, overwrite) as work_dir:
            settings = DecodeSettings(feature_size, feature_dtype)
            report = write_prepared_dataset(
                work_dir,
                inputs,
                raw,
                settings,
                max_question_length,
                workers,
                ProblemLog(strict),
                allow_incomplete_eval_splits,
            )
    print_summary(report, output_dir)
    return report


def print_summary(report: dict, output_dir: Path):
    for split, counts in report["splits"].items():
        unknown = report["questions_without_known_answer"].get(split)
        none_known = (
            f" ({unknown} whose annotator answers are all outside the answer vocabulary: none the model can give is "
            "right)"
            if unknown
            else ""
        )
        print(f"{split}: {counts['kept']} of {counts['questions']} questions{none_known}")
    images = report["images"]
    print(f"images: {images['converted']} converted, {images['left_out']} left out")
    vocabularies = report["vocabularies"]
    print(f"vocabularies: {vocabularies['question_words']} question words, {vocabularies['answers']} answers")
    for kind, count in report["problem_counts"].items():
        print(f"problems: {count} x {kind}")
    print(f"Wrote {output_dir} (details in {output_dir / 'report.json'})")


def exit_on_termination_requests():
    """Makes SIGTERM raise SystemExit(143) in the main thread for the rest of the process, so that a terminated
    conversion still removes its partial output, also while the main thread waits on a read that may not end
    (features from a stalled pipe). Requests after the first are ignored while it cleans up. Ctrl-C (SIGINT) keeps
    Python's handling.

    The kernel hands a process's signal to any of its threads, and Python runs handlers in the main thread
    only: a signal taken by another thread (tqdm's monitor, say) does not interrupt the main thread's system
    call. A watcher thread learns of every signal through the wakeup fd and, until the handler has run, sends
    SIGTERM on to the main thread itself, which does. Forked processes (the decoding workers) do not inherit the
    wakeup fd: a signal to one of them is theirs, not a request to stop the conversion."""
    exiting = False

    def exit_once(signum, frame):
        nonlocal exiting
        if not exiting:
            exiting = True
            sys.exit(128 + signum)

    def send_termination_to_main_thread(read_end: int, main_thread_id: int):
        with os.fdopen(read_end, "rb", buffering=0) as signals:
            while received := signals.read(64):
                # Each signal sent writes to the wakeup fd again: forwarding after the handler ran would not end.
                if signal.SIGTERM in received and not exiting:
                    signal.pthread_kill(main_thread_id, signal.SIGTERM)

    signal.signal(signal.SIGTERM, exit_once)
    # Windows sends no SIGTERM from outside a process and has no pthread_kill: the handler is enough there.
    if not hasattr(signal, "pthread_kill"):
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=lambda: signal.set_wakeup_fd(-1))
    threading.Thread(
        target=send_termination_to_main_thread, args=(read_end, threading.get_ident()), daemon=True
    ).start()


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data_root", required=True, help="Folder with vqa/ and coco_extract/.")
    parser.add_argument(
        "--output_dir", required=True, help="The prepared dataset: images/, questions/, processor/, report.json."
    )
    parser.add_argument("--features_tsv", nargs="+", default=None, help="Bottom-up-attention TSV feature files.")
    parser.add_argument("--num_proc", type=int, default=1, help="Processes that decode the feature files.")
    parser.add_argument("--strict", action="store_true", help="Stop at the first bad input, do not list it.")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing output_dir, if it is a dataset prepared earlier (or empty).",
    )
    parser.add_argument(
        "--max_question_length", type=int, default=16, help="Words kept of each question (the paper's 16)."
    )
    parser.add_argument("--feature_size", type=int, default=2048, help="Values of a region feature.")
    parser.add_argument(
        "--feature_dtype", choices=FEATURE_DTYPES, default="float16", help="How the region features are stored."
    )
    parser.add_argument(
        "--allow_incomplete_eval_splits",
        action="store_true",
        help="Leave out val, test and test-dev questions whose image has no usable features, or whose annotation "
        "is missing or about another image (listed in report.json), instead of stopping; val accuracy is then "
        "computed on fewer questions, and test-dev or test results miss them.",
    )
    args = parser.parse_args(argv)
    exit_on_termination_requests()
    try:
        prepare_vqa(**vars(args))
    except (FileNotFoundError, IsADirectoryError, FileExistsError, ValueError, DatasetNotMovedError) as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
