"""Writes a small, learnable, synthetic VQA data set in the raw file formats of VQA-v2 and of the original
RWSAN release, so that the whole pipeline (preparation, training, evaluation) can run without the real data.

Every image is a scene of 3-10 objects (shape, colour, size, material, position) plus a few background
regions. Each region's feature is a random projection (fixed by the seed) of its one-hot attributes and
position, plus Gaussian noise, so the scene can be read back from the features. Every attribute value is a random
direction of about unit length, whatever the feature size: with unit-variance values instead (a 2048-value
feature of norm ~100), Adam's updates of the image projection are so large for its inputs that the model memorises
the training images instead of reading their attributes (57% instead of 93% toy val accuracy in the same number of
steps). Questions are templated and
their answer is a deterministic function of the scene; they are chosen so that the question text alone
predicts the answer badly. Layout of `output_dir`:

    vqa/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    vqa/v2_mscoco_{train2014,val2014}_annotations.json
    coco_extract/{train2014,val2014,test2015}/COCO_<split>_<12-digit image id>.jpg.npz
    toy_scenes.json   (the ground-truth scenes; not part of the official formats; written last, while
                      toy_vqa.unfinished marks a set still being written)

Usage:
    # the set train_vqa.py trains on by default
    python data_scripts/make_toy_vqa.py --output_dir datasets --seed 0 --num_images 2000 --questions_per_image 20 \\
        --num_proc 2
"""

import argparse
import itertools
import json
import math
import multiprocessing
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("ball", "box", "cylinder", "cone")
COLORS = ("red", "blue", "green", "yellow", "purple", "gray")
SIZES = ("small", "large")
MATERIALS = ("rubber", "metal")
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "material": MATERIALS}
PLURAL_NOUNS = {
    "ball": "balls",
    "box": "boxes",
    "cylinder": "cylinders",
    "cone": "cones",
    "object": "objects",
}
REGION_KINDS = ("background", "object")

# (width, height) of frequent COCO image sizes.
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375))
MIN_OBJECTS, MAX_OBJECTS = 3, 10
# Probability of each number of objects, MIN_OBJECTS first: small scenes are the most frequent, since few
# distractors let a model find the regions a question is about early in training.
NUM_OBJECTS_PROBABILITIES = (0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04)
MIN_BACKGROUND_REGIONS, MAX_BACKGROUND_REGIONS = 1, 3
# Half the side of an object's box, as a fraction of the image's shorter side.
OBJECT_HALF_EXTENT = {"small": 0.06, "large": 0.12}
COUNT_ANSWERS = tuple(str(count) for count in range(MAX_OBJECTS + 1))
YES_NO_ANSWERS = ("yes", "no")

# Written last, it also marks a toy set as this script's (--overwrite replaces only those).
SCENES_FILE = "toy_scenes.json"
# Present while a toy set is written: a set without its scenes file is unfinished, and may still be overwritten.
UNFINISHED_MARKER = "toy_vqa.unfinished"
SPLIT_FRACTIONS = {"train2014": 0.70, "val2014": 0.15, "test2015": 0.15}
ANNOTATED_SPLITS = ("train2014", "val2014")
TEST_SPLIT, TEST_DEV_SPLIT = "test2015", "test-dev2015"
TEST_DEV_FRACTION = 0.5
# Image ids are drawn below a million, like COCO's (all below 600,000).
MAX_IMAGE_ID = 999_999
MIN_NUM_IMAGES = 10
MAX_QUESTIONS_PER_IMAGE = 20

NUM_ANNOTATORS = 10
# Capping the wrong annotators keeps the true answer the strict majority, so `multiple_choice_answer` is
# always the true answer.
MAX_WRONG_ANNOTATORS = 4
ANSWER_CONFIDENCES = ("yes", "maybe", "no")
ANSWER_CONFIDENCE_PROBABILITIES = (0.85, 0.12, 0.03)

