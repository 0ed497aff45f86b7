import base64
import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import RAW_FEATURE_SIZE, RAW_IMAGES, coco_file_name, raw_boxes, raw_region_features, write_npz
from datasets import load_from_disk

from data_scripts import prepare_vqa as prepare_vqa_module
from data_scripts.prepare_vqa import build_answer_vocabulary, build_question_vocabulary, prepare_vqa
from rwsan.data import load_vqa_dataset, questions_left_out
from rwsan.predict import questions_left_out_warning
from rwsan.processing_rwsan import RWSANProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]

# The question vocabulary of the raw_vqa_dir fixture: train words, then val, test2015 and VG words (test-dev's
# "where" and "zebra" are not read).
FIXTURE_QUESTION_WORDS = [
    "PAD", "UNK", "what", "color", "is", "the", "car", "this", "a", "cat", "how", "many", "dogs", "are", "there",
    "bus", "it", "raining",  # val
    "sky", "blue",  # test2015
    "why", "man", "smiling",  # VG
]  # fmt: skip
# train has "red", "yes" and "2" 8 times each, val "red", "no" and "2" 4 times each; VG's "yes" do not count.
FIXTURE_ANSWERS = {0: "red", 1: "2"}


def prepare(data_root: Path, output_dir: Path, **kwargs) -> dict:
    return prepare_vqa(data_root, output_dir, feature_size=RAW_FEATURE_SIZE, **kwargs)


def image_rows(output_dir: Path) -> dict[int, dict]:
    images = load_from_disk(str(output_dir / "images"))
    return {row["image_id"]: row for row in images}


def stored_features(row: dict) -> np.ndarray:
    return np.array(row["features"], dtype=np.float16)


def tsv_line(image_id: int, num_regions: int) -> str:
    arrays = raw_boxes(image_id, num_regions), raw_region_features(image_id, num_regions)
    encoded = [base64.b64encode(array.tobytes()).decode() for array in arrays]
    return "\t".join(map(str, [image_id, 640, 480, num_regions, *encoded])) + "\n"


def all_tsv_lines() -> list[str]:
    return [tsv_line(image_id, regions) for images in RAW_IMAGES.values() for image_id, regions in images.items()]


def npz_path(data_root: Path, folder: str, image_id: int) -> Path:
    return data_root / "coco_extract" / folder / coco_file_name(folder, image_id)


def leftovers(output_dir: Path) -> list[Path]:
    return list(output_dir.parent.glob(f".{output_dir.name}.*"))


def edit_json(path: Path, change):
    """Applies `change` to the content of the JSON file `path`."""
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


TRAIN_QUESTIONS_FILE = "v2_OpenEnded_mscoco_train2014_questions.json"
TRAIN_ANNOTATIONS_FILE = "v2_mscoco_train2014_annotations.json"
VAL_ANNOTATIONS_FILE = "v2_mscoco_val2014_annotations.json"


def test_answer_vocabulary_keeps_answers_seen_more_than_8_times_in_first_occurrence_order():
    train = ["no", "Two", "yes", "fish", "no", "cat"] + ["yes"] * 8 + ["cat"] * 7 + ["fish"] * 7
    val = ["dog"] * 9 + ["2"] * 8 + ["no"] * 7 + ["cat"]
    vocabulary = build_answer_vocabulary([train, val])
    # Counts: "no" 9, "2" 9 ("Two" is normalised to it), "yes" 9, "fish" 8, "cat" 9, "dog" 9.
    assert vocabulary == ["no", "2", "yes", "cat", "dog"]


def test_question_vocabulary_numbers_words_in_first_occurrence_order_across_lists():
    lists = [["What is the man's name?", "IS it a dog-sled?"], ["What's on the table/desk?"]]
    assert build_question_vocabulary(lists) == {
        "PAD": 0, "UNK": 1, "what": 2, "is": 3, "the": 4, "mans": 5, "name": 6, "it": 7, "a": 8, "dog": 9,
        "sled": 10, "whats": 11, "on": 12, "table": 13, "desk": 14,
    }  # fmt: skip


def test_prepares_splits_vocabularies_and_labels(raw_vqa_dir, tmp_path, capsys):
    output_dir = tmp_path / "prepared"
    report = prepare(raw_vqa_dir, output_dir)
    assert "vocabularies: 23 question words, 2 answers" in capsys.readouterr().out

    processor = RWSANProcessor.from_pretrained(str(output_dir / "processor"))
    assert processor.id2label == FIXTURE_ANSWERS
    vocabulary = processor.tokenizer.get_vocab()
    assert sorted(vocabulary, key=vocabulary.get) == FIXTURE_QUESTION_WORDS
    assert processor.max_question_length == 16 and processor.max_regions == 100
    assert processor.image_feature_size == RAW_FEATURE_SIZE

    assert report["splits"] == {
        "train": {"questions": 24, "kept": 24},
        "val": {"questions": 12, "kept": 12},
        "test": {"questions": 3, "kept": 3},
        "test-dev": {"questions": 1, "kept": 1},
        "vg": {"questions": 2, "kept": 2},
    }
    assert report["images"]["converted"] == 15
    assert report["regions_per_image"]["max"] == 6 and report["regions_per_image"]["histogram"]["1-10"] == 15
    assert report["problems"] == []
    assert json.loads((output_dir / "report.json").read_text()) == report

    train = load_from_disk(str(output_dir / "questions" / "train"))
    first = train[0]
    assert first["question_id"] == 90 and first["image_id"] == 9
    assert first["question"] == "What color is the car?" and first["input_ids"] == [2, 3, 4, 5, 6]
    assert first["multiple_choice_answer"] == "red" and first["answer_type"] == "other"
    assert first["answers"] == ["red"] * 5 + ["Two"] * 2 + ["blue"] * 3
    # "red" from 5 annotators -> 1.0, "Two" (-> "2") from 2 -> 0.6, "blue" is not an answer of the vocabulary.
    assert first["label_ids"] == [0, 1] and first["label_scores"] == pytest.approx([1.0, 0.6])
    assert train[2]["label_ids"] == [1] and train[2]["label_scores"] == [1.0]
    assert load_from_disk(str(output_dir / "images"))[first["image_index"]]["image_id"] == 9

    test_dev = load_from_disk(str(output_dir / "questions" / "test-dev"))
    assert test_dev.column_names == ["question_id", "image_id", "image_index", "question", "input_ids"]
    # "Where is the zebra?": test-dev words are not in the vocabulary.
    assert test_dev[0]["input_ids"] == [1, 4, 5, 1]


def test_the_region_summary_counts_the_images_the_loader_cuts():
    """The loader keeps 100 regions: an image of exactly 100 loses none."""
    from data_scripts.prepare_vqa import regions_summary

    summary = regions_summary([100, 101, 5, 36])
    assert (summary["min"], summary["max"], summary["mean"], summary["median"]) == (5, 101, 60.5, 68.0)
    assert summary["over_100_cut"] == 1
    assert summary["histogram"] == {
        "1-10": 1, "11-20": 0, "21-30": 0, "31-40": 1, "41-50": 0, "51-60": 0, "61-70": 0, "71-80": 0, "81-90": 0,
        "91-100": 1, ">100": 1,
    }  # fmt: skip


def test_questions_are_cut_to_max_question_length(raw_vqa_dir, tmp_path):
    prepare(raw_vqa_dir, tmp_path / "prepared", max_question_length=3)
    train = load_from_disk(str(tmp_path / "prepared" / "questions" / "train"))
    assert train[0]["input_ids"] == [2, 3, 4]
    assert RWSANProcessor.from_pretrained(str(tmp_path / "prepared" / "processor")).max_question_length == 3


