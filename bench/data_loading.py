"""Batch assembly samples/s: prepared Arrow data through VQADataset + VQACollator, against a per-sample `.npz`
loader like the original's (np.load of the question's image file, transpose, pad to 100 regions, tokenize,
score the answers, for every question), on the same generated data, in one process.

    python bench/data_loading.py [--dataset_dir DIR] [--num_images 3000] [--feature_size 2048]

Generates a raw VQA set in the original's formats (train questions and annotations, one `.npz` per image
with 10-100 regions), prepares it with data_scripts/prepare_vqa.py, and times both loaders on shuffled batches
of 64 with `num_workers=0`. With --dataset_dir the data is kept there and reused by later runs; otherwise it
lives in a temporary folder.
"""

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # bench is a folder of the repository, not part of the installed package.
    sys.path.insert(0, str(REPO_ROOT))

from bench.arguments import require_at_least  # noqa: E402
from bench.raw_vqa_files import (  # noqa: E402
    MAX_REGIONS,
    MIN_REGIONS,
    NUM_ANNOTATORS,
    annotation,
    generate_once,
    write_random_image,
    write_train_split,
)
from rwsan.data import VQACollator, load_vqa_dataset  # noqa: E402
from rwsan.processing_rwsan import answer_scores, split_question  # noqa: E402

QUESTIONS_PER_IMAGE = 3
ANSWER_POOL = ("yes", "no", "1", "2", "3", "red", "blue", "white", "dog", "cat", "tennis", "pizza")
QUESTION_WORDS = (
    "what",
    "color",
    "is",
    "the",
    "how",
    "many",
    "dogs",
    "are",
    "there",
    "man",
    "holding",
    "this",
)
BATCH_SIZE = 64
# The original pads (and cuts) every image to this many regions and every question to this many words.
ORIGINAL_PADDED_REGIONS = 100
ORIGINAL_MAX_TOKENS = 16


def write_raw_vqa(root: Path, num_images: int, feature_size: int, seed: int = 0):
    """A random raw VQA train split: vqa/*.json, and coco_extract/train2014/*.npz with `x` float32
    (feature_size, num_regions)."""
    rng = np.random.default_rng(seed)
    features_dir = root / "coco_extract" / "train2014"
    features_dir.mkdir(parents=True)
    questions, annotations = [], []
    for image_id in range(1, num_images + 1):
        write_random_image(features_dir, image_id, int(rng.integers(MIN_REGIONS, MAX_REGIONS + 1)), feature_size, rng)
        for position in range(QUESTIONS_PER_IMAGE):
            question_id = image_id * 10 + position
            words = rng.choice(QUESTION_WORDS, size=int(rng.integers(4, 12)))
            given = rng.choice(ANSWER_POOL, size=NUM_ANNOTATORS)
            questions.append(
                {
                    "image_id": image_id,
                    "question": " ".join(words).capitalize() + "?",
                    "question_id": question_id,
                }
            )
            annotations.append(annotation(question_id, image_id, list(given), Counter(given).most_common(1)[0][0]))
    write_train_split(root, questions, annotations)