ANSWER_TYPE_PROBABILITIES = {"yes/no": 0.4, "number": 0.2, "other": 0.4}
# How many attributes a description names, (fewest, most): few, so that a small data set teaches them.
EXISTENCE_DESCRIPTION_SIZES = (1, 2)
COUNT_DESCRIPTION_SIZES = (0, 1)
QUERY_REFERENCE_SIZES = (1, 2)
# Candidates drawn per question slot; the one whose answer is rarest so far for its text is kept.
NUM_CANDIDATE_QUESTIONS = 8

# Each template carries the `question_type` the real VQA-v2 prefix list assigns to its questions.
EXISTENCE_TEMPLATES = (("Is there a {}?", "is there a", False), ("Are there any {}?", "are there any", True))
COUNT_TEMPLATES = (("How many {} are there?", "how many"), ("How many {} are in the picture?", "how many"))
QUERY_TEMPLATES = {
    "color": ("What color is the {}?", "what color is the"),
    "shape": ("What shape is the {}?", "what"),
    "material": ("What is the {} made of?", "what is the"),
    "size": ("What size is the {}?", "what"),
}

VQA_INFO = {
    "description": "Synthetic toy data in the format of the VQA v2.0 dataset.",
    "url": "http://visualqa.org",
    "version": "2.0",
    "year": 2017,
    "contributor": "rwsan data_scripts/make_toy_vqa.py",
    "date_created": "2017-04-26 17:07:13",
}
VQA_LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 International License",
}

# One-hot slots of a region's code: its kind, then every attribute value, then its centre (x, y) in [-1, 1].
REGION_CODE_SLOTS = [("kind", kind) for kind in REGION_KINDS] + [
    (name, value) for name, values in ATTRIBUTE_VALUES.items() for value in values
]
REGION_CODE_INDEX = {slot: index for index, slot in enumerate(REGION_CODE_SLOTS)}
NUM_REGION_CODES = len(REGION_CODE_SLOTS) + 2

# Separate random streams, so that the features of an image depend only on the seed and the image id, whatever
# the number of processes that write them.
SCENE_STREAM, PROJECTION_STREAM, FEATURE_NOISE_STREAM = 0, 1, 2


@dataclass(frozen=True)
class ToyQuestion:
    text: str
    question_type: str
    answer_type: str
    answer: str
    # Every answer the template can have, used to balance answers and to draw annotator mistakes.
    possible_answers: tuple[str, ...]


def image_file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg.npz"


def split_sizes(num_images: int) -> dict[str, int]:
    val_size = round(num_images * SPLIT_FRACTIONS["val2014"])
    test_size = round(num_images * SPLIT_FRACTIONS["test2015"])
    return {"train2014": num_images - val_size - test_size, "val2014": val_size, "test2015": test_size}


def region_code(region: dict, image_w: int, image_h: int) -> np.ndarray:
    """The vector that a region's feature is a noisy projection of: one-hot attributes and the box centre."""
    code = np.zeros(NUM_REGION_CODES, dtype=np.float32)
    code[REGION_CODE_INDEX["kind", region["kind"]]] = 1.0
    for name in ATTRIBUTE_VALUES:
        if name in region:
            code[REGION_CODE_INDEX[name, region[name]]] = 1.0
    x1, y1, x2, y2 = region["bbox"]
    code[-2] = (x1 + x2) / image_w - 1.0
    code[-1] = (y1 + y2) / image_h - 1.0
    return code


def clipped_box(center_x: float, center_y: float, half_w: float, half_h: float, image_w: int, image_h: int):
    corners = (
        max(center_x - half_w, 0.0),
        max(center_y - half_h, 0.0),
        min(center_x + half_w, image_w - 1.0),
        min(center_y + half_h, image_h - 1.0),
    )
    return [round(float(corner), 2) for corner in corners]


def sample_object(rng: np.random.Generator, image_w: int, image_h: int) -> dict:
    region = {"kind": "object"}
    for name, values in ATTRIBUTE_VALUES.items():
        region[name] = values[rng.integers(len(values))]
    half_extent = OBJECT_HALF_EXTENT[region["size"]] * min(image_w, image_h) * rng.uniform(0.8, 1.2, size=2)
    center_x, center_y = rng.uniform(0.1, 0.9, size=2) * (image_w, image_h)
    region["bbox"] = clipped_box(center_x, center_y, *half_extent, image_w, image_h)
    return region


