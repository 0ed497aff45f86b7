import inspect
import json
import pickle
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import RAW_IMAGES, raw_region_features, write_raw_vqa
from transformers.trainer_utils import RemoveColumnsCollator

from data_scripts.prepare_vqa import prepare_vqa
from rwsan import RWSANConfig, RWSANForVQA
from rwsan.data import VQACollator, load_vqa_dataset, questions_left_out, unpack_image_features
from rwsan.processing_rwsan import RWSANProcessor, build_question_tokenizer

NUM_REGIONS = {image_id: count for images in RAW_IMAGES.values() for image_id, count in images.items()}
# Soft scores of the fixture's annotated questions over its answers ("red", "2"), by multiple-choice answer:
# five annotators give that answer and two "Two".
FIXTURE_LABELS = {"red": [1.0, 0.6], "2": [0.0, 1.0], "yes": [0.0, 0.6], "no": [0.0, 0.6]}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    prepare_vqa(write_raw_vqa(root / "datasets"), root / "prepared", feature_size=6)
    return root / "prepared"


@pytest.fixture(scope="module")
def dataset(prepared_dir):
    return load_vqa_dataset(prepared_dir, "train+val+vg")


def test_items_join_questions_to_their_image_features(dataset):
    assert len(dataset) == 24 + 12 + 2
    answers = dataset.answers
    for index in range(len(dataset)):
        item = dataset[index]
        image_id = dataset.image_ids[index]
        assert item["image_features"].dtype == np.float16
        np.testing.assert_array_equal(
            item["image_features"], raw_region_features(image_id, NUM_REGIONS[image_id]).astype(np.float16)
        )
        assert dataset.num_regions[index] == NUM_REGIONS[image_id]
        assert item["question_id"] == dataset.question_ids[index]
        # The first annotator gives the multiple-choice answer.
        np.testing.assert_allclose(item["labels"], FIXTURE_LABELS[answers[index][0]])

    # The first train question, "What color is the car?" on image 9; the first VG question, on image 25.
    first, vg = dataset[0], dataset[-2]
    assert first["question_id"] == 90 and first["input_ids"].tolist() == [2, 3, 4, 5, 6]
    assert dataset.image_ids[-2] == 25 and vg["question_id"] == 10**6 + 250
    assert vg["input_ids"].tolist() == [20, 4, 5, 21, 22]
    assert dataset.answer_types[:3] == ["other", "yes/no", "other"]
    assert dataset.questions[:2] == ["What color is the car?", "Is this a cat?"] and dataset.feature_size == 6
    assert answers[0] == ["red"] * 5 + ["Two"] * 2 + ["blue"] * 3


def test_images_written_in_many_record_batches_give_each_its_own_features(tmp_path, monkeypatch):
    """Real VQA features are written in many record batches (16 MiB each); each image's rows are found in its own."""
    import data_scripts.prepare_vqa as prepare_vqa_module

    monkeypatch.setattr(prepare_vqa_module, "WRITE_BATCH_BYTES", 1)
    prepare_vqa(write_raw_vqa(tmp_path / "datasets"), tmp_path / "prepared", feature_size=6)
    many_batches = load_vqa_dataset(tmp_path / "prepared", "train+val+vg")
    assert len(many_batches._regions.blocks) > 10
    for index in range(len(many_batches)):
        image_id = many_batches.image_ids[index]
        np.testing.assert_array_equal(
            many_batches[index]["image_features"],
            raw_region_features(image_id, NUM_REGIONS[image_id]).astype(np.float16),
        )


def test_getitems_gives_the_items_of_getitem(dataset):
    indices = [5, 0, 37, 5]
    for batched, single in zip(dataset.__getitems__(indices), (dataset[index] for index in indices)):
        assert batched.keys() == single.keys()
        for key in batched:
            np.testing.assert_array_equal(batched[key], single[key])
    assert dataset[-1]["question_id"] == dataset.question_ids[-1]
    for index in (38, -39):
        with pytest.raises(IndexError, match=f"^question index {index} is out of range for 38 questions$"):
            dataset[index]
    with pytest.raises(IndexError, match=r"question indices must be in \[0, 38\), got \[5, 38\]"):
        dataset.__getitems__([5, 38])


def test_the_most_negative_index_is_the_first_question(dataset):
    """As a list gives: dataset[-len(dataset)] is the first question, not out of range (no test held this)."""
    first, most_negative = dataset[0], dataset[-len(dataset)]
    assert most_negative.keys() == first.keys()
    for key in first:
        np.testing.assert_array_equal(most_negative[key], first[key])
    assert most_negative["question_id"] == 90


