"""Shared fixtures: a tiny raw VQA set in the official file formats (`raw_vqa_dir`), a small prepared toy set
(`tiny_prepared_vqa`), and CUDA graph recording emulated on the CPU (`emulated_cuda_graphs`)."""

import contextlib
import json
import os
from pathlib import Path

# No test may reach the network: every library that asks the hub is told it is offline (and answers at once), before
# any of them is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (`make test`) each worker, and each process it starts, gets its share of the cores: OpenMP
# threads spin-waiting on a core another worker uses slow both down many times over. Set before torch is imported.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np
import pytest
import torch

RAW_FEATURE_SIZE = 6
# bfloat16 keeps 8 bits of mantissa: logits of magnitude ~1 agree to a few units of 2**-8 after the whole network
# (about 0.013 on the tiny models).
BF16_TOLERANCE = {"atol": 3e-2, "rtol": 2e-2}
TINY_FEATURE_SIZE = 32
# image id -> number of regions, per COCO feature folder
RAW_IMAGES = {
    "train2014": {9: 3, 25: 1, 30: 5, 42: 2, 49: 4, 61: 3, 72: 2, 77: 6},
    "val2014": {133: 2, 164: 4, 192: 1, 196: 3},
    "test2015": {1: 2, 19: 5, 57: 3},
}
# (question, multiple-choice answer) of the three questions of each train / val image
TRAIN_QUESTIONS = (
    ("What color is the car?", "red"),
    ("Is this a cat?", "yes"),
    ("How many dogs are there?", "2"),
)
VAL_QUESTIONS = (
    ("What color is the bus?", "red"),
    ("Is it raining?", "no"),
    ("How many dogs are there?", "2"),
)
TEST_QUESTIONS = ("Is the sky blue?",)
# test-dev questions are a subset of test2015 in the real data; this one is not, to show it is not in the
# question vocabulary
TEST_DEV_QUESTIONS = ("Where is the zebra?",)
VG_QUESTIONS = (("Why is the man smiling?", "yes"),)
# Every annotated question gets its multiple-choice answer from five annotators, "Two" from two and "blue"
# from three.
OTHER_ANNOTATOR_ANSWERS = ["Two"] * 2 + ["blue"] * 3


def coco_file_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg.npz"


def raw_region_features(image_id: int, num_regions: int) -> np.ndarray:
    """The (num_regions, RAW_FEATURE_SIZE) float32 features of a raw image, exact in float16."""
    rng = np.random.default_rng(image_id)
    return (rng.integers(-2048, 2048, size=(num_regions, RAW_FEATURE_SIZE)) / 256).astype(np.float32)


def raw_boxes(image_id: int, num_regions: int) -> np.ndarray:
    return np.arange(num_regions * 4, dtype=np.float32).reshape(num_regions, 4) + image_id


def write_npz(path: Path, features: np.ndarray, boxes: np.ndarray, regions_first: bool = False):
    """An image's features as the original ships them: `x` is (feature_size, num_regions) unless
    `regions_first`."""
    np.savez(
        path,
        x=features if regions_first else features.T,
        bbox=boxes,
        num_bbox=np.array(len(boxes)),
        image_h=np.array(480),
        image_w=np.array(640),
    )


def write_json(path: Path, content: dict):
    path.write_text(json.dumps(content))


def _annotated(questions: list[dict], answers: list[str]) -> list[dict]:
    return [
        {
            "question_id": question["question_id"],
            "image_id": question["image_id"],
            "question_type": " ".join(question["question"].lower().split()[:2]),
            "answer_type": "yes/no" if answer in ("yes", "no") else "other",
            "multiple_choice_answer": answer,
            "answers": [
                {"answer": given, "answer_confidence": "yes", "answer_id": position + 1}
                for position, given in enumerate([answer] * 5 + OTHER_ANNOTATOR_ANSWERS)
            ],
        }
        for question, answer in zip(questions, answers)
    ]