def sample_background(rng: np.random.Generator, image_w: int, image_h: int) -> dict:
    # Table tops, walls and floors: large boxes that hold no object.
    half_w, half_h = rng.uniform(0.15, 0.5, size=2) * (image_w, image_h)
    center_x, center_y = rng.uniform(0.25, 0.75, size=2) * (image_w, image_h)
    return {"kind": "background", "bbox": clipped_box(center_x, center_y, half_w, half_h, image_w, image_h)}


def sample_scene(rng: np.random.Generator, image_id: int, split: str) -> dict:
    image_w, image_h = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    num_objects = MIN_OBJECTS + rng.choice(len(NUM_OBJECTS_PROBABILITIES), p=NUM_OBJECTS_PROBABILITIES)
    num_background = rng.integers(MIN_BACKGROUND_REGIONS, MAX_BACKGROUND_REGIONS + 1)
    regions = [sample_object(rng, image_w, image_h) for _ in range(num_objects)]
    regions += [sample_background(rng, image_w, image_h) for _ in range(num_background)]
    # Real region features come in detector order, not grouped by kind.
    shuffled_regions = [regions[index] for index in rng.permutation(len(regions))]
    return {
        "image_id": image_id,
        "split": split,
        "image_w": image_w,
        "image_h": image_h,
        "regions": shuffled_regions,
    }


def scene_objects(scene: dict) -> list[dict]:
    return [region for region in scene["regions"] if region["kind"] == "object"]


def describe(description: dict[str, str], plural: bool) -> str:
    """Noun phrase for attribute constraints, e.g. `{"size": "large", "shape": "ball"}` -> "large ball"."""
    words = [description[name] for name in ("size", "color", "material") if name in description]
    noun = description.get("shape", "object")
    words.append(PLURAL_NOUNS[noun] if plural else noun)
    return " ".join(words)


def matches(region: dict, description: dict[str, str]) -> bool:
    return all(region[name] == value for name, value in description.items())


def sample_description(rng: np.random.Generator, objects: list[dict], sizes: tuple[int, int]) -> dict:
    """Constraints on a random subset of attributes, taken from a scene object half of the time, so that
    descriptions of present and of absent objects are both frequent."""
    names = list(ATTRIBUTE_VALUES)
    chosen_names = [names[index] for index in rng.permutation(len(names))[: rng.integers(sizes[0], sizes[1] + 1)]]
    if rng.random() < 0.5:
        source = objects[rng.integers(len(objects))]
        return {name: source[name] for name in chosen_names}
    return {name: ATTRIBUTE_VALUES[name][rng.integers(len(ATTRIBUTE_VALUES[name]))] for name in chosen_names}


def sample_existence_question(rng: np.random.Generator, objects: list[dict]) -> ToyQuestion:
    template, question_type, plural = EXISTENCE_TEMPLATES[rng.integers(len(EXISTENCE_TEMPLATES))]
    description = sample_description(rng, objects, EXISTENCE_DESCRIPTION_SIZES)
    answer = "yes" if any(matches(region, description) for region in objects) else "no"
    return ToyQuestion(template.format(describe(description, plural)), question_type, "yes/no", answer, YES_NO_ANSWERS)


def sample_count_question(rng: np.random.Generator, objects: list[dict]) -> ToyQuestion:
    template, question_type = COUNT_TEMPLATES[rng.integers(len(COUNT_TEMPLATES))]
    description = sample_description(rng, objects, COUNT_DESCRIPTION_SIZES)
    answer = str(sum(matches(region, description) for region in objects))
    return ToyQuestion(template.format(describe(description, True)), question_type, "number", answer, COUNT_ANSWERS)