def test_regions_and_questions_are_cut(prepared_dir):
    dataset = load_vqa_dataset(prepared_dir, "train", max_question_length=3, max_regions=2)
    assert dataset[0]["input_ids"].tolist() == [2, 3, 4]
    # Image 9 has 3 regions.
    np.testing.assert_array_equal(dataset[0]["image_features"], raw_region_features(9, 3)[:2].astype(np.float16))
    assert dataset.num_regions.max() == 2
    with pytest.raises(ValueError, match="were cut to 16 words when prepared; prepare them again with"):
        load_vqa_dataset(prepared_dir, "train", max_question_length=20)


def test_by_default_the_cuts_are_those_the_data_was_prepared_with(tmp_path):
    prepare_vqa(write_raw_vqa(tmp_path / "datasets"), tmp_path / "prepared", feature_size=6, max_question_length=3)
    dataset = load_vqa_dataset(tmp_path / "prepared", "train")
    assert (dataset.max_question_length, dataset.max_regions) == (3, 100)
    assert dataset[0]["input_ids"].tolist() == [2, 3, 4]


def test_test_splits_have_no_labels(prepared_dir):
    dataset = load_vqa_dataset(prepared_dir, "test+test-dev")
    assert dataset.question_ids.tolist() == [10, 190, 570, 195]
    assert "labels" not in dataset[0] and dataset[3]["input_ids"].tolist() == [1, 4, 5, 1]
    with pytest.raises(ValueError, match="answers is not known for the unannotated split test\\+test-dev"):
        _ = dataset.answers
    batch = VQACollator(num_answers=2)(dataset.__getitems__([0, 1]))
    assert "labels" not in batch


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (
            "train+nope",
            r"Unknown split 'nope' in 'train\+nope'; .*prepared has test, test-dev, train, val, vg",
        ),
        ("train+test", r"Cannot join splits with answers \(train\) and without answers \(test\)"),
        ("train+train", r"split 'train\+train' names a split twice"),
    ],
)
def test_bad_split_is_refused(prepared_dir, split, message):
    with pytest.raises(ValueError, match=message):
        load_vqa_dataset(prepared_dir, split)


def test_folder_that_is_not_prepared_is_refused(tmp_path):
    (tmp_path / "questions").mkdir()
    with pytest.raises(ValueError, match="is not a prepared VQA dataset: it has no images, processor folder"):
        load_vqa_dataset(tmp_path)


def rewrite_table(folder, change):
    """Rewrites the one Arrow file of a saved table as `change` makes it: a valid file, whatever it now holds."""
    (path,) = folder.glob("*.arrow")
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    table = change(table)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def cut_file(folder, keep: float):
    (path,) = folder.glob("*.arrow")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def processor_of_another_preparation(folder):
    """The same words and answers, the answers in another order: each label id would name another answer."""
    processor = RWSANProcessor.from_pretrained(folder / "processor")
    processor.id2label = dict(enumerate(reversed(processor.id2label.values())))
    processor.save_pretrained(folder / "processor")


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            # What a copy cut at the end of a record batch reads as: a valid file, short of questions.
            lambda folder: rewrite_table(folder / "questions" / "train", lambda table: table.slice(0, 20)),
            r"questions/train holds 20 questions, but .*report.json records 24 kept when it was prepared",
        ),
        (
            # More rows than were kept (questions appended, or a file of another preparation) are refused too.
            lambda folder: rewrite_table(
                folder / "questions" / "train", lambda table: pa.concat_tables([table, table.slice(0, 2)])
            ),
            r"questions/train holds 26 questions, but .*report.json records 24 kept when it was prepared",
        ),
        (
            lambda folder: rewrite_table(folder / "questions" / "train", lambda table: table.slice(0, 0)),
            r"questions/train holds no questions, though prepare_vqa writes no empty split",
        ),
        (
            lambda folder: rewrite_table(folder / "images", lambda table: table.slice(0, 3)),
            r"images holds 3 images, but question \d+ refers to its row \d+: images/ was cut short or comes from "
            "another preparation",
        ),
        (
            # The train and val questions refer to rows 0 to 11: row 11 is one past the end of the images kept.
            lambda folder: rewrite_table(folder / "images", lambda table: table.slice(0, 11)),
            r"images holds 11 images, but question \d+ refers to its row 11: images/ was cut short or comes from "
            "another preparation",
        ),
        (
            lambda folder: rewrite_table(
                folder / "images", lambda table: table.take(list(range(table.num_rows))[::-1])
            ),
            r"question 90 is about image 9, but row 0 of .*images holds image \d+ \(\d+ questions so\): images/ comes "
            "from another preparation",
        ),
        (
            lambda folder: cut_file(folder / "images", 0.5),
            r"images could not be read \(\w+: .*\); the prepared dataset is",
        ),
        (
            lambda folder: (folder / "questions" / "val" / "dataset_info.json").write_text("{not json"),
            r"questions/val could not be read \(JSONDecodeError: .*\); the prepared dataset is damaged or incomplete",
        ),
        (
            lambda folder: (folder / "processor" / "processor_config.json").write_bytes(b"\xff\xfe{"),
            r"processor could not be read \(\w+: .*\); the prepared dataset is damaged or incomplete",
        ),
        (
            lambda folder: (folder / "report.json").write_text("{cut"),
            r"report.json could not be read \(JSONDecodeError: .*\); the prepared dataset is damaged",
        ),
        (
            processor_of_another_preparation,
            r"processor has other question words or answers than the questions of .* were prepared with: it comes "
            "from another preparation",
        ),
    ],
    ids=[
        "questions cut at a batch",
        "questions added",
        "empty split",
        "images cut",
        "images cut just before the last row used",
        "images of another preparation",
        "file cut",
        "table metadata",
        "processor",
        "report",
        "processor of another preparation",
    ],
)
def test_a_damaged_folder_is_refused_with_the_part_to_blame(prepared_dir, tmp_path, damage, message):
    copy = tmp_path / "prepared"
    shutil.copytree(prepared_dir, copy)
    load_vqa_dataset(copy, "train+val")
    damage(copy)
    with pytest.raises(ValueError, match=message):
        load_vqa_dataset(copy, "train+val")