def test_image_features_are_the_npz_features_in_float16_either_orientation(raw_vqa_dir, tmp_path):
    # One file in the (num_regions, feature_size) orientation, the others in the original's transpose.
    write_npz(npz_path(raw_vqa_dir, "train2014", 30), raw_region_features(30, 5), raw_boxes(30, 5), True)
    prepare(raw_vqa_dir, tmp_path / "prepared")

    rows = image_rows(tmp_path / "prepared")
    for images in RAW_IMAGES.values():
        for image_id, num_regions in images.items():
            row = rows[image_id]
            np.testing.assert_array_equal(
                stored_features(row), raw_region_features(image_id, num_regions).astype(np.float16)
            )
            np.testing.assert_array_equal(np.array(row["boxes"]), raw_boxes(image_id, num_regions))
            assert (row["num_regions"], row["image_width"], row["image_height"]) == (num_regions, 640, 480)


def test_float32_features_are_kept_exactly(raw_vqa_dir, tmp_path):
    prepare(raw_vqa_dir, tmp_path / "prepared", feature_dtype="float32")
    images = load_from_disk(str(tmp_path / "prepared" / "images"))
    assert images.features["features"].feature.feature.dtype == "float32"
    np.testing.assert_array_equal(np.array(images[0]["features"], dtype=np.float32), raw_region_features(9, 3))


def test_tsv_features_give_the_same_images_as_npz(raw_vqa_dir, tmp_path):
    prepare(raw_vqa_dir, tmp_path / "from_npz")
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_text("".join(all_tsv_lines()))
    report = prepare(raw_vqa_dir, tmp_path / "from_tsv", features_tsv=[tsv_path])

    assert report["images"]["converted"] == 15 and report["problems"] == []
    from_npz, from_tsv = image_rows(tmp_path / "from_npz"), image_rows(tmp_path / "from_tsv")
    assert from_tsv.keys() == from_npz.keys()
    for image_id, row in from_tsv.items():
        assert row == from_npz[image_id]


def test_several_processes_give_the_same_dataset(raw_vqa_dir, tmp_path, monkeypatch):
    submitted = []

    class RecordingPool(ProcessPoolExecutor):
        def submit(self, function, *args, **kwargs):
            submitted.append(function.__name__)
            return super().submit(function, *args, **kwargs)

    monkeypatch.setattr(prepare_vqa_module, "ProcessPoolExecutor", RecordingPool)
    prepare(raw_vqa_dir, tmp_path / "one")
    assert not submitted
    prepare(raw_vqa_dir, tmp_path / "two", num_proc=2)
    # Every image was decoded by the workers (the same dataset would come from a run that ignored num_proc).
    assert submitted.count("decode_image") == len(image_rows(tmp_path / "two"))
    for folder in ("images", "questions/train", "questions/vg"):
        assert (
            load_from_disk(str(tmp_path / "two" / folder)).to_dict()
            == load_from_disk(str(tmp_path / "one" / folder)).to_dict()
        )


def write_bad_images(data_root: Path):
    """Breaks five train images: 9 corrupt, 25 truncated, 30 of feature size 5, 42 with a NaN, 49 missing."""
    npz_path(data_root, "train2014", 9).write_bytes(b"this is not a zip archive")
    truncated = npz_path(data_root, "train2014", 25)
    truncated.write_bytes(truncated.read_bytes()[:200])
    write_npz(npz_path(data_root, "train2014", 30), np.ones((5, 5), np.float32), raw_boxes(30, 5))
    with_nan = raw_region_features(42, 2)
    with_nan[1, 3] = np.nan
    write_npz(npz_path(data_root, "train2014", 42), with_nan, raw_boxes(42, 2))
    npz_path(data_root, "train2014", 49).unlink()


def test_bad_images_are_reported_and_their_questions_left_out(raw_vqa_dir, tmp_path, capsys):
    write_bad_images(raw_vqa_dir)
    report = prepare(raw_vqa_dir, tmp_path / "prepared")

    problem_images = {problem["image_id"]: problem for problem in report["problems"] if problem["question_id"] is None}
    assert {image_id: problem["kind"] for image_id, problem in problem_images.items()} == {
        9: "unreadable",
        25: "unreadable",
        30: "feature_size",
        42: "non_finite",
    }
    assert problem_images[9]["path"] == str(npz_path(raw_vqa_dir, "train2014", 9))
    assert "x has shape (5, 5), expected (6, num_regions)" in problem_images[30]["reason"]
    assert problem_images[42]["reason"] == "1 NaN or infinite feature values"

    # Three train questions and one VG question (image 25) per bad image.
    missing = [problem for problem in report["problems"] if problem["kind"] == "missing_image"]
    assert sorted(problem["question_id"] for problem in missing) == sorted(
        [image_id * 10 + position for image_id in (9, 25, 30, 42, 49) for position in range(3)] + [10**6 + 250]
    )
    by_question = {problem["question_id"]: problem for problem in missing}
    assert by_question[490]["reason"] == "its image 49 has no features"
    assert by_question[90]["reason"] == (
        f"its image 9 was left out (unreadable: {problem_images[9]['path']}: {problem_images[9]['reason']})"
    )
    assert report["problem_counts"] == {
        "unreadable": 2,
        "feature_size": 1,
        "non_finite": 1,
        "missing_image": 16,
    }
    assert report["splits"]["train"] == {"questions": 24, "kept": 9}
    assert report["splits"]["vg"] == {"questions": 2, "kept": 1}
    assert set(image_rows(tmp_path / "prepared")) == {61, 72, 77, 133, 164, 192, 196, 1, 19, 57}
    assert "problems: 16 x missing_image" in capsys.readouterr().out


def test_npz_files_with_only_x_are_converted_without_boxes(raw_vqa_dir, tmp_path):
    # The original reads only `x`. Image 77 keeps its boxes and size, image 9 has no `x`.
    for folder, images in RAW_IMAGES.items():
        for image_id, num_regions in images.items():
            if image_id != 77:
                np.savez(npz_path(raw_vqa_dir, folder, image_id), x=raw_region_features(image_id, num_regions).T)
    np.savez(npz_path(raw_vqa_dir, "train2014", 9), features=raw_region_features(9, 3))
    report = prepare(raw_vqa_dir, tmp_path / "prepared")

    assert report["problems"][0] == {
        "kind": "unreadable",
        "path": str(npz_path(raw_vqa_dir, "train2014", 9)),
        "reason": "no 'x' (the region features) among its arrays: features",
        "image_id": 9,
        "question_id": None,
    }
    assert report["problem_counts"] == {"unreadable": 1, "missing_image": 3}
    rows = image_rows(tmp_path / "prepared")
    assert len(rows) == 14
    assert (rows[30]["boxes"], rows[30]["image_width"], rows[30]["image_height"]) == (None, None, None)
    np.testing.assert_array_equal(stored_features(rows[30]), raw_region_features(30, 5).astype(np.float16))
    assert rows[77]["boxes"] == raw_boxes(77, 6).tolist()
    assert (rows[77]["image_width"], rows[77]["image_height"]) == (640, 480)


def zero_padded(features: np.ndarray, num_rows: int) -> np.ndarray:
    return np.concatenate([features, np.zeros((num_rows - len(features), features.shape[1]), features.dtype)])


def test_zero_feature_rows_are_padding_and_not_stored(raw_vqa_dir, tmp_path):
    # As extractors that pad every image to a fixed count write them; the original masks such rows out. Image 9
    # counts its boxes without the padding, 30 with it, 42 has no boxes; 61's second of 3 rows is zero.
    write_npz(npz_path(raw_vqa_dir, "train2014", 9), zero_padded(raw_region_features(9, 3), 10), raw_boxes(9, 3))
    write_npz(
        npz_path(raw_vqa_dir, "train2014", 30),
        zero_padded(raw_region_features(30, 5), 8),
        zero_padded(raw_boxes(30, 5), 8),
    )
    np.savez(npz_path(raw_vqa_dir, "train2014", 42), x=zero_padded(raw_region_features(42, 2), 6).T)
    inner_zero = raw_region_features(61, 3)
    inner_zero[1] = 0
    write_npz(npz_path(raw_vqa_dir, "train2014", 61), inner_zero, raw_boxes(61, 3))
    report = prepare(raw_vqa_dir, tmp_path / "prepared")

    assert report["problems"] == []
    rows = image_rows(tmp_path / "prepared")
    for image_id, num_regions in ((9, 3), (30, 5), (42, 2)):
        assert rows[image_id]["num_regions"] == num_regions
        expected = raw_region_features(image_id, num_regions).astype(np.float16)
        np.testing.assert_array_equal(stored_features(rows[image_id]), expected)
    assert rows[30]["boxes"] == raw_boxes(30, 5).tolist()
    assert rows[61]["num_regions"] == 2
    np.testing.assert_array_equal(stored_features(rows[61]), inner_zero[[0, 2]].astype(np.float16))
    assert rows[61]["boxes"] == raw_boxes(61, 3)[[0, 2]].tolist()