def sample_query_question(rng: np.random.Generator, objects: list[dict]) -> ToyQuestion | None:
    """Asks an attribute of one object, referred to by other attributes that single it out; None when the
    drawn object cannot be singled out without naming the asked attribute."""
    queried_name = list(QUERY_TEMPLATES)[rng.integers(len(QUERY_TEMPLATES))]
    target = objects[rng.integers(len(objects))]
    other_names = [name for name in ATTRIBUTE_VALUES if name != queried_name]
    smallest, largest = QUERY_REFERENCE_SIZES
    subsets = [subset for size in range(smallest, largest + 1) for subset in itertools.combinations(other_names, size)]
    for subset_index in rng.permutation(len(subsets)):
        description = {name: target[name] for name in subsets[subset_index]}
        if sum(matches(region, description) for region in objects) == 1:
            template, question_type = QUERY_TEMPLATES[queried_name]
            text = template.format(describe(description, False))
            return ToyQuestion(text, question_type, "other", target[queried_name], ATTRIBUTE_VALUES[queried_name])
    return None


QUESTION_SAMPLERS = {
    "yes/no": sample_existence_question,
    "number": sample_count_question,
    "other": sample_query_question,
}


class AnswerBalancer:
    """Keeps, among candidate questions, the one whose answer is the most under-represented so far for its
    text, so that the text of a question predicts its answer as little as possible (as VQA-v2 balanced its
    answers with complementary images)."""

    def __init__(self):
        self.answer_counts: dict[str, Counter] = {}

    def excess(self, question: ToyQuestion) -> float:
        counts = self.answer_counts.get(question.text, Counter())
        return counts[question.answer] - counts.total() / len(question.possible_answers)

    def pick(self, candidates: list[ToyQuestion]) -> ToyQuestion:
        chosen = min(candidates, key=self.excess)
        self.answer_counts.setdefault(chosen.text, Counter())[chosen.answer] += 1
        return chosen


def sample_questions(
    rng: np.random.Generator, scene: dict, num_questions: int, balancer: AnswerBalancer
) -> list[ToyQuestion]:
    objects = scene_objects(scene)
    answer_types = list(ANSWER_TYPE_PROBABILITIES)
    questions = []
    while len(questions) < num_questions:
        answer_type = answer_types[rng.choice(len(answer_types), p=list(ANSWER_TYPE_PROBABILITIES.values()))]
        asked = {question.text for question in questions}
        candidates = [QUESTION_SAMPLERS[answer_type](rng, objects) for _ in range(NUM_CANDIDATE_QUESTIONS)]
        candidates = [question for question in candidates if question is not None and question.text not in asked]
        # An empty draw (an object with an identical twin, or only repeats) is retried with a new answer type.
        if candidates:
            questions.append(balancer.pick(candidates))
    return questions


def wrong_answers(question: ToyQuestion) -> list[str]:
    """Plausible mistakes: a neighbouring count, or another answer of the same template."""
    if question.answer_type == "number":
        count = int(question.answer)
        return [str(neighbour) for neighbour in (count - 1, count + 1) if 0 <= neighbour <= MAX_OBJECTS]
    return [answer for answer in question.possible_answers if answer != question.answer]


def annotate(rng: np.random.Generator, question: ToyQuestion, annotator_accuracy: float) -> list[dict]:
    answers = [question.answer] * NUM_ANNOTATORS
    num_wrong = min(rng.binomial(NUM_ANNOTATORS, 1.0 - annotator_accuracy), MAX_WRONG_ANNOTATORS)
    mistakes = wrong_answers(question)
    for annotator in rng.choice(NUM_ANNOTATORS, size=num_wrong, replace=False):
        answers[annotator] = mistakes[rng.integers(len(mistakes))]
    confidences = rng.choice(len(ANSWER_CONFIDENCES), size=NUM_ANNOTATORS, p=ANSWER_CONFIDENCE_PROBABILITIES)
    return [
        {"answer": answer, "answer_confidence": ANSWER_CONFIDENCES[confidence], "answer_id": answer_id}
        for answer_id, (answer, confidence) in enumerate(zip(answers, confidences), start=1)
    ]


def questions_file(data_subtype: str, questions: list[dict]) -> dict:
    return {
        "info": VQA_INFO,
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": VQA_LICENSE,
        "data_subtype": data_subtype,
        "questions": questions,
    }


