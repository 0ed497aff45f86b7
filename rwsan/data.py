"""Reads the VQA data prepared by `data_scripts/prepare_vqa.py` and batches it for RWSAN.

The region features stay in the memory-mapped Arrow files of `images/`: a question refers to its image by row,
and fetching a batch is a few numpy slices of those files, copied once into the padded batch by the collator.
"""

import hashlib
import json
import math
import operator
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import load_from_disk
from torch.utils.data import get_worker_info

from .processing_rwsan import RWSANProcessor, check_positive_int

PREPARED_DATASET_PARTS = ("images", "questions", "processor")


def vocabulary_fingerprint(processor: RWSANProcessor) -> str:
    """A digest of the processor's question words and answers with their ids, which the prepared questions are
    written in: `prepare_vqa` records it in report.json, and `load_vqa_dataset` refuses a processor/ without it."""
    vocabularies = {
        "question_words": sorted(processor.tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "answers": sorted((int(answer_id), answer) for answer_id, answer in (processor.id2label or {}).items()),
    }
    return hashlib.sha256(json.dumps(vocabularies, ensure_ascii=False).encode("utf-8")).hexdigest()


def _flat_list_column(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The values of a list column as one flat array, and the `(num_rows + 1,)` offsets of each row in it."""
    combined = column.combine_chunks()
    offsets = combined.offsets.to_numpy().astype(np.int64)
    return combined.flatten().to_numpy(), offsets - offsets[0]


def _ragged_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions in the flat values of the given rows, concatenated, and how many belong to each row."""
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts
    ends_before = np.cumsum(counts) - counts
    return np.repeat(starts - ends_before, counts) + np.arange(counts.sum()), counts


class RegionFeatures:
    """Every image's `(num_regions, feature_size)` features as zero-copy numpy views of the memory-mapped
    Arrow record batches of `images/`."""

    def __init__(self, images: pa.Table):
        self.image_ids = images.column("image_id").to_numpy()
        features = images.column("features")
        self.feature_size = features.type.value_type.list_size
        self.blocks: list[np.ndarray] = []
        block_of_image, first_region, num_regions = [], [], []
        for chunk in features.chunks:
            offsets = chunk.offsets.to_numpy()
            # Two flattens give the chunk's own float values, wherever the record batch starts in the file.
            values = chunk.flatten().flatten().to_numpy(zero_copy_only=True)
            self.blocks.append(values.reshape(-1, self.feature_size))
            block_of_image.append(np.full(len(chunk), len(self.blocks) - 1))
            first_region.append(offsets[:-1] - offsets[0])
            num_regions.append(np.diff(offsets))
        self.block_of_image = np.concatenate(block_of_image).tolist()
        self.first_region = np.concatenate(first_region).tolist()
        self.num_regions = np.concatenate(num_regions)

    def of_image(self, image_index: int, max_regions: int) -> np.ndarray:
        """A read-only view of the image's first `max_regions` region features."""
        start = self.first_region[image_index]
        count = min(int(self.num_regions[image_index]), max_regions)
        return self.blocks[self.block_of_image[image_index]][start : start + count]


class VQADataset(torch.utils.data.Dataset):
    """Questions of one or more prepared splits joined to their images' region features.

    An item is a dict of numpy arrays named like the model's inputs: `input_ids` `(question_length,)` int64,
    `image_features` `(num_regions, feature_size)` in the stored dtype (a read-only view of the memory-mapped
    file), `labels` `(num_answers,)` float32 soft scores (annotated splits only), and `question_id`.
    `__getitems__` fetches a whole batch at once, for `torch.utils.data.DataLoader`; pad batches with
    [`VQACollator`]. Create with [`load_vqa_dataset`].
    """

    def __init__(self, folder: Path, splits: list[str], max_question_length: int | None, max_regions: int | None):
        self.folder = folder
        self.splits = splits
        try:
            self.processor = RWSANProcessor.from_pretrained(str(folder / "processor"))
        except (OSError, ValueError) as error:
            raise _damaged(folder / "processor", error) from error
        report = _read_report(folder)
        vocabularies = report.get("vocabularies")
        recorded = vocabularies.get("fingerprint") if isinstance(vocabularies, dict) else None
        if recorded is not None and recorded != vocabulary_fingerprint(self.processor):
            # Its tokens and answer ids would silently name other words and answers.
            raise ValueError(
                f"{folder / 'processor'} has other question words or answers than the questions of {folder} were "
                "prepared with: it comes from another preparation; prepare the dataset again or copy it whole"
            )
        # The cuts the data was prepared with, unless others are asked for.
        prepared = self.processor
        self.max_question_length = max_question_length or prepared.max_question_length
        self.max_regions = max_regions or prepared.max_regions
        if self.max_question_length > prepared.max_question_length:
            raise ValueError(
                f"The questions of {folder} were cut to {prepared.max_question_length} words when "
                f"prepared; prepare them again with --max_question_length {self.max_question_length} to keep more"
            )
        self._regions = RegionFeatures(_read_table(folder / "images"))
        self._questions = [_read_table(folder / "questions" / split) for split in splits]
        _check_question_counts(folder, report, splits, [table.num_rows for table in self._questions])
        annotated = ["label_ids" in table.column_names for table in self._questions]
        if len(set(annotated)) > 1:
            with_answers = [split for split, has_answers in zip(splits, annotated) if has_answers]
            without_answers = [split for split, has_answers in zip(splits, annotated) if not has_answers]
            raise ValueError(
                f"Cannot join splits with answers ({', '.join(with_answers)}) and without answers "
                f"({', '.join(without_answers)})"
            )
        self.has_answers = annotated[0]

        self.question_ids = self._column("question_id").to_numpy()
        self.image_ids = self._column("image_id").to_numpy()
        self._image_index = self._column("image_index").to_numpy()
        self._check_image_rows()
        self.num_regions = np.minimum(self._regions.num_regions[self._image_index], self.max_regions)
        self._input_ids, self._question_lengths = self._padded_input_ids()
        if self.has_answers:
            self._label_ids, self._label_scores, self._label_offsets = self._sparse_labels()

    def _check_image_rows(self):
        """Each question's image row must hold its image: an images/ folder cut short, or one of another
        preparation, would fail mid-epoch or, worse, give questions other images' features."""
        images = self.folder / "images"
        stored = self._regions.image_ids
        beyond = np.flatnonzero((self._image_index < 0) | (self._image_index >= len(stored)))
        if len(beyond):
            first = beyond[0]
            raise ValueError(
                f"{images} holds {len(stored)} images, but question {self.question_ids[first]} refers to its row "
                f"{self._image_index[first]}: images/ was cut short or comes from another preparation; prepare the "
                "dataset again or copy it whole"
            )
        mismatched = np.flatnonzero(stored[self._image_index] != self.image_ids)
        if len(mismatched):
            first = mismatched[0]
            raise ValueError(
                f"question {self.question_ids[first]} is about image {self.image_ids[first]}, but row "
                f"{self._image_index[first]} of {images} holds image {stored[self._image_index[first]]} "
                f"({len(mismatched)} questions so): images/ comes from another preparation; prepare the dataset again "
                "or copy it whole"
            )

    def _column(self, name: str) -> pa.ChunkedArray:
        """A question column over all the splits."""
        chunks = [chunk for table in self._questions for chunk in table.column(name).chunks]
        return pa.chunked_array(chunks, type=self._questions[0].schema.field(name).type)

    def _padded_input_ids(self) -> tuple[np.ndarray, np.ndarray]:
        values, offsets = _flat_list_column(self._column("input_ids"))
        lengths = np.minimum(np.diff(offsets), self.max_question_length)
        positions = np.arange(self.max_question_length)
        is_word = positions < lengths[:, None]
        input_ids = np.zeros((len(lengths), self.max_question_length), dtype=np.int64)
        input_ids[is_word] = values[(offsets[:-1, None] + positions)[is_word]]
        return input_ids, lengths

    def _sparse_labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        label_ids, offsets = _flat_list_column(self._column("label_ids"))
        label_scores, _ = _flat_list_column(self._column("label_scores"))
        return label_ids.astype(np.int64), label_scores, offsets

    def _require_answers(self, name: str):
        if not self.has_answers:
            raise ValueError(f"{name} is not known for the unannotated split {'+'.join(self.splits)}")

    @property
    def num_answers(self) -> int:
        return len(self.processor.id2label)

    @property
    def feature_size(self) -> int:
        return self._regions.feature_size

    @cached_property
    def questions(self) -> list[str]:
        return self._column("question").to_pylist()

    @cached_property
    def answers(self) -> list[list[str]]:
        """The annotators' answers of each question (the ground truth of the VQA accuracy)."""
        self._require_answers("answers")
        return self._column("answers").to_pylist()

    @cached_property
    def answer_types(self) -> list[str]:
        self._require_answers("answer_types")
        return self._column("answer_type").to_pylist()

    def __len__(self) -> int:
        return len(self.question_ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"question index {index} is out of range for {len(self)} questions")
        return self.__getitems__([index + len(self) if index < 0 else index])[0]

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"question indices must be in [0, {len(self)}), got {indices.tolist()}")
        labels = self._dense_labels(indices) if self.has_answers else None
        items = []
        for position, (question, image) in enumerate(zip(indices.tolist(), self._image_index[indices].tolist())):
            item = {
                "input_ids": self._input_ids[question, : self._question_lengths[question]],
                "image_features": self._regions.of_image(image, self.max_regions),
                "question_id": self.question_ids[question],
            }
            if labels is not None:
                item["labels"] = labels[position]
            items.append(item)
        return items

    def _dense_labels(self, indices: np.ndarray) -> np.ndarray:
        positions, counts = _ragged_rows(self._label_offsets, indices)
        labels = np.zeros((len(indices), self.num_answers), dtype=np.float32)
        labels[np.repeat(np.arange(len(indices)), counts), self._label_ids[positions]] = self._label_scores[positions]
        return labels

    def __reduce__(self):
        # DataLoader workers started with "spawn" reopen the memory-mapped files instead of receiving copies.
        return load_vqa_dataset, (
            self.folder,
            "+".join(self.splits),
            self.max_question_length,
            self.max_regions,
        )

    def __repr__(self) -> str:
        return (
            f"VQADataset(folder={str(self.folder)!r}, split={'+'.join(self.splits)!r}, "
            f"num_questions={len(self)}, max_question_length={self.max_question_length}, "
            f"max_regions={self.max_regions})"
        )


def load_vqa_dataset(
    folder: str | os.PathLike,
    split: str = "train+val+vg",
    max_question_length: int | None = None,
    max_regions: int | None = None,
) -> VQADataset:
    """Loads prepared VQA splits (`"train"`, `"train+val+vg"`, ...) of a folder written by
    `data_scripts/prepare_vqa.py`.

    Args:
        folder: the prepared folder (with images/, questions/ and processor/).
        split: split names joined with "+".
        max_question_length: questions are cut to this many words (at most the length used when preparing);
            default: that length (16 by default, as the original's).
        max_regions: images are cut to this many regions; default: the processor's when preparing (100 by
            default, as the original's).
    """
    folder = Path(folder)
    missing = [part for part in PREPARED_DATASET_PARTS if not (folder / part).is_dir()]
    if missing:
        raise ValueError(
            f"{folder} is not a prepared VQA dataset: it has no {', '.join(missing)} folder; create one with "
            "data_scripts/prepare_vqa.py"
        )
    for name, value in (("max_question_length", max_question_length), ("max_regions", max_regions)):
        if value is not None:
            check_positive_int(name, value)
    available = sorted(path.name for path in (folder / "questions").iterdir() if path.is_dir())
    splits = split.split("+")
    unknown = [name for name in splits if name not in available]
    if unknown:
        raise ValueError(
            f"Unknown split {', '.join(map(repr, unknown))} in {split!r}; {folder} has {', '.join(available)}"
            + _why_skipped(folder, unknown)
        )
    if len(set(splits)) != len(splits):
        raise ValueError(f"split {split!r} names a split twice")
    return VQADataset(folder, splits, max_question_length, max_regions)


def _damaged(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"{path} could not be read ({type(error).__name__}: {error}); the prepared dataset is damaged or incomplete: "
        "prepare it again with data_scripts/prepare_vqa.py, or copy it whole"
    )


def _read_table(path: Path) -> pa.Table:
    """A table saved by prepare_vqa, memory-mapped."""
    try:
        return load_from_disk(str(path)).data.table
    except (OSError, ValueError) as error:
        raise _damaged(path, error) from error


def _read_report(folder: Path) -> dict:
    """The folder's report.json; {} where there is none (a folder put together by hand)."""
    path = folder / "report.json"
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _damaged(path, error) from error
    return report if isinstance(report, dict) else {}


def _split_counts(report: dict) -> dict[str, dict]:
    """`{split: {"questions": distinct ids in its raw file, "kept": prepared}}` as report.json records them, for the
    splits whose record has that form."""
    splits = report.get("splits")
    if not isinstance(splits, dict):
        return {}
    return {
        name: counts
        for name, counts in splits.items()
        if isinstance(counts, dict) and all(isinstance(counts.get(key), int) for key in ("questions", "kept"))
    }


def _check_question_counts(folder: Path, report: dict, splits: list[str], num_rows: list[int]):
    """A split holds the questions its preparation kept (as the folder's `report` records them): prepare_vqa writes
    no empty split, and an Arrow file cut at a record batch's end reads without an error, short of questions."""
    recorded = _split_counts(report)
    for split, rows in zip(splits, num_rows):
        path = folder / "questions" / split
        if rows == 0:
            raise ValueError(
                f"{path} holds no questions, though prepare_vqa writes no empty split: prepare the dataset again, "
                "or copy it whole"
            )
        kept = recorded.get(split, {}).get("kept")
        if kept is not None and rows != kept:
            raise ValueError(
                f"{path} holds {rows} questions, but {folder / 'report.json'} records {kept} kept when it was "
                "prepared: a file of it was cut short or replaced; prepare the dataset again, or copy it whole"
            )


def _why_skipped(folder: Path, splits: list[str]) -> str:
    """What report.json says of splits that preparation skipped (their questions file was absent, or none of their
    images had features), as the end of an error message."""
    skipped = _read_report(folder).get("skipped_splits")
    if not isinstance(skipped, dict):
        return ""
    return "".join(f"; {split} was skipped when prepared: {skipped[split]}" for split in splits if split in skipped)


def questions_left_out(folder: str | os.PathLike, split: str) -> dict[str, tuple[int, int]]:
    """`{split: (questions left out, distinct questions in its raw file)}` for each split of `split` (names joined
    with "+") that was prepared without some of its questions (`--allow_incomplete_eval_splits`, or a training
    split's unusable images), as the folder's report.json records it; {} without a report."""
    counts = _split_counts(_read_report(Path(folder)))
    kept_of = {name: (counts[name]["kept"], counts[name]["questions"]) for name in split.split("+") if name in counts}
    return {name: (total - kept, total) for name, (kept, total) in kept_of.items() if kept < total}


def _question_ids(items: list[dict]) -> np.ndarray:
    given = [item["question_id"] for item in items]
    int64 = np.iinfo(np.int64)
    try:
        # A float id would be rounded to another question's, a bool taken for 0 or 1.
        if any(isinstance(id_, (bool, np.bool_)) for id_ in given):
            raise TypeError
        ids = [operator.index(id_) for id_ in given]
    except TypeError:
        ids = None
    if ids is None or not all(int64.min <= id_ <= int64.max for id_ in ids):
        raise ValueError(f"question_id must be one integer (int64) an item, got {given[:5]!r}")
    return np.array(ids, dtype=np.int64)


def _padded_length(length: int, multiple: int | None) -> int:
    return length if multiple is None else -(-length // multiple) * multiple


class VQACollator:
    """Pads the items of [`VQADataset`] into a batch of torch tensors for [`RWSANForVQA`].

    Returns `input_ids` and `attention_mask` `(batch, question_length)`, `image_features` `(batch,
    num_regions, feature_size)` (in the stored dtype unless `image_features_dtype` is given; the model casts),
    `image_attention_mask` `(batch, num_regions)` (1 = real), `labels` `(batch, num_answers)` when the items
    have them, and `question_id` `(batch,)` when the items have it. Questions and regions are padded to the
    longest of the batch, rounded up to a multiple of `pad_to_multiple_of` if given (so that compiled shapes
    repeat), but never beyond `max_question_length` / `max_regions` (or the longest, if longer); a batch holding a
    question without words pads questions to `max_question_length`, as the processor does. Every token and
    region an item holds counts as real, as `VQADataset`'s items hold no padding: an item ending in padding (a 0
    token id, an all-zero region row) is refused. Items may hold numpy arrays or torch tensors; features of several
    dtypes are promoted to one.

    With `pack_regions=True`, `image_features` holds only the real regions, `(total_regions, feature_size)`, the
    items' one after another, and `image_feature_positions` `(total_regions,)` the place of each in the flattened
    `(batch * num_regions)` padded layout; [`unpack_image_features`] pads them where the batch is (on the GPU).
    DataLoader workers then hand the main process less than half the bytes of padded VQA batches; moving those
    bytes between processes, not reading them, is what bounds a loader with workers.

    In a DataLoader worker the tensors of a batch are views of one shared-memory block, handed to the main process
    in one piece (the `DataLoader` would hand over each tensor on its own, which costs more than gathering the
    features). A tensor kept beyond its batch therefore keeps the whole batch's memory: `.clone()` what you keep
    (pinned batches, and the `Trainer`'s evaluation, copy it anyway). With `image_features_dtype` the cast features
    are a tensor of their own.

    `question_id` is not a model input. The `Trainer` drops it by itself (its default
    `remove_unused_columns=True` keeps only the item keys named like `forward` arguments, before collation);
    a hand-written loop pops it: `question_ids = batch.pop("question_id")`.

    Args:
        num_answers: size of the model's answer vocabulary; labels of another size are refused.
        max_regions: regions beyond this many are cut.
        max_question_length: questions are not padded beyond this many tokens (the processor's cut; longer
            questions are kept whole).
        pad_to_multiple_of: round padded lengths up to a multiple of this.
        image_features_dtype: dtype of the returned `image_features` (default: as stored, float16 normally).
        pack_regions: return the real regions only, with their padded positions (see above).
    """

    def __init__(
        self,
        num_answers: int,
        max_regions: int = 100,
        max_question_length: int = 16,
        pad_to_multiple_of: int | None = None,
        image_features_dtype: torch.dtype | None = None,
        pack_regions: bool = False,
    ):
        for name, value in (
            ("num_answers", num_answers),
            ("max_regions", max_regions),
            ("max_question_length", max_question_length),
        ):
            check_positive_int(name, value)
        if pad_to_multiple_of is not None:
            check_positive_int("pad_to_multiple_of", pad_to_multiple_of)
        self.num_answers = num_answers
        self.max_regions = max_regions
        self.max_question_length = max_question_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_features_dtype = image_features_dtype
        self.pack_regions = pack_regions

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("Cannot collate an empty batch")
        for key in ("input_ids", "image_features"):
            if any(key not in item for item in items):
                raise ValueError(f"Every item needs {key!r}")
        questions = [_question_tokens(item["input_ids"], index) for index, item in enumerate(items)]
        region_features = [
            _real_regions(item["image_features"], index)[: self.max_regions] for index, item in enumerate(items)
        ]
        feature_sizes = {features.shape[-1] for features in region_features}
        if len(feature_sizes) > 1 or any(features.ndim != 2 for features in region_features):
            raise ValueError(
                "image_features must be (num_regions, feature_size) arrays of one feature size, got shapes "
                f"{[features.shape for features in region_features]}"
            )
        has_labels, has_question_ids = self._given("labels", items), self._given("question_id", items)
        if has_labels:
            for index, item in enumerate(items):
                if np.shape(item["labels"]) != (self.num_answers,):
                    raise ValueError(
                        f"items[{index}]: labels of shape {np.shape(item['labels'])}, but the collator was built for "
                        f"{self.num_answers} answers"
                    )

        question_lengths = np.array([len(tokens) for tokens in questions])
        region_counts = np.array([len(features) for features in region_features])
        # Rounding up never goes past the longest a question or an image can be: the model gains nothing from
        # more padding, and the largest bucket stays the shape of a full batch.
        longest_question = max(1, question_lengths.max())
        question_length = min(
            _padded_length(longest_question, self.pad_to_multiple_of), max(longest_question, self.max_question_length)
        )
        if question_lengths.min() == 0:
            # A question without words attends over its padding alone: padded as `RWSANProcessor` pads it, its
            # answer does not depend on the batch it is in.
            question_length = max(longest_question, self.max_question_length)
        region_length = min(_padded_length(max(1, region_counts.max()), self.pad_to_multiple_of), self.max_regions)
        batch_size, feature_size = len(items), feature_sizes.pop()
        feature_dtype = np.result_type(*(features.dtype for features in region_features))
        shapes = {
            "input_ids": ((batch_size, question_length), np.int64),
            "attention_mask": ((batch_size, question_length), np.int64),
            "image_attention_mask": ((batch_size, region_length), np.int64),
        }
        if self.pack_regions:
            shapes["image_features"] = ((region_counts.sum(), feature_size), feature_dtype)
            shapes["image_feature_positions"] = ((region_counts.sum(),), np.int64)
        else:
            shapes["image_features"] = ((batch_size, region_length, feature_size), feature_dtype)
        if has_labels:
            shapes["labels"] = ((batch_size, self.num_answers), np.float32)
        if has_question_ids:
            shapes["question_id"] = ((batch_size,), np.int64)
        batch = _empty_batch(shapes)
        arrays = {name: tensor.numpy() for name, tensor in batch.items()}

        # Every element is written, padding included: the batch's buffer is not zeroed.
        arrays["input_ids"].fill(0)
        for row, tokens in enumerate(questions):
            arrays["input_ids"][row, : question_lengths[row]] = tokens
        arrays["attention_mask"][:] = _real_positions(question_lengths, question_length)
        arrays["image_attention_mask"][:] = _real_positions(region_counts, region_length)
        if self.pack_regions:
            np.concatenate(region_features, out=arrays["image_features"])
            # The real positions of the flattened mask, in row-major order: where each packed region goes.
            arrays["image_feature_positions"][:] = np.flatnonzero(arrays["image_attention_mask"])
        else:
            for row, features in enumerate(region_features):
                arrays["image_features"][row, : len(features)] = features
                arrays["image_features"][row, len(features) :] = 0
        if has_labels:
            np.stack([item["labels"] for item in items], out=arrays["labels"], casting="unsafe")
        if has_question_ids:
            arrays["question_id"][:] = _question_ids(items)
        if self.image_features_dtype is not None:
            batch["image_features"] = batch["image_features"].to(self.image_features_dtype)
        return batch

    @staticmethod
    def _given(key: str, items: list[dict]) -> bool:
        """Whether the items have an optional key: all of them or none."""
        present = [key in item for item in items]
        if any(present) and not all(present):
            raise ValueError(f"{key!r} is given for some items of the batch but not for others")
        return all(present)


def _question_tokens(input_ids, index: int) -> np.ndarray:
    """An item's token ids as a numpy vector (torch tensors too), refused where they are not integers or end in
    padding: every token given counts as real in the attention mask."""
    tokens = np.asarray(input_ids)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"items[{index}]: input_ids must be a vector of integer token ids, got {tokens.dtype} of shape "
            f"{tokens.shape}"
        )
    if len(tokens) and tokens[-1] == 0:
        raise ValueError(
            f"items[{index}]: input_ids end in the padding id 0; the collator pads, and counts every token it is "
            "given as real: give the question's tokens only (as VQADataset's items are)"
        )
    return tokens


def _real_regions(image_features, index: int) -> np.ndarray:
    """An item's region features as a numpy array (torch tensors too), refused where the last row is all zeros,
    which is padding (no prepared image keeps such a row): every region given counts as real."""
    if isinstance(image_features, torch.Tensor) and image_features.dtype == torch.bfloat16:
        raise ValueError(
            f"items[{index}]: image_features is a torch.bfloat16 tensor, which the collator's numpy batches cannot "
            "hold; give float32 or float16 features (bfloat16 converts to float32 exactly), and "
            "image_features_dtype=torch.bfloat16 for bfloat16 batches"
        )
    features = np.asarray(image_features)
    if features.ndim == 2 and len(features) and not features[-1].any():
        raise ValueError(
            f"items[{index}]: the last row of image_features is all zeros, which is padding; the collator pads, "
            "and counts every region it is given as real: give the image's real regions only (as VQADataset's "
            "items are)"
        )
    return features


def _real_positions(lengths: np.ndarray, padded_length: int) -> np.ndarray:
    return np.arange(padded_length) < lengths[:, None]


# Where each tensor of a batch starts in the batch's buffer: a multiple of the widest element and of a cache line.
_TENSOR_ALIGNMENT = 64


def _empty_batch(shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of these shapes and dtypes. In a DataLoader worker they are cut from one block of
    shared memory, which is then all that crosses to the main process: handing over a block per tensor, as the
    `DataLoader` does for separate tensors, costs more than the copy of the region features itself, and writing
    straight into shared memory spares the copy into it (`bench/RESULTS.md`)."""
    if get_worker_info() is None:
        return {name: torch.from_numpy(np.empty(shape, dtype)) for name, (shape, dtype) in shapes.items()}
    layout, total = {}, 0
    for name, (shape, dtype) in shapes.items():
        shape, dtype = tuple(int(length) for length in shape), torch.from_numpy(np.empty(0, dtype)).dtype
        size = math.prod(shape) * dtype.itemsize
        layout[name] = (total, size, dtype, shape)
        total += -(-size // _TENSOR_ALIGNMENT) * _TENSOR_ALIGNMENT
    buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    return {
        name: buffer[start : start + size].view(dtype).view(shape)
        for name, (start, size, dtype, shape) in layout.items()
    }


def unpack_image_features(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of `VQACollator(pack_regions=True)` with its `image_features` padded to `(batch, num_regions,
    feature_size)` (the shape of `image_attention_mask`, zeros at padding), on the device they are on, without
    waiting for it; other batches are returned as they are."""
    if "image_feature_positions" not in batch:
        return batch
    batch = dict(batch)
    positions = batch.pop("image_feature_positions")
    packed = batch["image_features"]
    if packed.dim() != 2 or positions.shape != packed.shape[:1]:
        raise ValueError(
            "packed image_features must be (total_regions, feature_size) with one position per region, got "
            f"features {tuple(packed.shape)} and positions {tuple(positions.shape)}"
        )
    batch_size, num_regions = batch["image_attention_mask"].shape
    padded = packed.new_zeros(batch_size * num_regions, packed.shape[1]).index_copy_(0, positions, packed)
    batch["image_features"] = padded.view(batch_size, num_regions, -1)
    return batch