@pytest.mark.parametrize(
    ("features", "reason"),
    [
        (np.zeros((4, RAW_FEATURE_SIZE), np.float32), "all its 4 feature rows are zero, which marks padding"),
        # Failed with numpy's TypeError naming no file, or were converted unseen (complex: the real part alone).
        (np.full((3, RAW_FEATURE_SIZE), "0.5"), "features of dtype <U3, expected floating-point values"),
        (raw_region_features(9, 3).astype(complex), "features of dtype complex128, expected floating-point values"),
        (np.ones((3, RAW_FEATURE_SIZE), np.int64), "features of dtype int64, expected floating-point values"),
    ],
)  # fmt: skip
def test_bad_or_all_zero_features_are_problems_that_leave_the_image_out(raw_vqa_dir, tmp_path, features, reason):
    np.savez(npz_path(raw_vqa_dir, "train2014", 9), x=features.T)
    report = prepare(raw_vqa_dir, tmp_path / "prepared")
    assert report["problems"][0]["reason"] == reason
    assert report["splits"]["train"] == {"questions": 24, "kept": 21}


OBJECT_ARRAY_ERROR = "ValueError('Object arrays cannot be loaded when allow_pickle=False')"


@pytest.mark.parametrize(
    ("features", "extra", "kind", "reason"),
    [
        (zero_padded(raw_region_features(9, 3), 10), {"num_bbox": np.array(5)},
         "boxes_left_out", "10 feature rows (3 before their zero padding) but num_bbox counts 5"),
        (raw_region_features(9, 3), {"bbox": raw_boxes(9, 4)}, "boxes_left_out", "3 feature rows but boxes counts 4"),
        (raw_region_features(9, 3), {"bbox": np.full((3, 4), "1")}, "boxes_left_out",
         "boxes of dtype <U1, expected numbers"),
        # Some extractors keep a score beside each box.
        (raw_region_features(9, 3), {"bbox": np.ones((3, 5), np.float32)}, "boxes_left_out",
         "boxes have shape (3, 5), expected (num_regions, 4)"),
        (raw_region_features(9, 3), {"bbox": np.full((3, 4), np.nan, np.float32)}, "boxes_left_out",
         "boxes hold NaN or infinite values"),
        # Failed with pyarrow's ArrowInvalid once the images were written, naming no file.
        (raw_region_features(9, 3), {"image_w": np.array(2**31), "image_h": np.array(480)}, "image_size_left_out",
         "image_w x image_h is 2147483648 x 480, expected positive whole numbers below 2**31"),
        (raw_region_features(9, 3), {"image_w": np.array(640), "image_h": np.array(0)}, "image_size_left_out",
         "image_w x image_h is 640 x 0, expected positive whole numbers below 2**31"),
        # Once the whole image left out as unreadable (NaN), or a traceback (infinity).
        (raw_region_features(9, 3), {"image_w": np.array(np.nan)}, "image_size_left_out",
         "image_w x image_h is nan x 480, expected positive whole numbers below 2**31"),
        (raw_region_features(9, 3), {"image_h": np.array(np.inf)}, "image_size_left_out",
         "image_w x image_h is 640 x inf, expected positive whole numbers below 2**31"),
        (raw_region_features(9, 3), {"num_bbox": np.array([3, 3])}, "boxes_left_out",
         "3 feature rows but num_bbox counts [3, 3]"),
        # Object arrays (an extractor's None, say), which reading would unpickle: once the whole image unreadable.
        (raw_region_features(9, 3), {"bbox": np.array(None)}, "boxes_left_out",
         f"bbox cannot be read: {OBJECT_ARRAY_ERROR}"),
        (raw_region_features(9, 3), {"num_bbox": np.array(None)}, "boxes_left_out",
         f"num_bbox cannot be read: {OBJECT_ARRAY_ERROR}"),
        (raw_region_features(9, 3), {"image_h": np.array(None)}, "image_size_left_out",
         f"image_h cannot be read: {OBJECT_ARRAY_ERROR}"),
    ],
)  # fmt: skip
def test_faulty_boxes_or_image_sizes_are_left_out_and_the_image_kept(raw_vqa_dir, tmp_path, features, extra, kind,
                                                                     reason):  # fmt: skip
    """The model reads the features alone, as the original reads only `x`: an image once left out, with all its
    questions, for boxes that only plots use."""
    whole = {"bbox": raw_boxes(9, len(features)), "image_w": np.array(640), "image_h": np.array(480)}
    np.savez(npz_path(raw_vqa_dir, "train2014", 9), x=features.T, **(whole | extra))
    report = prepare(raw_vqa_dir, tmp_path / "prepared")
    assert [(problem["kind"], problem["reason"]) for problem in report["problems"]] == [(kind, reason)]
    assert report["splits"]["train"] == {"questions": 24, "kept": 24}
    row = image_rows(tmp_path / "prepared")[9]
    np.testing.assert_array_equal(stored_features(row), raw_region_features(9, 3).astype(np.float16))
    if kind == "boxes_left_out":
        assert row["boxes"] is None and row["image_width"] == 640
    else:
        assert row["boxes"] == raw_boxes(9, 3).tolist() and row["image_width"] is row["image_height"] is None


def test_hidden_npz_files_are_not_read(raw_vqa_dir, tmp_path):
    # macOS adds a `._<name>` beside every file of an archive it makes; the original's glob skips them too.
    for path in list((raw_vqa_dir / "coco_extract").rglob("*.npz")):
        path.with_name(f"._{path.name}").write_bytes(b"Mac OS X resource fork")
    report = prepare(raw_vqa_dir, tmp_path / "prepared", strict=True)
    assert report["problems"] == [] and report["images"]["converted"] == 15


@pytest.mark.parametrize("usable_first", [False, True])
def test_an_image_with_a_usable_and_an_unusable_copy_is_kept(raw_vqa_dir, tmp_path, usable_first):
    # The .npz is read before the TSV line: one of them is unreadable.
    tsv_path = tmp_path / "features.tsv"
    if usable_first:
        tsv_path.write_text("9\t640\t480\t1\tAAAA\n")  # 1 box of 3 values
    else:
        npz_path(raw_vqa_dir, "train2014", 9).write_bytes(b"not a zip archive")
        tsv_path.write_text(tsv_line(9, 3))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=tsv_path)
    assert report["problem_counts"] == {"unreadable": 1}
    assert report["images"]["converted"] == 15 and report["images"]["left_out"] == 0
    assert report["splits"]["train"] == {"questions": 24, "kept": 24}


def test_image_sizes_stored_as_one_element_arrays_are_read(raw_vqa_dir, tmp_path):
    # As some feature extractors write them; NumPy 2 refuses int() of such an array.
    features = raw_region_features(9, 3)
    np.savez(npz_path(raw_vqa_dir, "train2014", 9), x=features.T, image_w=np.array([640]), image_h=np.array([[480]]))
    report = prepare(raw_vqa_dir, tmp_path / "prepared")
    assert report["problem_counts"] == {}
    row = image_rows(tmp_path / "prepared")[9]
    assert (row["image_width"], row["image_height"]) == (640, 480)