def annotations_file(data_subtype: str, annotations: list[dict]) -> dict:
    return {
        "info": VQA_INFO,
        "license": VQA_LICENSE,
        "data_type": "mscoco",
        "data_subtype": data_subtype,
        "annotations": annotations,
    }


def write_json(path: Path, content: dict):
    # `json.dumps` encodes in C, `json.dump` to a file in Python: several times slower on 100,000 questions.
    path.write_text(json.dumps(content))


def make_region_projection(seed: int, feature_size: int) -> np.ndarray:
    """One random direction of about unit length per code slot (see the module docstring for why unit length)."""
    rng = np.random.default_rng([seed, PROJECTION_STREAM])
    return (rng.standard_normal((NUM_REGION_CODES, feature_size)) / np.sqrt(feature_size)).astype(np.float32)


_worker_projection: np.ndarray | None = None


def _init_feature_worker(projection: np.ndarray):
    global _worker_projection
    _worker_projection = projection


def write_region_features(task: tuple) -> None:
    """Writes one image's `.npz` the way the original release ships bottom-up features: `x` is (feature_size,
    num_regions), the transpose of the region features."""
    path, seed, feature_noise, scene = task
    codes = np.stack([region_code(region, scene["image_w"], scene["image_h"]) for region in scene["regions"]])
    noise_rng = np.random.default_rng([seed, FEATURE_NOISE_STREAM, scene["image_id"]])
    features = codes @ _worker_projection
    noise_scale = feature_noise / np.sqrt(features.shape[1])
    features += noise_scale * noise_rng.standard_normal(features.shape, dtype=np.float32)
    np.savez(
        path,
        x=np.ascontiguousarray(features.T),
        bbox=np.array([region["bbox"] for region in scene["regions"]], dtype=np.float32),
        num_bbox=np.array(len(scene["regions"])),
        image_h=np.array(scene["image_h"]),
        image_w=np.array(scene["image_w"]),
    )


def write_all_region_features(tasks, projection: np.ndarray, num_proc: int):
    if num_proc == 1:
        _init_feature_worker(projection)
        for task in tasks:
            write_region_features(task)
        return
    with multiprocessing.Pool(num_proc, initializer=_init_feature_worker, initargs=(projection,)) as pool:
        # Consuming the results lazily keeps memory flat however many images there are.
        for _ in pool.imap_unordered(write_region_features, tasks, chunksize=64):
            pass


def validate_arguments(
    seed, num_images, feature_size, questions_per_image, num_proc, annotator_accuracy, feature_noise
):
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    if not MIN_NUM_IMAGES <= num_images <= MAX_IMAGE_ID:
        raise ValueError(
            f"num_images must be between {MIN_NUM_IMAGES} and {MAX_IMAGE_ID} so that every split gets "
            f"images, got {num_images}."
        )
    if feature_size < NUM_REGION_CODES:
        raise ValueError(
            f"feature_size must be at least {NUM_REGION_CODES} (the size of a region's attribute code) for "
            f"the features to hold the scene, got {feature_size}."
        )
    if not 1 <= questions_per_image <= MAX_QUESTIONS_PER_IMAGE:
        raise ValueError(
            f"questions_per_image must be between 1 and {MAX_QUESTIONS_PER_IMAGE}, got {questions_per_image}."
        )
    if num_proc < 1:
        raise ValueError(f"num_proc must be at least 1, got {num_proc}.")
    if not 0.0 < annotator_accuracy <= 1.0:
        raise ValueError(f"annotator_accuracy must be in (0, 1], got {annotator_accuracy}.")
    if not (math.isfinite(feature_noise) and feature_noise >= 0.0):
        raise ValueError(f"feature_noise must be finite and non-negative, got {feature_noise}.")