class OriginalStyleDataset(torch.utils.data.Dataset):
    """The original's training `DataSet.__getitem__` (data/load_data.py): every question reads its image's
    `.npz`, transposes and pads it to 100 regions, and tokenizes the question and scores the answers anew."""

    def __init__(self, raw_dir: Path, processor):
        self.questions = json.loads((raw_dir / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())
        self.annotations = json.loads((raw_dir / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())
        self.question_of = {question["question_id"]: question for question in self.questions["questions"]}
        self.features_dir = raw_dir / "coco_extract" / "train2014"
        self.token_to_ix = processor.tokenizer.get_vocab()
        self.ans_to_ix = processor.label2id

    def __len__(self) -> int:
        return len(self.annotations["annotations"])

    def __getitem__(self, index: int):
        annotation = self.annotations["annotations"][index]
        question = self.question_of[annotation["question_id"]]
        path = self.features_dir / f"COCO_train2014_{annotation['image_id']:012d}.jpg.npz"
        image_features = np.load(path)["x"].transpose((1, 0))[:ORIGINAL_PADDED_REGIONS]
        image_features = np.pad(image_features, ((0, ORIGINAL_PADDED_REGIONS - len(image_features)), (0, 0)))

        input_ids = np.zeros(ORIGINAL_MAX_TOKENS, np.int64)
        words = split_question(question["question"])[:ORIGINAL_MAX_TOKENS]
        input_ids[: len(words)] = [self.token_to_ix.get(word, 1) for word in words]

        labels = np.zeros(len(self.ans_to_ix), np.float32)
        for answer_id, score in answer_scores(
            [given["answer"] for given in annotation["answers"]], self.ans_to_ix
        ).items():
            labels[answer_id] = score
        return torch.from_numpy(image_features), torch.from_numpy(input_ids), torch.from_numpy(labels)


def epochs(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


def samples_per_second(loader: torch.utils.data.DataLoader, num_batches: int) -> float:
    batches = epochs(loader)
    next(batches)  # the first batch pays for starting the iterator
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * loader.batch_size / (time.perf_counter() - start)


def prepare(raw_dir: Path, prepared_dir: Path, num_proc: int, feature_size: int) -> tuple[float, float]:
    """Runs data_scripts/prepare_vqa.py; returns its wall time (s) and peak RSS (MiB, largest process)."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "data_scripts" / "prepare_vqa.py"),
            *("--data_root", str(raw_dir), "--output_dir", str(prepared_dir)),
            *("--num_proc", str(num_proc), "--feature_size", str(feature_size)),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run(dataset_dir: Path, args) -> dict[str, float]:
    raw_dir, prepared_dir = dataset_dir / "raw", dataset_dir / "prepared"
    start = time.perf_counter()
    settings = {"num_images": args.num_images, "feature_size": args.feature_size}
    writer = functools.partial(write_raw_vqa, num_images=args.num_images, feature_size=args.feature_size)
    if generate_once(raw_dir, settings, writer, prepared_dir):
        print(f"generated {args.num_images} raw images in {time.perf_counter() - start:.1f} s")
    if not prepared_dir.exists():
        seconds, peak_rss = prepare(raw_dir, prepared_dir, args.num_proc, args.feature_size)
        print(f"prepared them in {seconds:.1f} s ({args.num_proc} processes, peak RSS {peak_rss:.0f} MiB)")

    dataset = load_vqa_dataset(prepared_dir, "train")
    generator = torch.Generator().manual_seed(0)
    ours = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=generator,
        collate_fn=VQACollator(dataset.num_answers),
        drop_last=True,
    )
    original = torch.utils.data.DataLoader(
        OriginalStyleDataset(raw_dir, dataset.processor),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=generator,
        drop_last=True,
    )
    ours_rate = samples_per_second(ours, args.batches)
    original_rate = samples_per_second(original, args.original_batches)
    print(f"VQADataset + VQACollator:     {ours_rate:10,.0f} samples/s")
    print(f"per-sample .npz (original):   {original_rate:10,.0f} samples/s")
    print(f"ratio:                        {ours_rate / original_rate:10.1f} x")
    return {"ours": ours_rate, "original": original_rate}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", type=Path, default=None, help="Keep (and reuse) the data here.")
    parser.add_argument("--num_images", type=int, default=3000)
    parser.add_argument("--feature_size", type=int, default=2048)
    parser.add_argument("--num_proc", type=int, default=2, help="Processes of the preparation.")
    parser.add_argument("--batches", type=int, default=500, help="Batches timed for VQADataset.")
    parser.add_argument("--original_batches", type=int, default=30, help="Batches timed for the npz loader.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (DataLoader workers use 1, as does this default)."
    )
    args = parser.parse_args(argv)
    require_at_least(
        parser, args, 1, "num_images", "feature_size", "num_proc", "batches", "original_batches", "threads"
    )
    if args.num_images * QUESTIONS_PER_IMAGE < BATCH_SIZE:
        # Both loaders drop the last partial batch: with fewer questions than a batch there is none to time.
        parser.error(
            f"--num_images must be at least {-(-BATCH_SIZE // QUESTIONS_PER_IMAGE)}: {QUESTIONS_PER_IMAGE} questions "
            f"an image must make one batch of {BATCH_SIZE}, got {args.num_images}"
        )
    # The collation copies are memory-bound; on a busy 2-core machine more threads only add contention (the
    # original-style batches took seconds to stack with the default thread count).
    torch.set_num_threads(args.threads)
    if args.dataset_dir is not None:
        return run(args.dataset_dir, args)
    with tempfile.TemporaryDirectory() as dataset_dir:
        return run(Path(dataset_dir), args)


if __name__ == "__main__":
    main()
