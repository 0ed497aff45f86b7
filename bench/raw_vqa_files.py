"""Writes random VQA data in the original release's raw formats, for the benchmarks that prepare and load it:
one `.npz` per image (`x` float32 (feature_size, num_regions), as the release ships bottom-up features) and the
VQA-v2 train question and annotation files."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

NUM_ANNOTATORS = 10
# Bottom-up-attention features keep 10 to 100 regions per image.
MIN_REGIONS, MAX_REGIONS = 10, 100


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


def generate_once(raw_dir: Path, settings: dict, write: Callable[[Path], None], prepared_dir: Path) -> bool:
    """Writes raw data into `raw_dir` with `write(folder)`, unless it holds data generated with the same `settings`
    (kept in its settings.json); returns whether it wrote. Data of other or unrecorded settings stops the run
    (`SystemExit`): a benchmark must not time it as its own. Where it writes, `prepared_dir`, made from earlier raw
    data, is removed. The data is written aside and renamed when whole, so that a stopped run leaves nothing to be
    taken for it."""
    if raw_dir.exists():
        settings_path = raw_dir / "settings.json"
        if not settings_path.exists():
            raise SystemExit(
                f"error: {raw_dir.parent} holds data whose settings were not recorded (made before they were): "
                "remove it, or give another --dataset_dir"
            )
        kept = json.loads(settings_path.read_text())
        if kept != settings:
            raise SystemExit(
                f"error: {raw_dir.parent} holds data generated with {kept}, not {settings}: give those options, "
                "another --dataset_dir, or remove it"
            )
        return False
    shutil.rmtree(prepared_dir, ignore_errors=True)
    partial_dir = raw_dir.with_name(f"{raw_dir.name}.partial")
    shutil.rmtree(partial_dir, ignore_errors=True)
    write(partial_dir)
    (partial_dir / "settings.json").write_text(json.dumps(settings) + "\n")
    partial_dir.rename(raw_dir)
    return True