def hand_items() -> list[dict]:
    return [
        {
            "input_ids": np.array([5, 6, 7]),
            "image_features": np.arange(6, dtype=np.float16).reshape(2, 3),
            "labels": np.array([0.0, 0.3, 1.0], np.float32),
            "question_id": np.int64(11),
        },
        {
            "input_ids": np.array([8]),
            "image_features": np.full((1, 3), 9, np.float16),
            "labels": np.array([0.6, 0.0, 0.0], np.float32),
            "question_id": np.int64(12),
        },
    ]


def test_collator_pads_and_masks_by_hand():
    batch = VQACollator(num_answers=3)(hand_items())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["image_features"].dtype == torch.float16
    assert batch["image_features"].tolist() == [[[0, 1, 2], [3, 4, 5]], [[9, 9, 9], [0, 0, 0]]]
    assert batch["image_attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert torch.equal(batch["labels"], torch.tensor([[0.0, 0.3, 1.0], [0.6, 0.0, 0.0]]))
    assert batch["question_id"].tolist() == [11, 12]
    assert {value.dtype for key, value in batch.items() if key not in ("image_features", "labels")} == {torch.int64}


def test_collator_rounds_padding_up_and_casts():
    collator = VQACollator(num_answers=3, max_regions=5, pad_to_multiple_of=4, image_features_dtype=torch.float32)
    batch = collator(hand_items())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["image_features"].dtype == torch.float32
    assert batch["image_features"].tolist() == [[[0, 1, 2], [3, 4, 5], *[[0, 0, 0]] * 2], [[9, 9, 9], *[[0, 0, 0]] * 3]]
    assert batch["image_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("pack_regions", [False, True])
def test_collator_lengths_already_a_multiple_are_not_rounded_up(pack_regions):
    """A length already a multiple of pad_to_multiple_of stays as it is (no test told 4 from 8 before)."""
    items = hand_items()
    items[0].update(input_ids=np.array([5, 6, 7, 8]), image_features=np.ones((4, 3), np.float16))
    items[1].update(input_ids=np.array([5, 6, 7]), image_features=np.ones((2, 3), np.float16))
    batch = unpack_image_features(VQACollator(num_answers=3, pad_to_multiple_of=4, pack_regions=pack_regions)(items))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["image_features"].shape == (2, 4, 3)
    assert batch["image_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_collator_cuts_regions_and_never_pads_them_past_max_regions():
    batch = VQACollator(num_answers=3, max_regions=1, pad_to_multiple_of=4)(hand_items())
    assert batch["image_features"].tolist() == [[[0, 1, 2]], [[9, 9, 9]]]
    assert batch["image_attention_mask"].tolist() == [[1], [1]]
    batch = VQACollator(num_answers=3, max_regions=3, pad_to_multiple_of=4)(hand_items())
    assert batch["image_attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("pack_regions", [False, True])
def test_a_batch_of_images_without_regions_pads_to_one_masked_region(pack_regions):
    """The model needs a length of at least one."""
    items = [{**item, "image_features": np.zeros((0, 3), np.float16)} for item in hand_items()]
    batch = unpack_image_features(VQACollator(num_answers=3, pack_regions=pack_regions)(items))
    assert batch["image_features"].tolist() == [[[0, 0, 0]], [[0, 0, 0]]]
    assert batch["image_attention_mask"].tolist() == [[0], [0]]
    config = RWSANConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                         image_feature_size=3, num_labels=3)  # fmt: skip
    outputs = RWSANForVQA(config).eval()(**{key: value for key, value in batch.items() if key != "question_id"})
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.logits).all()


def test_collator_never_pads_questions_past_max_question_length():
    items = [{**item, "input_ids": np.arange(2, 2 + length)} for item, length in zip(hand_items(), (5, 2))]
    batch = VQACollator(num_answers=3, max_question_length=6, pad_to_multiple_of=4)(items)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0], [1, 1, 0, 0, 0, 0]]
    # A question longer than max_question_length is kept whole, and padding still stops at the longest.
    batch = VQACollator(num_answers=3, max_question_length=4, pad_to_multiple_of=4)(items)
    assert batch["input_ids"][0].tolist() == [2, 3, 4, 5, 6]