def prepare_output_dir(output_dir: Path, overwrite: bool):
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} exists and is not a directory.")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output_dir {output_dir} is not empty; pass overwrite=True (--overwrite) to replace its data set."
            )
        # The folders have the names of real VQA data (prepare_vqa.py reads both from one data root): only a toy
        # set, which its scenes file (or, while it is written, the unfinished marker) marks, is deleted.
        toy_markers = (output_dir / SCENES_FILE, output_dir / UNFINISHED_MARKER)
        if not any(marker.is_file() for marker in toy_markers):
            held = sorted(path.name + ("/" if path.is_dir() else "") for path in output_dir.iterdir())
            # A folder of feature files holds many thousands.
            named = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise FileExistsError(
                f"output_dir {output_dir} holds {named} but no {SCENES_FILE} or {UNFINISHED_MARKER}: it "
                "is not a toy set this script made (real VQA data or a prepared data set, say), and --overwrite "
                "replaces only toy sets. Choose another output_dir, or empty it by hand."
            )
        # Stale feature files would be picked up by the loaders, which glob the feature folders.
        for path in (output_dir / "vqa", output_dir / "coco_extract", *toy_markers):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / UNFINISHED_MARKER).touch()
    for split in SPLIT_FRACTIONS:
        (output_dir / "coco_extract" / split).mkdir(parents=True)
    (output_dir / "vqa").mkdir()