def write_raw_vqa(root: Path) -> Path:
    """Writes the tiny raw VQA set under `root` (vqa/ and coco_extract/) and returns `root`."""
    vqa_dir = root / "vqa"
    vqa_dir.mkdir(parents=True)
    for folder, images in RAW_IMAGES.items():
        (root / "coco_extract" / folder).mkdir(parents=True)
        for image_id, num_regions in images.items():
            write_npz(
                root / "coco_extract" / folder / coco_file_name(folder, image_id),
                raw_region_features(image_id, num_regions),
                raw_boxes(image_id, num_regions),
            )

    def questions_of(images, templates, question_id_base=0):
        return [
            {
                "image_id": image_id,
                "question": question,
                "question_id": question_id_base + image_id * 10 + position,
            }
            for image_id in images
            for position, question in enumerate(templates)
        ]

    for split, folder, templates in (
        ("train2014", "train2014", TRAIN_QUESTIONS),
        ("val2014", "val2014", VAL_QUESTIONS),
    ):
        questions = questions_of(RAW_IMAGES[folder], [question for question, _ in templates])
        answers = [answer for _ in RAW_IMAGES[folder] for _, answer in templates]
        write_json(vqa_dir / f"v2_OpenEnded_mscoco_{split}_questions.json", {"questions": questions})
        write_json(vqa_dir / f"v2_mscoco_{split}_annotations.json", {"annotations": _annotated(questions, answers)})
    write_json(
        vqa_dir / "v2_OpenEnded_mscoco_test2015_questions.json",
        {"questions": questions_of(RAW_IMAGES["test2015"], TEST_QUESTIONS)},
    )
    write_json(
        vqa_dir / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        {"questions": questions_of([19], TEST_DEV_QUESTIONS, question_id_base=5)},
    )
    vg_questions = questions_of([25, 133], [question for question, _ in VG_QUESTIONS], question_id_base=10**6)
    write_json(vqa_dir / "VG_questions.json", {"questions": vg_questions})
    write_json(
        vqa_dir / "VG_annotations.json",
        {"annotations": _annotated(vg_questions, [VG_QUESTIONS[0][1]] * len(vg_questions))},
    )
    return root


@pytest.fixture
def raw_vqa_dir(tmp_path) -> Path:
    """A tiny raw VQA set in the official formats: `vqa/` with the train, val, test2015, test-dev2015 and VG
    question files (and the annotations of train, val and VG), `coco_extract/{train2014,val2014,test2015}/`
    with one `.npz` per image (`x` (6, num_regions), as the original ships it)."""
    return write_raw_vqa(tmp_path / "datasets")


@pytest.fixture(scope="session")
def tiny_prepared_vqa(tmp_path_factory) -> Path:
    """The toy VQA set of data_scripts/make_toy_vqa.py (60 images: 210 train questions; feature size 32),
    prepared by data_scripts/prepare_vqa.py."""
    from data_scripts.make_toy_vqa import make_toy_vqa
    from data_scripts.prepare_vqa import prepare_vqa

    root = tmp_path_factory.mktemp("tiny_vqa")
    make_toy_vqa(root / "raw", seed=0, num_images=60, feature_size=TINY_FEATURE_SIZE)
    prepare_vqa(root / "raw", root / "prepared", feature_size=TINY_FEATURE_SIZE)
    return root / "prepared"


def _tensors(outputs) -> list[torch.Tensor]:
    """The tensors of nested tuples and lists, in order; None entries left out."""
    if isinstance(outputs, (tuple, list)):
        return [tensor for output in outputs for tensor in _tensors(output)]
    return [] if outputs is None else [outputs]


class EmulatedCUDAGraphRecorder:
    """`rwsan.training.CUDAGraphRecorder` emulated on the CPU: "capturing" runs the recorded call once to allocate
    its outputs and leaves the random generator as it found it (a capture launches nothing); "replaying" runs it
    again and writes its tensors into the recorded outputs, which is all a graph can do. Everything else of
    `CUDAGraphedFunction` and `GraphedForwardBackward` (warm-up, generators, gradients handed over) runs as it does
    on a GPU."""

    def check(self, device):
        pass

    def side_stream(self, device):
        return contextlib.nullcontext()

    def capture(self, recorded_call):
        with torch.random.fork_rng(devices=[]):
            outputs = recorded_call()

        def replay():
            new_outputs = recorded_call()
            for output, new_output in zip(_tensors(outputs), _tensors(new_outputs)):
                output.copy_(new_output)
            # What the eager call left behind (a backward's `.grad` attributes) a replay would not leave: the
            # owner of the recorded call (a `CUDAGraphedFunction`) undoes it.
            recorded_call.func.__self__.after_pass()

        return replay, outputs


@pytest.fixture
def emulated_cuda_graphs(monkeypatch):
    """CUDA graph recording emulated on the CPU (`EmulatedCUDAGraphRecorder`), to test everything around it where
    there is no GPU."""
    import rwsan.training

    monkeypatch.setattr(rwsan.training, "CUDAGraphRecorder", EmulatedCUDAGraphRecorder)