def test_a_question_without_words_gets_the_same_logits_whatever_its_batch():
    """It attends over its padding alone, so its answer would change with the longest question of its batch: it is
    padded to max_question_length, as the processor pads it."""
    items = hand_items()
    wordless = {**items[1], "input_ids": np.zeros(0, np.int64)}
    config = RWSANConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                         image_feature_size=3, num_labels=3, max_question_length=6)  # fmt: skip
    torch.manual_seed(0)
    model = RWSANForVQA(config).eval()
    collator = VQACollator(num_answers=3, max_question_length=6, pad_to_multiple_of=2)

    def logits(batch_items) -> torch.Tensor:
        batch = collator(batch_items)
        assert batch["input_ids"].shape[1] == 6
        with torch.no_grad():
            return model(**{key: value for key, value in batch.items() if key != "question_id"}).logits[-1]

    alone, beside_three_words = logits([wordless]), logits([items[0], wordless])
    tokenizer = build_question_tokenizer({"PAD": 0, "UNK": 1})
    processor = RWSANProcessor(tokenizer, max_question_length=6, image_feature_size=3)
    processed = processor(text=["?"], image_features=[wordless["image_features"]])
    with torch.no_grad():
        expected = model(**processed).logits[0]
    torch.testing.assert_close(alone, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(beside_three_words, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options", [{}, {"max_regions": 1}, {"pad_to_multiple_of": 4, "image_features_dtype": torch.float32}]
)
def test_packed_regions_unpack_to_the_padded_batch(options):
    padded = VQACollator(num_answers=3, **options)(hand_items())
    packed = VQACollator(num_answers=3, pack_regions=True, **options)(hand_items())
    regions = 2 if options.get("max_regions") == 1 else 3
    assert packed["image_features"].shape == (regions, 3)
    assert packed["image_feature_positions"].dtype == torch.int64
    unpacked = unpack_image_features(packed)
    assert "image_feature_positions" not in unpacked and "image_feature_positions" in packed
    assert unpacked.keys() == padded.keys()
    for key, value in padded.items():
        assert unpacked[key].dtype == value.dtype and torch.equal(unpacked[key], value), key


def test_unpacking_leaves_padded_batches_alone_and_refuses_mismatched_positions():
    padded = VQACollator(num_answers=3)(hand_items())
    assert unpack_image_features(padded) is padded
    packed = VQACollator(num_answers=3, pack_regions=True)(hand_items())
    packed["image_feature_positions"] = packed["image_feature_positions"][:2]
    message = "packed image_features must be (total_regions, feature_size) with one position per region, got "
    with pytest.raises(ValueError, match=re.escape(message + "features (3, 3) and positions (2,)")):
        unpack_image_features(packed)


@pytest.mark.parametrize("pack_regions", [False, True])
def test_collator_writes_the_padding_rather_than_trusting_its_buffer(monkeypatch, pack_regions):
    uninitialised = np.empty

    def garbage(shape, dtype=float, **kwargs):
        array = uninitialised(shape, dtype, **kwargs)
        array[...] = np.nan if np.issubdtype(array.dtype, np.floating) else -1
        return array

    monkeypatch.setattr(np, "empty", garbage)
    batch = VQACollator(num_answers=3, pad_to_multiple_of=4, pack_regions=pack_regions)(hand_items())
    batch = unpack_image_features(batch)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["image_features"].tolist() == [[[0, 1, 2], [3, 4, 5], *[[0, 0, 0]] * 2], [[9, 9, 9], *[[0, 0, 0]] * 3]]
    assert batch["image_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert torch.equal(batch["labels"], torch.tensor([[0.0, 0.3, 1.0], [0.6, 0.0, 0.0]]))
    assert batch["question_id"].tolist() == [11, 12]


@pytest.mark.parametrize("pack_regions", [False, True])
def test_a_batch_crosses_from_a_worker_as_one_block(dataset, pack_regions):
    collator = VQACollator(dataset.num_answers, pad_to_multiple_of=8, pack_regions=pack_regions)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=1, collate_fn=collator)
    for index, batch in zip(range(0, len(dataset), 6), loader):
        # Every tensor a view of one shared-memory block: one hand-over between the processes.
        assert len({tensor.untyped_storage().data_ptr() for tensor in batch.values()}) == 1
        assert all(tensor.is_shared() and tensor.is_contiguous() for tensor in batch.values())
        expected = collator(dataset.__getitems__(list(range(index, min(index + 6, len(dataset))))))
        assert batch.keys() == expected.keys()
        for key, tensor in expected.items():
            assert batch[key].dtype == tensor.dtype and torch.equal(batch[key], tensor), key


def test_collator_takes_question_ids_of_any_integer_type_that_fits_int64():
    items = hand_items()
    items[0]["question_id"], items[1]["question_id"] = np.uint64(2**40), np.int32(12)
    assert VQACollator(num_answers=3)(items)["question_id"].tolist() == [2**40, 12]
    items[0]["question_id"] = np.uint64(2**63)
    with pytest.raises(ValueError, match="question_id must be one integer"):
        VQACollator(num_answers=3)(items)


def test_collator_refuses_inconsistent_items():
    with pytest.raises(ValueError, match=r"items\[0\]: labels of shape \(3,\), but the collator was built for 4"):
        VQACollator(num_answers=4)(hand_items())
    items = hand_items()
    items[1]["labels"] = items[1]["labels"][:2]
    with pytest.raises(ValueError, match=r"items\[1\]: labels of shape \(2,\), but the collator was built for 3"):
        VQACollator(num_answers=3)(items)
    items = hand_items()
    del items[1]["labels"]
    with pytest.raises(ValueError, match="'labels' is given for some items of the batch but not for others"):
        VQACollator(num_answers=3)(items)
    with pytest.raises(ValueError, match="Cannot collate an empty batch"):
        VQACollator(num_answers=3)([])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda item: item.update(input_ids=np.array([5, 6, 0])),
            r"items\[0\]: input_ids end in the padding id 0; the collator pads, and counts every token it is given "
            "as real: give the question's tokens only",
        ),
        (
            lambda item: item.update(image_features=np.concatenate([item["image_features"], np.zeros((1, 3))])),
            r"items\[0\]: the last row of image_features is all zeros, which is padding; ",
        ),
        (
            lambda item: item.update(input_ids=np.array([5.7, 6.2])),
            r"items\[0\]: input_ids must be a vector of integer token ids, got float64 of shape \(2,\)",
        ),
        (
            # Stored as int64, it would be another question's id (numpy 1 writes the scalars bare: 12345678901.7).
            lambda item: item.update(question_id=np.float64(12345678901.7)),
            r"question_id must be one integer \(int64\) an item, got \[(np.float64\()?12345678901.7\)?, ",
        ),
        (
            # A bool is an int to Python: it would be stored as question 1.
            lambda item: item.update(question_id=True),
            r"question_id must be one integer \(int64\) an item, got \[True, (np.int64\(12\)|12)\]$",
        ),
    ],
    ids=["padded question", "padded image", "float token ids", "float question id", "bool question id"],
)
def test_collator_refuses_items_it_would_mask_wrongly(change, message):
    """Padded items (the processor's with padding="max_length", the original's arrays) would have their padding
    counted as real tokens and regions."""
    items = hand_items()
    change(items[0])
    with pytest.raises(ValueError, match=f"^{message}"):
        VQACollator(num_answers=3)(items)