def make_toy_vqa(
    output_dir: str | Path,
    seed: int = 0,
    num_images: int = 2000,
    feature_size: int = 2048,
    questions_per_image: int = 5,
    num_proc: int = 1,
    annotator_accuracy: float = 0.9,
    feature_noise: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """
    Writes a synthetic VQA data set in the raw formats of VQA-v2 (questions and annotations) and of the
    original RWSAN release (one bottom-up feature `.npz` per image), deterministically for a seed.

    Args:
        output_dir (`str` or `Path`):
            Folder that receives `vqa/`, `coco_extract/` and `toy_scenes.json`; created when missing, and
            must be empty unless `overwrite` is set.
        seed (`int`, *optional*, defaults to 0):
            Fixes the scenes, questions, annotator answers, feature projection and feature noise.
        num_images (`int`, *optional*, defaults to 2000):
            Images in all, split 70% / 15% / 15% into train2014, val2014 and test2015; half the test2015
            images (with all their questions) form test-dev2015.
        feature_size (`int`, *optional*, defaults to 2048):
            Size of a region feature (2048 in the real bottom-up features).
        questions_per_image (`int`, *optional*, defaults to 5):
            Distinct questions per image; question `k` of image `i` has id `i * 1000 + k`, as in VQA-v2.
        num_proc (`int`, *optional*, defaults to 1):
            Processes that write the feature files; the output does not depend on it.
        annotator_accuracy (`float`, *optional*, defaults to 0.9):
            Probability that one of the 10 annotators gives the true answer (at most 4 of them err, so the
            most common answer is always the true one).
        feature_noise (`float`, *optional*, defaults to 0.5):
            Length of the Gaussian noise vector added to a region's feature, relative to one attribute's
            direction (each value gets noise of standard deviation `feature_noise / sqrt(feature_size)`).
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace the toy set in a non-empty `output_dir` (its `vqa/`, `coco_extract/` and
            `toy_scenes.json`, or `toy_vqa.unfinished` where writing it was stopped). A folder with `vqa/` or
            `coco_extract/` but neither marker (real VQA data, say) is refused.

    Returns:
        `Path`: `output_dir`.
    """
    validate_arguments(seed, num_images, feature_size, questions_per_image, num_proc, annotator_accuracy, feature_noise)
    output_dir = Path(output_dir)
    prepare_output_dir(output_dir, overwrite)

    rng = np.random.default_rng([seed, SCENE_STREAM])
    image_ids = rng.choice(np.arange(1, MAX_IMAGE_ID + 1), size=num_images, replace=False).tolist()
    split_image_ids, start = {}, 0
    for split, size in split_sizes(num_images).items():
        split_image_ids[split] = sorted(image_ids[start : start + size])
        start += size

    balancer = AnswerBalancer()
    scenes, questions, annotations = [], {}, {}
    for split, ids in split_image_ids.items():
        questions[split], annotations[split] = [], []
        for image_id in ids:
            scene = sample_scene(rng, image_id, split)
            scenes.append(scene)
            for index, question in enumerate(sample_questions(rng, scene, questions_per_image, balancer)):
                question_id = image_id * 1000 + index
                questions[split].append({"image_id": image_id, "question": question.text, "question_id": question_id})
                answers = annotate(rng, question, annotator_accuracy)
                annotations[split].append(
                    {
                        "question_type": question.question_type,
                        "multiple_choice_answer": Counter(entry["answer"] for entry in answers).most_common(1)[0][0],
                        "answers": answers,
                        "image_id": image_id,
                        "answer_type": question.answer_type,
                        "question_id": question_id,
                    }
                )

    test_ids = split_image_ids[TEST_SPLIT]
    num_test_dev = max(1, round(len(test_ids) * TEST_DEV_FRACTION))
    test_dev_ids = set(rng.choice(test_ids, size=num_test_dev, replace=False).tolist())
    questions[TEST_DEV_SPLIT] = [entry for entry in questions[TEST_SPLIT] if entry["image_id"] in test_dev_ids]

    vqa_dir = output_dir / "vqa"
    for split, split_questions in questions.items():
        write_json(vqa_dir / f"v2_OpenEnded_mscoco_{split}_questions.json", questions_file(split, split_questions))
    for split in ANNOTATED_SPLITS:
        write_json(vqa_dir / f"v2_mscoco_{split}_annotations.json", annotations_file(split, annotations[split]))

    feature_dir = output_dir / "coco_extract"
    tasks = (
        (
            feature_dir / scene["split"] / image_file_name(scene["split"], scene["image_id"]),
            seed,
            feature_noise,
            scene,
        )
        for scene in scenes
    )
    write_all_region_features(tasks, make_region_projection(seed, feature_size), num_proc)
    write_json(output_dir / SCENES_FILE, {"seed": seed, "feature_size": feature_size, "scenes": scenes})
    (output_dir / UNFINISHED_MARKER).unlink()
    return output_dir


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """A script's docstring as written (its commands keep their lines), and every option's default; train_vqa.py
    uses it too."""


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder that receives vqa/ and coco_extract/.")
    parser.add_argument("--seed", type=int, default=0, help="Fixes the whole set (non-negative).")
    parser.add_argument(
        "--num_images",
        type=int,
        default=2000,
        help=f"Images in all ({MIN_NUM_IMAGES} to {MAX_IMAGE_ID}), split 70/15/15 into train, val and test.",
    )
    parser.add_argument(
        "--feature_size",
        type=int,
        default=2048,
        help=f"Values of a region feature (at least {NUM_REGION_CODES}; 2048 in the real features).",
    )
    parser.add_argument(
        "--questions_per_image",
        type=int,
        default=5,
        help=f"Distinct questions per image (1 to {MAX_QUESTIONS_PER_IMAGE}; train_vqa.py's toy set has 20).",
    )
    parser.add_argument("--num_proc", type=int, default=1, help="Processes that write the feature files.")
    parser.add_argument(
        "--annotator_accuracy",
        type=float,
        default=0.9,
        help="Probability that an annotator gives the true answer, in (0, 1] (at most 4 of the 10 err).",
    )
    parser.add_argument(
        "--feature_noise",
        type=float,
        default=0.5,
        help="Length of the noise added to a region's feature, relative to one attribute's direction (>= 0).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace the toy set in a non-empty output_dir.")
    args = parser.parse_args(argv)
    try:
        output_dir = make_toy_vqa(
            args.output_dir,
            seed=args.seed,
            num_images=args.num_images,
            feature_size=args.feature_size,
            questions_per_image=args.questions_per_image,
            num_proc=args.num_proc,
            annotator_accuracy=args.annotator_accuracy,
            feature_noise=args.feature_noise,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as error:
        parser.error(str(error))
    num_questions = args.num_images * args.questions_per_image
    print(f"Wrote {args.num_images} images and {num_questions} questions to {output_dir}")


if __name__ == "__main__":
    main()
