"""Writes random VQA data in the original release's raw formats, for the benchmarks that prepare and load it:
one `.npz` per image (`x` float32 (feature_size, num_regions), as the release ships bottom-up features) and the
VQA-v2 train question and annotation files."""

import json
from pathlib import Path

import numpy as np

NUM_ANNOTATORS = 10


def write_random_image(
    features_dir: Path, image_id: int, num_regions: int, feature_size: int, rng: np.random.Generator
):
    """A 640x480 image of `num_regions` uniform random features and boxes."""
    np.savez(
        features_dir / f"COCO_train2014_{image_id:012d}.jpg.npz",
        x=rng.random((feature_size, num_regions), dtype=np.float32),
        bbox=rng.random((num_regions, 4), dtype=np.float32) * 400,
        num_bbox=np.array(num_regions),
        image_h=np.array(480),
        image_w=np.array(640),
    )


def annotation(question_id: int, image_id: int, given: list[str], multiple_choice_answer: str) -> dict:
    """A VQA-v2 annotation whose annotators gave the answers `given`."""
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": "what",
        "answer_type": "other",
        "multiple_choice_answer": multiple_choice_answer,
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": position + 1}
            for position, answer in enumerate(given)
        ],
    }


def write_train_split(root: Path, questions: list[dict], annotations: list[dict]):
    (root / "vqa").mkdir()
    (root / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "vqa" / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