@pytest.mark.parametrize("pack_regions", [False, True])
def test_collator_takes_torch_items_and_promotes_mixed_feature_dtypes(pack_regions):
    items = hand_items()
    items[1]["image_features"] = np.full((1, 3), 1e5, np.float32)  # beyond float16
    as_tensors = [{key: torch.as_tensor(value) for key, value in item.items()} for item in items]
    collator = VQACollator(num_answers=3, pack_regions=pack_regions)
    for batch in (collator(items), collator(as_tensors)):
        features = unpack_image_features(batch)["image_features"]
        assert features.dtype == torch.float32 and features[1, 0].tolist() == [1e5] * 3
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


def test_collator_refuses_bfloat16_features_by_item_and_says_what_to_give():
    items = [{key: torch.as_tensor(value) for key, value in item.items()} for item in hand_items()]
    items[1]["image_features"] = items[1]["image_features"].bfloat16()
    message = "items[1]: image_features is a torch.bfloat16 tensor, which the collator's numpy batches cannot hold"
    with pytest.raises(ValueError, match=re.escape(message)):
        VQACollator(num_answers=3)(items)


@pytest.mark.parametrize("value", [36.0, "36", True, 0])
def test_collator_sizes_must_be_positive_integers(value):
    for name in ("max_regions", "max_question_length", "pad_to_multiple_of"):
        with pytest.raises(ValueError, match=f"^{name} must be a positive integer, got {re.escape(repr(value))}$"):
            VQACollator(num_answers=3, **{name: value})