def test_no_usable_image_stops_with_the_causes(raw_vqa_dir, tmp_path):
    first_path = re.escape(str(npz_path(raw_vqa_dir, "train2014", 9)))
    with pytest.raises(
        ValueError,
        match=r"none of the 15 images the questions refer to has usable features in .*test2015: 15 x "
        rf"feature_size \(first: {first_path}: x has shape \(6, 3\), expected \(7, num_regions\) or "
        r"\(num_regions, 7\)\)$",
    ):
        prepare_vqa(raw_vqa_dir, tmp_path / "prepared", feature_size=7)
    assert not (tmp_path / "prepared").exists() and not leftovers(tmp_path / "prepared")


def test_no_image_in_the_feature_files_stops_with_their_paths(raw_vqa_dir, tmp_path):
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_text(tsv_line(999, 2))
    message = f"none of the 15 images the questions refer to has usable features in {tsv_path}: no feature source"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])


def test_an_image_read_twice_is_reported_and_the_first_copy_kept(raw_vqa_dir, tmp_path):
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_text(tsv_line(9, 2))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])
    assert report["problems"] == [
        {
            "kind": "duplicate_image",
            "path": f"{tsv_path}:1",
            "reason": f"image 9 already read from {npz_path(raw_vqa_dir, 'train2014', 9)}",
            "image_id": 9,
            "question_id": None,
        }
    ]
    assert image_rows(tmp_path / "prepared")[9]["num_regions"] == 3


def test_tsv_problems_name_file_and_line(raw_vqa_dir, tmp_path):
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    lines = all_tsv_lines()
    lines[0] = lines[0][: len(lines[0]) // 2] + "\n"  # truncated
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_text("".join(lines))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])
    assert report["problems"][0]["path"] == f"{tsv_path}:1"
    assert report["problems"][0]["image_id"] == 9
    assert report["problems"][0]["kind"] == "unreadable"


def test_a_tsv_line_counting_more_boxes_than_it_holds_is_a_problem_of_its_line(raw_vqa_dir, tmp_path):
    """Reshaped unchecked, it would stop the whole conversion with numpy's error."""
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    lines = all_tsv_lines()
    fields = lines[0].split("\t")
    lines[0] = "\t".join([*fields[:3], "4", *fields[4:]])  # image 9 holds 3 boxes
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_text("".join(lines))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])
    problem = report["problems"][0]
    assert (problem["path"], problem["kind"]) == (f"{tsv_path}:1", "unreadable")
    assert problem["reason"] == "12 box values for 4 boxes"


def test_a_val_image_read_from_a_tsv_beside_npz_files_is_not_taken_for_missing(raw_vqa_dir, tmp_path):
    """Only the feature folders can be listed before the images are read: a val image whose features are in a TSV
    file is no missing one."""
    npz_path(raw_vqa_dir, "val2014", 164).unlink()
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_text(tsv_line(164, RAW_IMAGES["val2014"][164]))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])
    assert report["splits"]["val"] == {"questions": 12, "kept": 12} and report["problems"] == []


@pytest.mark.parametrize(
    ("break_image", "message"),
    [
        (
            lambda path: path.write_bytes(b"garbage"),
            r"COCO_train2014_000000000009\.jpg\.npz: it is no \.npz archive \(a zip file\), but starts with the "
            r"bytes b'garbag' \(stopped by --strict\)",
        ),
        # An interrupted download: a zip file's start, without its end.
        (
            lambda path: path.write_bytes(path.read_bytes()[:100]),
            r"COCO_train2014_000000000009\.jpg\.npz: cannot read: BadZipFile\('File is not a zip file'\) \(stopped",
        ),
        (
            lambda path: write_npz(path, np.full((3, 6), np.inf, np.float32), raw_boxes(9, 3)),
            r"18 NaN or infinite feature values \(stopped by --strict\)",
        ),
        (
            lambda path: write_npz(path, np.full((3, 6), 1e5, np.float32), raw_boxes(9, 3)),
            r"feature values up to 100000 overflow float16; use --feature_dtype float32",
        ),
        (
            lambda path: write_npz(path, np.array([[1.0] * 6, [1e-9] * 6, [0.0] * 6], np.float32), raw_boxes(9, 3)),
            r"region 1's feature values \(at most 1e-09\) are all too small for float16 and would be stored as "
            r"zeros, which mark padding; use --feature_dtype float32 \(stopped by --strict\)",
        ),
    ],
)
def test_strict_stops_at_the_first_problem(raw_vqa_dir, tmp_path, break_image, message):
    break_image(npz_path(raw_vqa_dir, "train2014", 9))
    with pytest.raises(ValueError, match=message):
        prepare(raw_vqa_dir, tmp_path / "prepared", strict=True)
    assert not (tmp_path / "prepared").exists() and not leftovers(tmp_path / "prepared")


def test_float64_regions_too_small_for_float32_are_left_out_not_stored_as_padding(raw_vqa_dir, tmp_path):
    features = np.array([[1.0] * 6, [1e-50] * 6], np.float64)
    write_npz(npz_path(raw_vqa_dir, "train2014", 9), features, raw_boxes(9, 2))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", feature_dtype="float32")
    problem = report["problems"][0]
    assert (problem["kind"], problem["image_id"]) == ("float32_underflow", 9)
    assert problem["reason"] == (
        "region 1's feature values (at most 1e-50) are all too small for float32 and would be stored as zeros, "
        "which mark padding"
    )
    assert {problem["kind"] for problem in report["problems"][1:]} == {"missing_image"}
    assert 9 not in image_rows(tmp_path / "prepared")


def test_float64_values_beyond_float32_are_left_out_not_stored_as_infinite(raw_vqa_dir, tmp_path):
    features = np.array([[1.0] * 6, [2.0] * 5 + [1e39]], np.float64)
    write_npz(npz_path(raw_vqa_dir, "train2014", 9), features, raw_boxes(9, 2))
    report = prepare(raw_vqa_dir, tmp_path / "prepared", feature_dtype="float32")
    problem = report["problems"][0]
    assert (problem["kind"], problem["image_id"]) == ("float32_overflow", 9)
    assert problem["reason"] == "feature values up to 1e+39 overflow float32"
    assert 9 not in image_rows(tmp_path / "prepared")