def test_dataloader_batches(dataset):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=5, shuffle=True, num_workers=0, collate_fn=VQACollator(dataset.num_answers)
    )
    seen = []
    for batch in loader:
        for row, question_id in enumerate(batch["question_id"].tolist()):
            index = dataset.question_ids.tolist().index(question_id)
            num_regions = dataset.num_regions[index]
            assert batch["image_attention_mask"][row].sum() == num_regions
            np.testing.assert_array_equal(
                batch["image_features"][row, :num_regions].numpy(), dataset[index]["image_features"]
            )
            assert not batch["image_features"][row, num_regions:].any()
            assert torch.equal(batch["labels"][row], torch.from_numpy(dataset[index]["labels"]))
        seen += batch["question_id"].tolist()
    assert sorted(seen) == sorted(dataset.question_ids.tolist())


def test_pickled_dataset_reopens_the_same_data(dataset):
    reopened = pickle.loads(pickle.dumps(dataset))
    assert repr(reopened) == repr(dataset)
    np.testing.assert_array_equal(reopened[7]["image_features"], dataset[7]["image_features"])


def test_trainer_column_removal_gives_the_model_its_inputs(dataset):
    # What `Trainer` does with a torch dataset when `remove_unused_columns=True` (the default).
    signature_columns = [*inspect.signature(RWSANForVQA.forward).parameters, "label", "label_ids"]
    collator = RemoveColumnsCollator(VQACollator(dataset.num_answers), signature_columns)
    batch = collator(dataset.__getitems__([0, 1, 2]))
    assert sorted(batch) == [
        "attention_mask",
        "image_attention_mask",
        "image_features",
        "input_ids",
        "labels",
    ]

    config = RWSANConfig(
        vocab_size=len(dataset.processor.tokenizer),
        word_embedding_size=8,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=16,
        image_feature_size=6,
        flat_mlp_size=8,
        flat_output_size=16,
        id2label=dataset.processor.id2label,
    )
    outputs = RWSANForVQA(config).eval()(**batch)
    assert outputs.logits.shape == (3, 2) and torch.isfinite(outputs.loss)


def test_questions_left_out_are_read_from_the_preparation_report(tmp_path):
    assert questions_left_out(tmp_path, "test") == {}  # no report: nothing known
    splits = {"val": {"questions": 12, "kept": 12}, "test": {"questions": 30, "kept": 27}}
    (tmp_path / "report.json").write_text(json.dumps({"splits": splits}))
    assert questions_left_out(tmp_path, "val+test") == {"test": (3, 30)}
    assert questions_left_out(tmp_path, "val") == {}
    (tmp_path / "report.json").write_text(json.dumps({"splits": {"test": {"questions": 30}}}))
    assert questions_left_out(tmp_path, "test") == {}  # a report of another form: nothing known