def test_strict_stops_at_a_question_without_image(raw_vqa_dir, tmp_path):
    npz_path(raw_vqa_dir, "val2014", 164).unlink()
    with pytest.raises(ValueError, match=r"val2014_questions\.json: its image 164 has no features"):
        prepare(raw_vqa_dir, tmp_path / "prepared", strict=True)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (
            "vqa/v2_mscoco_val2014_annotations.json",
            r"v2_mscoco_val2014_annotations\.json not found: the val ",
        ),
        (
            "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
            r"train2014_questions\.json not found, but its anno",
        ),
        ("coco_extract", r"no image features: none of train2014, val2014, test2015 exists in .*coco_extract"),
        ("vqa", r"vqa not found: it should hold the VQA-v2 question files"),
    ],
)
def test_missing_required_file_stops_with_its_path(raw_vqa_dir, tmp_path, remove, message):
    path = raw_vqa_dir / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError, match=message):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("VG_questions.json", '{"questions": [{"question_id": 1', r"VG_questions\.json is not valid JSON: "),
        ("VG_annotations.json", '{"annotation": []}', r"VG_annotations\.json has no 'annotations' list"),
        (
            "v2_OpenEnded_mscoco_val2014_questions.json",
            '{"questions": [{"question_id": 1, "question": "Why?"}]}',
            r"val2014_questions\.json: questions\[0\] has no image_id \(it needs question_id, image_id, question\)",
        ),
        ("VG_questions.json", '{"questions": []}', r"VG_questions\.json: its 'questions' list is empty"),
        ("VG_questions.json", '{"questions": [7]}', r"VG_questions\.json: questions\[0\] is 7, expected an object"),
        (
            "VG_questions.json",
            '{"questions": [{"question_id": 1, "image_id": 9, "question": null}]}',
            r"VG_questions\.json: questions\[0\]\.question is None, expected a string",
        ),
        (
            "VG_questions.json",
            '{"questions": [{"question_id": "1", "image_id": 9, "question": "Why?"}]}',
            r"questions\[0\]\.question_id is '1', expected an integer",
        ),
        (
            "VG_questions.json",
            '{"questions": [{"question_id": 1, "image_id": true, "question": "Why?"}]}',
            r"questions\[0\]\.image_id is True, expected an integer",
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1}]}',
            r"annotations\[0\] has no answers \(it needs question_id, answers\)",
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1, "answers": [{"answer": "no"}]}]}',
            r"val2014_annotations\.json: annotations\[0\] has no multiple_choice_answer, which the answer "
            r"vocabulary is counted from \(in the train and val annotations\)",
        ),
        (
            "VG_annotations.json",
            '{"annotations": [{"question_id": 1, "multiple_choice_answer": 3, "answers": [{"answer": "no"}]}]}',
            r"VG_annotations\.json: annotations\[0\]\.multiple_choice_answer is 3, expected a string",
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1, "multiple_choice_answer": "no", "answers": [{"answer": 0}]}]}',
            r"val2014_annotations\.json: annotations\[0\]\.answers\[0\] is \{'answer': 0\}, expected an "
            r'\{"answer": <string>\} object',
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1, "multiple_choice_answer": null, "answers": [{"answer": "no"}]}]}',
            r"annotations\[0\] has no multiple_choice_answer, which the answer vocabulary is counted from",
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1, "multiple_choice_answer": "no", "answers": []}]}',
            r'annotations\[0\]\.answers is \[\], expected at least one \{"answer": <string>\} object',
        ),
        (
            "VG_questions.json",
            '{"questions": [{"question_id": 9223372036854775808, "image_id": 9, "question": "Why?"}]}',
            r"questions\[0\]\.question_id is 9223372036854775808, beyond the 64-bit integers ids are stored as",
        ),
        # Half of an emoji: JSON loads it, but neither the tokenizer nor Arrow can write it.
        (
            "VG_questions.json",
            '{"questions": [{"question_id": 1, "image_id": 9, "question": "What \\ud83d color?"}]}',
            r"questions\[0\]\.question is 'What \\ud83d color\?', which holds half of a character \(a lone surrogate "
            r"escape\): not text",
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1, "multiple_choice_answer": "no", "answers": [{"answer": "\\udc00"}]}]}',
            r"annotations\[0\]\.answers\[0\] is '\\udc00', which holds half of a character",
        ),
        (
            "v2_mscoco_val2014_annotations.json",
            '{"annotations": [{"question_id": 1, "image_id": "9", "multiple_choice_answer": "no", "answers": '
            '[{"answer": "no"}]}]}',
            r"annotations\[0\]\.image_id is '9', expected an integer",
        ),
    ],
)
def test_malformed_question_files_are_refused(raw_vqa_dir, tmp_path, file_name, content, message):
    (raw_vqa_dir / "vqa" / file_name).write_text(content)
    with pytest.raises(ValueError, match=message):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_a_question_file_that_is_not_utf8_is_named(raw_vqa_dir, tmp_path):
    path = raw_vqa_dir / "vqa" / "VG_questions.json"
    path.write_bytes(b'{"questions": [{"question_id": 1, "image_id": 9, "question": "caf\xe9?"}]}')
    with pytest.raises(ValueError, match=re.escape(f"{path} is not UTF-8 text (JSON): 'utf-8' codec can't decode")):
        prepare(raw_vqa_dir, tmp_path / "prepared")


def test_a_compressed_tsv_is_refused_before_any_image_is_converted(raw_vqa_dir, tmp_path, monkeypatch):
    tsv_path = tmp_path / "features.tsv.gz"
    tsv_path.write_bytes(gzip.compress("".join(all_tsv_lines()).encode()))
    converted = []
    monkeypatch.setattr(prepare_vqa_module, "decode_image", lambda *args: converted.append(args))
    message = f"feature file {tsv_path} is not UTF-8 text ('utf-8' codec can't decode byte 0x8b in position 1"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])
    assert not converted and not (tmp_path / "prepared").exists()


def test_bytes_that_are_not_text_later_in_a_tsv_name_its_line(raw_vqa_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_vqa_module, "TEXT_CHECK_BYTES", 16)  # the start is text
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    lines = [line.encode() for line in all_tsv_lines()]
    lines[1] = b"\xff" + lines[1]
    tsv_path = tmp_path / "features.tsv"
    tsv_path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=re.escape(f"{tsv_path}:2 is not UTF-8 text: 'utf-8' codec can't decode")):
        prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path])


def test_missing_tsv_file_stops_with_its_path(raw_vqa_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"feature file .*nowhere\.tsv not found"):
        prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tmp_path / "nowhere.tsv"])


def test_a_tsv_folder_is_refused_before_any_image_is_converted(raw_vqa_dir, tmp_path, monkeypatch):
    # The official trainval_36.zip unpacks to a folder of .tsv files.
    (tmp_path / "trainval_36").mkdir()
    decoded = []
    decode_image = prepare_vqa_module.decode_image
    monkeypatch.setattr(prepare_vqa_module, "decode_image", lambda *args: decoded.append(1) or decode_image(*args))
    message = f"feature file {tmp_path / 'trainval_36'} is a folder: name the .tsv files in it"
    with pytest.raises(IsADirectoryError, match=re.escape(message)):
        prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tmp_path / "trainval_36"])
    assert not decoded


def test_absent_splits_are_skipped_and_said_so(raw_vqa_dir, tmp_path, capsys):
    for name in (
        "VG_questions.json",
        "VG_annotations.json",
        "v2_OpenEnded_mscoco_test-dev2015_questions.json",
    ):
        (raw_vqa_dir / "vqa" / name).unlink()
    shutil.rmtree(raw_vqa_dir / "coco_extract" / "test2015")
    report = prepare(raw_vqa_dir, tmp_path / "prepared")

    assert set(report["splits"]) == {"train", "val"}
    assert report["skipped_splits"]["vg"] == f"{raw_vqa_dir / 'vqa' / 'VG_questions.json'} not found"
    assert report["skipped_splits"]["test"].startswith("no image features: ")
    assert "Skipping test: no image features" in capsys.readouterr().out
    # The test questions still count for the question vocabulary, as in the original.
    vocabulary = RWSANProcessor.from_pretrained(str(tmp_path / "prepared" / "processor")).tokenizer.get_vocab()
    assert "sky" in vocabulary and "smiling" not in vocabulary
    # Loading a skipped split says why it is not there.
    message = f"test was skipped when prepared: {report['skipped_splits']['test']}"
    with pytest.raises(
        ValueError, match=r"Unknown split 'test' in 'train\+test'; .* has train, val; " + re.escape(message)
    ):
        load_vqa_dataset(tmp_path / "prepared", "train+test")


def test_visual_genome_annotations_need_no_multiple_choice_answer(raw_vqa_dir, tmp_path):
    # The original trains on VG's `answers` alone and counts its answer vocabulary from train and val.
    def without_multiple_choice_answers(content):
        for annotation in content["annotations"]:
            del annotation["multiple_choice_answer"]

    edit_json(raw_vqa_dir / "vqa" / "VG_annotations.json", without_multiple_choice_answers)
    report = prepare(raw_vqa_dir, tmp_path / "prepared")
    assert report["splits"]["vg"] == {"questions": 2, "kept": 2} and report["problems"] == []
    vg = load_from_disk(str(tmp_path / "prepared" / "questions" / "vg"))
    assert vg["multiple_choice_answer"] == [None, None]
    # "yes" is no answer of the vocabulary; "Two" (-> "2") from two annotators scores 0.6.
    assert vg["label_ids"] == [[1], [1]] and np.allclose(vg["label_scores"], [[0.6], [0.6]])
    train_and_vg = load_vqa_dataset(tmp_path / "prepared", "train+vg")
    assert len(train_and_vg) == 26 and train_and_vg.answers[-1] == ["yes"] * 5 + ["Two"] * 2 + ["blue"] * 3


def test_an_answer_vocabulary_without_val_says_it_is_not_the_papers(raw_vqa_dir, tmp_path, capsys):
    (raw_vqa_dir / "vqa" / VAL_ANNOTATIONS_FILE).unlink()
    (raw_vqa_dir / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()

    def one_frequent_answer(content):
        for annotation in content["annotations"]:
            annotation["multiple_choice_answer"] = "yes"

    # Enough of one answer for a vocabulary of train's alone (its answers are rarer than 9 times each).
    edit_json(raw_vqa_dir / "vqa" / TRAIN_ANNOTATIONS_FILE, one_frequent_answer)
    prepare(raw_vqa_dir, tmp_path / "prepared")
    assert (
        "Note: the answer vocabulary comes from train alone; the paper's (its answer_dict.json, 3,129 answers) "
        "counts train and val, so a model trained on this one answers from another list than the paper's "
        "checkpoints\n"
    ) in capsys.readouterr().out


def test_splits_of_which_no_image_has_features_are_skipped_and_strict_works(raw_vqa_dir, tmp_path, capsys):
    # Trainval TSV files hold no test2015 image: test and test-dev are skipped, not 4 problems.
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    tsv_path = tmp_path / "trainval.tsv"
    folders = ("train2014", "val2014")
    tsv_path.write_text(
        "".join(tsv_line(image_id, regions) for f in folders for image_id, regions in RAW_IMAGES[f].items())
    )
    report = prepare(raw_vqa_dir, tmp_path / "prepared", features_tsv=[tsv_path], strict=True)

    assert set(report["splits"]) == {"train", "val", "vg"} and report["problems"] == []
    assert report["skipped_splits"] == {
        "test": f"no image features: none of its images (3) is in {tsv_path}",
        "test-dev": f"no image features: none of its images (1) is in {tsv_path}",
    }
    assert f"Skipping test: no image features: none of its images (3) is in {tsv_path}" in capsys.readouterr().out
    assert not (tmp_path / "prepared" / "questions" / "test").exists()
    # The test questions still count for the question vocabulary, as in the original.
    vocabulary = RWSANProcessor.from_pretrained(str(tmp_path / "prepared" / "processor")).tokenizer.get_vocab()
    assert sorted(vocabulary, key=vocabulary.get) == FIXTURE_QUESTION_WORDS


def test_empty_answer_vocabulary_stops_with_the_files_it_comes_from(raw_vqa_dir, tmp_path):
    for name in (TRAIN_ANNOTATIONS_FILE, VAL_ANNOTATIONS_FILE):
        edit_json(raw_vqa_dir / "vqa" / name, lambda content: content.update(annotations=content["annotations"][:4]))
    message = (
        "the answer vocabulary is empty: no multiple-choice answer occurs 9 or more times in "
        f"{raw_vqa_dir / 'vqa' / TRAIN_ANNOTATIONS_FILE} and {raw_vqa_dir / 'vqa' / VAL_ANNOTATIONS_FILE}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(raw_vqa_dir, tmp_path / "prepared")


def test_a_split_that_keeps_no_question_stops_with_the_reasons(raw_vqa_dir, tmp_path):
    train, val = raw_vqa_dir / "vqa" / TRAIN_ANNOTATIONS_FILE, raw_vqa_dir / "vqa" / VAL_ANNOTATIONS_FILE
    train_content, val_content = train.read_text(), val.read_text()
    train.write_text(val_content)
    val.write_text(train_content)
    questions_path = raw_vqa_dir / "vqa" / TRAIN_QUESTIONS_FILE
    message = (
        f"train: none of its 24 questions ({questions_path}) is kept: 24 x missing_annotation (first: "
        f"{questions_path}: question 90 has no annotation in {train}), 12 x missing_question (first: {train}: "
        f"question 1330 is annotated but not in {questions_path})"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_questions_without_an_answer_in_the_vocabulary_are_kept_and_counted(raw_vqa_dir, tmp_path, capsys):
    """As the original keeps them (trained towards no answer); they were kept without a word."""

    def answers_seen_once(content):
        for annotation in content["annotations"][:2]:
            annotation["answers"] = [{"answer": f"colour {index}"} for index in range(10)]

    edit_json(raw_vqa_dir / "vqa" / TRAIN_ANNOTATIONS_FILE, answers_seen_once)
    report = prepare(raw_vqa_dir, tmp_path / "prepared")
    assert report["splits"]["train"] == {"questions": 24, "kept": 24}
    assert report["questions_without_known_answer"] == {"train": 2}
    output = capsys.readouterr().out
    assert (
        "train: 24 of 24 questions (2 whose annotator answers are all outside the answer vocabulary: none the model "
        "can give is right)"
    ) in output
    assert "val: 12 of 12 questions\n" in output
    train = load_vqa_dataset(tmp_path / "prepared", "train")
    assert sum(not train[index]["labels"].any() for index in range(len(train))) == 2


def test_repeated_and_mismatched_records_are_reported_and_the_first_kept(raw_vqa_dir, tmp_path):
    questions_path = raw_vqa_dir / "vqa" / TRAIN_QUESTIONS_FILE
    annotations_path = raw_vqa_dir / "vqa" / TRAIN_ANNOTATIONS_FILE

    def repeat_question_90(content):
        content["questions"].append({"question_id": 90, "image_id": 9, "question": "Is the dog red?"})

    def repeat_annotation_91_and_move_92(content):
        annotations = content["annotations"]
        annotations.append(dict(annotations[1], multiple_choice_answer="no", answers=[{"answer": "no"}] * 10))
        annotations[2]["image_id"] = 77

    edit_json(questions_path, repeat_question_90)
    edit_json(annotations_path, repeat_annotation_91_and_move_92)
    report = prepare(raw_vqa_dir, tmp_path / "prepared")

    assert [(problem["kind"], problem["path"], problem["reason"]) for problem in report["problems"]] == [
        (
            "duplicate_question",
            str(questions_path),
            "questions[24] repeats question 90 of questions[0]; only the first is kept",
        ),
        (
            "duplicate_annotation",
            str(annotations_path),
            "annotations[24] repeats question 91 of annotations[1]; only the first is kept",
        ),
        (
            "image_mismatch",
            str(annotations_path),
            f"the annotation of question 92 is about image 77, the question in {questions_path} about image 9",
        ),
    ]
    # 24 questions, one of them in two records, and one left out.
    assert report["splits"]["train"] == {"questions": 24, "kept": 23}
    train = {row["question_id"]: row for row in load_from_disk(str(tmp_path / "prepared" / "questions" / "train"))}
    assert len(train) == 23 and 92 not in train
    assert train[90]["question"] == "What color is the car?"
    assert train[91]["multiple_choice_answer"] == "yes"

    with pytest.raises(
        ValueError, match=r"questions\[24\] repeats question 90 of questions\[0\]; .* \(stopped by --strict\)"
    ):
        prepare(raw_vqa_dir, tmp_path / "strict", strict=True)


def test_a_repeated_test_question_is_answered_and_not_counted_as_left_out(raw_vqa_dir, tmp_path):
    """Its first record is kept, so every question is answered: the predictions of the split are not said to lack
    one."""
    questions_path = raw_vqa_dir / "vqa" / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    edit_json(questions_path, lambda content: content["questions"].append(dict(content["questions"][0])))
    report = prepare(raw_vqa_dir, tmp_path / "prepared")
    assert [problem["kind"] for problem in report["problems"]] == ["duplicate_question"]
    assert report["splits"]["test-dev"] == {"questions": 1, "kept": 1}
    assert questions_left_out(tmp_path / "prepared", "test-dev") == {}
    assert questions_left_out_warning(tmp_path / "prepared", "test-dev") is None


def eval_split_message(split: str, num_dropped: int, num_questions: int, problems: str) -> str:
    return (
        f"{split}: {num_dropped} of its {num_questions} questions would be left out ({problems}); an evaluation split "
        "needs every question, pass --allow_incomplete_eval_splits to leave them out"
    )


@pytest.mark.parametrize(
    ("folder", "image_id", "split", "num_questions"), [("val2014", 164, "val", 12), ("test2015", 57, "test", 3)]
)
def test_eval_questions_without_feature_files_stop_before_any_image_is_converted_unless_allowed(
    raw_vqa_dir, tmp_path, monkeypatch, folder, image_id, split, num_questions
):
    npz_path(raw_vqa_dir, folder, image_id).unlink()
    num_missing = 3 if split == "val" else 1
    questions_path = raw_vqa_dir / "vqa" / f"v2_OpenEnded_mscoco_{folder}_questions.json"
    problems = f"{num_missing} x missing_image (first: {questions_path}: its image {image_id} has no features)"
    decoded = []
    decode_image = prepare_vqa_module.decode_image
    monkeypatch.setattr(prepare_vqa_module, "decode_image", lambda *args: decoded.append(1) or decode_image(*args))
    with pytest.raises(ValueError, match=re.escape(eval_split_message(split, num_missing, num_questions, problems))):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not decoded and not (tmp_path / "prepared").exists()

    report = prepare(raw_vqa_dir, tmp_path / "prepared", allow_incomplete_eval_splits=True)
    assert report["splits"][split] == {"questions": num_questions, "kept": num_questions - num_missing}
    assert report["problem_counts"] == {"missing_image": num_missing}


def test_eval_questions_of_unusable_images_stop_once_the_images_are_converted(raw_vqa_dir, tmp_path):
    path = npz_path(raw_vqa_dir, "val2014", 164)
    path.write_bytes(b"not a zip archive")
    questions_path = raw_vqa_dir / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    # The image's own fault is in the message: a failed run writes no report.json.
    reason = "it is no .npz archive (a zip file), but starts with the bytes b'not a '"
    problems = f"3 x missing_image (first: {questions_path}: its image 164 was left out (unreadable: {path}: {reason}))"
    with pytest.raises(ValueError, match=re.escape(eval_split_message("val", 3, 12, problems))):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("split", ["test", "test-dev"])
def test_one_test_or_test_dev_question_of_an_unusable_image_stops_the_conversion(raw_vqa_dir, tmp_path, split):
    """One question left out of a split the evaluation server wants whole is one too many, in test-dev too."""
    vqa_dir = raw_vqa_dir / "vqa"
    if split == "test-dev":
        # Test-dev alone, with a second question that keeps the split from being left out whole.
        (vqa_dir / "v2_OpenEnded_mscoco_test2015_questions.json").unlink()
        test_dev = [{"image_id": image_id, "question": "Where is the zebra?", "question_id": 500 + image_id}
                    for image_id in (19, 57)]  # fmt: skip
        (vqa_dir / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps({"questions": test_dev}))
    npz_path(raw_vqa_dir, "test2015", 57).write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=re.escape(f"{split}: 1 of its {3 if split == 'test' else 2} questions would")):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_val_questions_without_their_annotation_stop_unless_allowed(raw_vqa_dir, tmp_path):
    annotations_path = raw_vqa_dir / "vqa" / VAL_ANNOTATIONS_FILE
    questions_path = raw_vqa_dir / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = json.loads(annotations_path.read_text())["annotations"]
    dropped, moved = annotations[0], annotations[1]

    def drop_the_first_and_move_the_second(content):
        del content["annotations"][0]
        content["annotations"][0]["image_id"] = 77

    edit_json(annotations_path, drop_the_first_and_move_the_second)
    problems = (
        f"1 x missing_annotation (first: {questions_path}: question {dropped['question_id']} has no annotation in "
        f"{annotations_path}), 1 x image_mismatch (first: {annotations_path}: the annotation of question "
        f"{moved['question_id']} is about image 77, the question in {questions_path} about image {moved['image_id']})"
    )
    with pytest.raises(ValueError, match=re.escape(eval_split_message("val", 2, 12, problems))):
        prepare(raw_vqa_dir, tmp_path / "prepared")

    report = prepare(raw_vqa_dir, tmp_path / "prepared", allow_incomplete_eval_splits=True)
    assert report["splits"]["val"] == {"questions": 12, "kept": 10}


def test_existing_output_is_refused_without_overwrite(raw_vqa_dir, tmp_path):
    output_dir = tmp_path / "prepared"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{output_dir} already exists; pass --overwrite to replace it"):
        prepare(raw_vqa_dir, output_dir)
    assert (output_dir / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_prepared_dataset(raw_vqa_dir, tmp_path, monkeypatch):
    output_dir = tmp_path / "prepared"
    prepare(raw_vqa_dir, output_dir)
    rename = Path.rename

    def rename_as_windows_does(path, target):
        # Windows renames nothing onto an existing file or folder, empty or not.
        if Path(target).exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", rename_as_windows_does)
    for name in ("VG_questions.json", "VG_annotations.json"):
        (raw_vqa_dir / "vqa" / name).unlink()
    report = prepare(raw_vqa_dir, output_dir, overwrite=True)
    assert "vg" not in report["splits"] and not (output_dir / "questions" / "vg").exists()
    assert json.loads((output_dir / "report.json").read_text()) == report
    assert not leftovers(output_dir)


@pytest.mark.parametrize(
    ("entries", "found"),
    [
        (["keep.txt", "images/"], "it holds keep.txt"),
        (["images/", "questions/", "processor/"], "it has no report.json"),
    ],
)
def test_overwrite_refuses_a_folder_that_is_not_a_prepared_dataset(raw_vqa_dir, tmp_path, entries, found):
    output_dir = tmp_path / "prepared"
    output_dir.mkdir()
    for entry in entries:
        (output_dir / entry).mkdir() if entry.endswith("/") else (output_dir / entry).write_text("mine")
    message = (
        f"{output_dir} is not a prepared dataset ({found}), and --overwrite replaces only a folder of images, "
        "questions, processor, report.json: remove it yourself or choose another output_dir"
    )
    with pytest.raises(FileExistsError, match=re.escape(message)):
        prepare(raw_vqa_dir, output_dir, overwrite=True)
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(entry.rstrip("/") for entry in entries)
    assert not leftovers(output_dir)


def symlink_to(target: Path) -> Path:
    link = target.parent / "link"
    link.symlink_to(target)
    return link


@pytest.mark.parametrize(
    ("output_of", "relation"),
    [
        (lambda data_root: data_root, "is"),
        (symlink_to, "is"),
        (lambda data_root: data_root / "prepared", "lies inside"),
        (lambda data_root: data_root.parent, "contains"),
    ],
    ids=["data_root", "symlink", "inside", "parent"],
)
def test_output_dir_overlapping_data_root_is_refused_and_the_raw_data_kept(raw_vqa_dir, output_of, relation):
    raw_files = sorted(raw_vqa_dir.rglob("*"))
    output_dir = output_of(raw_vqa_dir)
    message = (
        f"output_dir {output_dir} {relation} data_root {raw_vqa_dir}: choose an output_dir apart from the raw data, "
        "which --overwrite would otherwise delete"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(raw_vqa_dir, output_dir, overwrite=True)
    assert sorted(raw_vqa_dir.rglob("*")) == raw_files


def test_output_dir_holding_a_feature_file_is_refused(raw_vqa_dir, tmp_path):
    tsv_dir = tmp_path / "tsv"
    tsv_dir.mkdir()
    tsv_path = tsv_dir / "features.tsv"
    tsv_path.write_text("".join(all_tsv_lines()))
    message = f"output_dir {tsv_dir} holds the feature file {tsv_path}: choose an output_dir apart from it"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(raw_vqa_dir, tsv_dir, features_tsv=[tsv_path], overwrite=True)
    assert tsv_path.read_text() == "".join(all_tsv_lines())


def test_failure_half_way_leaves_no_dataset(raw_vqa_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # Fails after the images are written, while the questions are.
    monkeypatch.setattr(prepare_vqa_module, "write_questions", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(raw_vqa_dir, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and not leftovers(tmp_path / "prepared")


def leftover(folder: Path, lock_file: bool) -> Path:
    folder.mkdir()
    if lock_file:
        (folder / prepare_vqa_module.WORK_LOCK).touch()
    return folder


def test_leftovers_of_a_killed_run_are_removed_and_those_of_a_live_one_kept(raw_vqa_dir, tmp_path, capsys):
    # Whose process is gone shows in its lock, not its name: a container's runs all have process id 1.
    killed = leftover(tmp_path / ".prepared.partial-1", lock_file=True)
    running = tmp_path / ".prepared.partial-2"
    running.mkdir()
    starting = leftover(tmp_path / ".prepared.partial-3", lock_file=False)  # its lock file is not there yet
    lock = prepare_vqa_module._hold_lock(running)
    try:
        prepare(raw_vqa_dir, tmp_path / "prepared")
    finally:
        os.close(lock)
    assert not killed.exists() and running.exists() and starting.exists()
    assert f"Keeping {running}: a conversion may still be writing it" in capsys.readouterr().out
    # The dataset does not carry the lock file of its run.
    assert not (tmp_path / "prepared" / prepare_vqa_module.WORK_LOCK).exists()
    assert image_rows(tmp_path / "prepared")


@pytest.mark.parametrize("locks", ["no fcntl", "no locks on the file system"])
def test_leftovers_are_kept_where_there_are_no_locks(raw_vqa_dir, tmp_path, monkeypatch, locks):
    if locks == "no fcntl":
        monkeypatch.setattr(prepare_vqa_module, "fcntl", None)  # as on Windows
    else:

        def refuse(descriptor, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # as some network shares do

        real = prepare_vqa_module.fcntl
        monkeypatch.setattr(
            prepare_vqa_module, "fcntl", SimpleNamespace(flock=refuse, LOCK_EX=real.LOCK_EX, LOCK_NB=real.LOCK_NB)
        )
    stale = leftover(tmp_path / ".prepared.partial-1", lock_file=True)
    prepare(raw_vqa_dir, tmp_path / "prepared")
    assert leftovers(tmp_path / "prepared") == [stale] and image_rows(tmp_path / "prepared")


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_symlinked_output_dir_has_its_target_replaced(raw_vqa_dir, tmp_path):
    target = tmp_path / "disk" / "prepared"
    prepare(raw_vqa_dir, target)
    link = tmp_path / "prepared"
    link.symlink_to(target)
    for name in ("VG_questions.json", "VG_annotations.json"):
        (raw_vqa_dir / "vqa" / name).unlink()
    report = prepare(raw_vqa_dir, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads((target / "report.json").read_text()) == report and "vg" not in report["splits"]
    assert not leftovers(target) and not leftovers(link)
    # Readable by whom the umask lets read it, as a folder made with mkdir is (not private as a temporary one).
    assert target.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_a_dataset_that_cannot_replace_the_output_dir_is_kept(raw_vqa_dir, tmp_path, monkeypatch):
    output_dir = tmp_path / "prepared"
    prepare(raw_vqa_dir, output_dir)
    earlier = (output_dir / "report.json").read_text()
    rename = Path.rename

    def refuse_output_dir(path, target):
        if path == output_dir:  # as a mount point refuses to move
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", refuse_output_dir)
    with pytest.raises(
        prepare_vqa_module.DatasetNotMovedError,
        match=r"the dataset is prepared, in .*\.prepared\.finished-\w+, but could not",
    ) as raised:
        prepare(raw_vqa_dir, output_dir, overwrite=True)
    assert f"could not replace {output_dir} ({os.strerror(errno.EBUSY)}): move it there yourself" in str(raised.value)
    assert (output_dir / "report.json").read_text() == earlier
    [kept] = leftovers(output_dir)
    assert kept.name.startswith(".prepared.finished-") and image_rows(kept)


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    command = [sys.executable, str(REPO_ROOT / "data_scripts" / "prepare_vqa.py"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_cli_reports_bad_input_and_exits_with_an_error(raw_vqa_dir, tmp_path):
    (tmp_path / "prepared").mkdir()
    process = run_cli("--data_root", str(raw_vqa_dir), "--output_dir", str(tmp_path / "prepared"))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"error: {tmp_path / 'prepared'} already exists; pass --overwrite to replace it" in output


def open_fifo_for_writing(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> int:
    """Opens the FIFO once the process reads it (opening it earlier fails with ENXIO)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
            time.sleep(0.05)
    raise TimeoutError(f"{path} was not opened for reading")


def test_terminated_conversion_leaves_no_dataset(raw_vqa_dir, tmp_path):
    # The features come through a FIFO that is left open after a few images, so the conversion is caught
    # half-way through writing the images.
    shutil.rmtree(raw_vqa_dir / "coco_extract")
    fifo = tmp_path / "features.tsv"
    os.mkfifo(fifo)
    output_dir = tmp_path / "prepared"
    process = run_cli(
        *("--data_root", str(raw_vqa_dir), "--output_dir", str(output_dir), "--features_tsv", str(fifo)),
        *("--feature_size", str(RAW_FEATURE_SIZE)),
    )
    fifo_fd = open_fifo_for_writing(fifo, process)
    try:
        os.write(fifo_fd, "".join(all_tsv_lines()[:3]).encode())
        assert leftovers(output_dir), "the conversion should be writing into a temporary folder"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        os.close(fifo_fd)
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert not output_dir.exists() and not leftovers(output_dir), output


def test_termination_taken_by_another_thread_interrupts_a_read_that_waits_forever():
    # The kernel may hand SIGTERM to any thread, and only a signal delivered to the main thread interrupts
    # its system call: here a thread takes it while the main thread reads a pipe that never gets data.
    child = """
import os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
from data_scripts.prepare_vqa import exit_on_termination_requests

exit_on_termination_requests()
read_end, write_end = os.pipe()
threading.Timer(0.5, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGTERM)).start()
try:
    os.read(read_end, 1)
finally:
    print("the main thread left its read")
"""
    process = subprocess.Popen(
        [sys.executable, "-c", child, str(REPO_ROOT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "the main thread left its read" in output


def test_termination_is_handled_once_and_is_not_passed_on_by_forked_workers():
    # The watcher's own signal reaches the wakeup fd too: were it passed on again, the two threads would keep
    # signalling each other (a busy core) through the clean-up. A forked decoding worker that kept the wakeup fd
    # would turn a signal to the worker (the pool terminates its workers when one dies) into the end of the run.
    child = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from data_scripts.prepare_vqa import exit_on_termination_requests

exit_on_termination_requests()
worker = os.fork()
if worker == 0:
    os._exit(0 if signal.set_wakeup_fd(-1) == -1 else 1)
print("worker's wakeup fd:", "none" if os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]) == 0 else "inherited")
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
except SystemExit as stop:
    start = time.process_time()
    time.sleep(0.5)
    print(f"exit code {stop.code}, CPU seconds while cleaning up: {time.process_time() - start:.3f}")
"""
    result = subprocess.run([sys.executable, "-c", child, str(REPO_ROOT)], capture_output=True, text=True, timeout=60)
    assert "worker's wakeup fd: none" in result.stdout, result.stdout + result.stderr
    cleanup = re.search(r"exit code (\d+), CPU seconds while cleaning up: ([\d.]+)", result.stdout)
    assert cleanup, result.stdout + result.stderr
    assert int(cleanup[1]) == 128 + signal.SIGTERM
    assert float(cleanup[2]) < 0.2, result.stdout
