"""The "vqa-features" pipeline: answers against the model on processor outputs, batching, attention weights, bad
inputs, and loading a saved folder with and without the `rwsan` package."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, pipeline
from transformers.testing_utils import CaptureLogger

from rwsan import RWSANConfig, RWSANForVQA, pipeline_rwsan
from rwsan.pipeline_rwsan import (
    ALL_WORDS_UNKNOWN_WARNING,
    RWSANVQAPipeline,
    register_pipeline,
    save_for_pipeline,
)
from rwsan.processing_rwsan import RWSANProcessor, build_question_tokenizer

FEATURE_SIZE = 24
MAX_QUESTION_LENGTH = 6
MAX_REGIONS = 10
WORDS = ["what", "color", "is", "the", "cube", "how", "many", "balls", "are", "there", "left", "of"]
ANSWERS = ["red", "blue", "green", "yes", "no", "0", "1", "2", "3"]


def tiny_model_for(processor: RWSANProcessor, seed: int = 0) -> RWSANForVQA:
    """A random RWSAN small enough for tests, with the vocabularies and feature size of `processor`."""
    torch.manual_seed(seed)
    config = RWSANConfig(
        vocab_size=len(processor.tokenizer.get_vocab()),
        word_embedding_size=12,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        image_feature_size=processor.image_feature_size,
        max_question_length=processor.max_question_length,
        max_regions=processor.max_regions,
        flat_mlp_size=16,
        flat_output_size=48,
        text_self_attention_rank=2,
        image_self_attention_rank=4,
        guided_attention_rank=8,
        id2label=processor.id2label,
    )
    return RWSANForVQA(config).eval()


def register_for_tests():
    """What importing `rwsan` will register once rwsan/__init__.py calls it."""
    register_pipeline()
    AutoProcessor.register(RWSANConfig, RWSANProcessor, exist_ok=True)


@pytest.fixture(scope="module")
def processor() -> RWSANProcessor:
    vocab = {"PAD": 0, "UNK": 1, **{word: index for index, word in enumerate(WORDS, start=2)}}
    return RWSANProcessor(
        build_question_tokenizer(vocab, max_length=MAX_QUESTION_LENGTH),
        id2label=dict(enumerate(ANSWERS)),
        max_question_length=MAX_QUESTION_LENGTH,
        max_regions=MAX_REGIONS,
        image_feature_size=FEATURE_SIZE,
    )


@pytest.fixture(scope="module")
def model(processor) -> RWSANForVQA:
    return tiny_model_for(processor)


@pytest.fixture(scope="module")
def vqa(model, processor) -> RWSANVQAPipeline:
    return RWSANVQAPipeline(model=model, processor=processor, device="cpu")


def region_features(num_regions: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_regions, FEATURE_SIZE)).astype(np.float32)


def region_boxes(num_regions: int) -> np.ndarray:
    corners = np.arange(num_regions, dtype=np.float32)[:, None] * 10
    return np.hstack([corners, corners, corners + 50, corners + 40])


def model_answers(model, processor, questions, features, top_k) -> list[list[dict]]:
    """The answers of the model called directly on the processor's batch."""
    batch = processor(text=questions, image_features=features)
    with torch.no_grad():
        logits = model(**batch).logits
    return processor.post_process(logits, top_k=top_k)


def assert_same_answers(actual: list[dict], expected: list[dict]):
    assert [answer["answer"] for answer in actual] == [answer["answer"] for answer in expected]
    assert [answer["score"] for answer in actual] == pytest.approx([answer["score"] for answer in expected], abs=1e-6)


def write_original_npz(path: Path, features: np.ndarray, boxes: np.ndarray | None, regions_first: bool = False):
    """An image's features in the original release's layout: `x` is (feature_size, num_regions)."""
    arrays = {
        "x": features if regions_first else features.T,
        "image_h": np.array(480),
        "image_w": np.array(640),
    }
    if boxes is not None:
        arrays["bbox"] = boxes
    np.savez(path, **arrays)
    return path


def test_single_input_gives_the_model_answers_on_the_processor_outputs(vqa, model, processor):
    features = region_features(7, seed=1)
    question = "What color is the cube?"
    result = vqa({"question": question, "image_features": features}, top_k=len(ANSWERS))

    assert_same_answers(result, model_answers(model, processor, [question], [features], len(ANSWERS))[0])
    scores = [answer["score"] for answer in result]
    assert scores == sorted(scores, reverse=True) and all(0 < score < 1 for score in scores)
    assert all(answer.keys() == {"answer", "score"} for answer in result)
    # top_k defaults to 5; numpy's integers are integers.
    assert vqa({"question": question, "image_features": features}) == result[:5]
    assert vqa({"question": question, "image_features": features}, top_k=np.int64(2)) == result[:2]
    # One input by keywords, as transformers' visual-question-answering pipeline takes its question and image.
    assert vqa(question=question, image_features=features, top_k=2) == result[:2]
    with pytest.raises(ValueError, match="^the input is given twice: as dict and by the keywords image_features; "):
        vqa({"question": question, "image_features": features}, image_features=features)
    with pytest.raises(ValueError, match="^no input: give a dict with 'question' and 'image_features', or those two"):
        vqa(top_k=2)


def test_tensors_and_feature_files_in_either_layout_give_the_same_answers(vqa, tmp_path):
    features = region_features(5, seed=2)
    question = "how many balls are there"
    expected = vqa({"question": question, "image_features": features})
    inputs = [
        torch.from_numpy(features),
        torch.from_numpy(features).double(),
        write_original_npz(tmp_path / "original.npz", features, region_boxes(5)),
        str(write_original_npz(tmp_path / "regions_first.npz", features, None, regions_first=True)),
    ]
    for image_features in inputs:
        assert_same_answers(vqa({"question": question, "image_features": image_features}), expected)


def test_batches_give_the_model_answers_on_the_padded_batches(vqa, model, processor):
    questions = ["what color is the cube", "how many balls are there left of the cube", "is there"]
    features = [region_features(count, seed) for seed, count in enumerate((3, 8, 5))]
    inputs = [{"question": q, "image_features": f} for q, f in zip(questions, features)]

    results = vqa(inputs, batch_size=2, top_k=3)

    # batch_size=2 runs the first two inputs in one padded batch, then the third alone.
    expected = model_answers(model, processor, questions[:2], features[:2], 3)
    expected += model_answers(model, processor, questions[2:], features[2:], 3)
    assert len(results) == 3
    for result, expected_answers in zip(results, expected):
        assert_same_answers(result, expected_answers)
    # Padding changes nothing.
    for result, single_input in zip(results, inputs):
        assert_same_answers(result, vqa(single_input, top_k=3))


def derived_mask_answers(model, processor, question: str, features: np.ndarray, top_k: int) -> list[dict]:
    """The answers of the model on the features as they are, padding rows told by the model's own mask (as by the
    original's `make_mask`)."""
    input_ids = processor(text=[question])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, image_features=torch.from_numpy(features)[None]).logits
    return processor.post_process(logits, top_k=top_k)[0]


def test_zero_rows_are_padding_as_for_the_model_and_the_original(vqa, model, processor):
    question, top_k = "what color is the cube", len(ANSWERS)
    features = region_features(4, seed=11)
    # The original's layout: zero rows up to a fixed count (100 there).
    zero_padded = np.concatenate([features, np.zeros((6, FEATURE_SIZE), np.float32)])
    result = vqa({"question": question, "image_features": zero_padded}, top_k=top_k)
    assert_same_answers(result, vqa({"question": question, "image_features": features}, top_k=top_k))
    assert_same_answers(result, derived_mask_answers(model, processor, question, zero_padded, top_k))

    # A zero row among real ones is padding too: it gets no weight, and its box stays beside it.
    with_zero_row = np.insert(zero_padded, 2, 0.0, axis=0)
    boxes = region_boxes(len(with_zero_row))
    result = vqa({"question": question, "image_features": with_zero_row, "boxes": boxes}, output_attentions=True)
    assert_same_answers(result["answers"], derived_mask_answers(model, processor, question, with_zero_row, 5))
    assert_same_answers(result["answers"], vqa({"question": question, "image_features": features}))
    assert len(result["region_weights"]) == 5 and result["region_weights"][2] == 0
    assert result["boxes"] == boxes[:5].tolist()


def test_attention_weights_of_the_words_and_regions_the_model_saw(vqa, model, processor):
    # Seven words, of which the processor keeps six; twelve regions, of which it keeps ten.
    question = "How many balls are there, left-of the cube?"
    features, boxes = region_features(12, seed=3), region_boxes(12)
    result = vqa({"question": question, "image_features": features, "boxes": boxes}, output_attentions=True)

    assert result.keys() == {
        "answers", "question", "words", "word_weights", "region_weights", "boxes", "image_size"
    }  # fmt: skip
    assert result["question"] == question
    assert result["words"] == ["how", "many", "balls", "are", "there", "left"]
    assert result["boxes"] == boxes[:MAX_REGIONS].tolist() and result["image_size"] is None
    batch = processor(text=[question], image_features=[features])
    with torch.no_grad():
        outputs = model(**batch, output_attentions=True)
    assert result["word_weights"] == pytest.approx(outputs.question_flattening_weights[0].tolist(), abs=1e-6)
    assert result["region_weights"] == pytest.approx(outputs.image_flattening_weights[0].tolist(), abs=1e-6)
    assert sum(result["word_weights"]) == pytest.approx(1)
    assert sum(result["region_weights"]) == pytest.approx(1)
    assert_same_answers(result["answers"], processor.post_process(outputs.logits)[0])
    with_alias = vqa({"question": question, "image_features": features}, return_attention=True)
    assert with_alias["words"] == result["words"]


@pytest.mark.parametrize("tokenizer_padding_side", ["right", "left"])
def test_attention_weights_of_a_padded_batch_cover_only_real_words_and_regions(vqa, tokenizer_padding_side):
    """Batches are padded on the right whatever the tokenizer's padding_side, as the processor pads."""
    inputs = [
        {"question": "what color", "image_features": region_features(2, seed=4)},
        {"question": "is the cube left of the balls", "image_features": region_features(9, seed=5)},
    ]
    vqa.tokenizer.padding_side = tokenizer_padding_side
    try:
        batched = vqa(inputs, batch_size=2, output_attentions=True)
        assert vqa.tokenizer.padding_side == tokenizer_padding_side, "the user's setting is left as it was"
    finally:
        vqa.tokenizer.padding_side = "right"
    for result, single_input in zip(batched, inputs):
        single = vqa(single_input, output_attentions=True)
        assert result["words"] == single["words"]
        assert result["word_weights"] == pytest.approx(single["word_weights"], abs=1e-6)
        assert result["region_weights"] == pytest.approx(single["region_weights"], abs=1e-6)
    assert [len(result["region_weights"]) for result in batched] == [2, 9]
    assert [len(result["word_weights"]) for result in batched] == [2, 6]


def test_feature_file_brings_its_boxes_and_image_size(vqa, tmp_path):
    features, boxes = region_features(4, seed=6), region_boxes(4)
    path = write_original_npz(tmp_path / "image.npz", features, boxes)
    result = vqa({"question": "what color", "image_features": path}, output_attentions=True)
    assert result["boxes"] == boxes.tolist() and result["image_size"] == (640, 480)
    # Some feature extractors store the image size as one-element arrays.
    np.savez(path, x=features.T, bbox=boxes, image_w=np.array([640]), image_h=np.array([480]))
    assert vqa({"question": "what color", "image_features": path}, output_attentions=True)["image_size"] == (640, 480)
    # Boxes given with the input replace the file's.
    result = vqa({"question": "what color", "image_features": path, "boxes": boxes + 1}, output_attentions=True)
    assert result["boxes"] == (boxes + 1).tolist()


def test_features_padded_with_zeros_may_come_with_the_boxes_of_their_regions_only(vqa, tmp_path):
    # As the processor and prepare_vqa take them: some extractors pad `x` to a fixed count but not `bbox`.
    features, boxes = region_features(4, seed=6), region_boxes(4)
    zero_padded = np.concatenate([features, np.zeros((6, FEATURE_SIZE), np.float32)])
    unpadded = vqa({"question": "what color", "image_features": features, "boxes": boxes}, output_attentions=True)
    path = write_original_npz(tmp_path / "padded.npz", zero_padded, boxes)
    for image_features, given_boxes in ((zero_padded, boxes), (path, None)):
        item = {"question": "what color", "image_features": image_features, "boxes": given_boxes}
        result = vqa(item, output_attentions=True)
        assert_same_answers(result["answers"], unpadded["answers"])
        assert result["boxes"] == boxes.tolist()
    # Likewise the boxes of the regions the model sees, where the features have more rows than it takes.
    many, many_boxes = region_features(MAX_REGIONS + 2, seed=3), region_boxes(MAX_REGIONS)
    path = write_original_npz(tmp_path / "many.npz", many, many_boxes)
    assert (
        vqa({"question": "what color", "image_features": path}, output_attentions=True)["boxes"] == many_boxes.tolist()
    )


def test_a_question_of_unknown_words_is_answered_with_a_warning(vqa, model, processor):
    features = region_features(4, seed=7)
    result = vqa({"question": "Zebra giraffe?", "image_features": features}, top_k=3)
    # Answered as the original would: every word is UNK.
    assert_same_answers(result, model_answers(model, processor, ["unk unk"], [features], 3)[0])
    assert all(answer["warning"] == ALL_WORDS_UNKNOWN_WARNING for answer in result)
    # One known word is enough.
    assert all("warning" not in answer for answer in vqa({"question": "zebra color", "image_features": features}))


@pytest.mark.parametrize(
    "item, message",
    [
        ({"question": "what color", "image_features": np.zeros((3, 10))}, r"image_features has shape \(3, 10\), "
         r"expected \(num_regions, 24\)"),
        ({"question": "what color", "image_features": np.zeros((3, 2, FEATURE_SIZE))},
         r"image_features has shape \(3, 2, 24\)"),
        ({"question": "what color", "image_features": np.zeros((0, FEATURE_SIZE))}, "image_features has no regions"),
        ({"question": "what color", "image_features": np.zeros((3, FEATURE_SIZE))},
         "image_features has no regions: all its rows are zero, which marks padding"),
        ({"question": "what color",
          "image_features": np.concatenate([np.zeros((MAX_REGIONS, FEATURE_SIZE)), np.ones((1, FEATURE_SIZE))])},
         rf"image_features has no regions: its first {MAX_REGIONS} rows \(all the model sees\) are zero"),
        ({"question": "what color", "image_features": np.full((2, FEATURE_SIZE), np.nan)},
         "image_features contains NaN or infinite values"),
        ({"question": "what color", "image_features": torch.full((2, FEATURE_SIZE), float("inf"))},
         "image_features contains NaN or infinite values"),
        ({"question": "what color", "image_features": np.full((2, FEATURE_SIZE), "a")},
         "image_features must hold floating-point values, got <U1"),
        # As the processor refuses them (features of an image's pixels, say); boxes may be integers.
        ({"question": "what color", "image_features": np.ones((2, FEATURE_SIZE), np.int64)},
         "image_features must hold floating-point values, got int64"),
        # Wider floats are checked before float32 takes them: a vanishing region is not dropped as padding, and a
        # value beyond float32's range is named as such.
        ({"question": "what color", "image_features": np.array([[1.0] * FEATURE_SIZE, [1e-50] * FEATURE_SIZE])},
         "image_features has a row whose values are all too small for float32"),
        ({"question": "what color", "image_features": np.full((2, FEATURE_SIZE), 1e39)},
         r"image_features holds values beyond float32's range \(the model computes in float32 at most\), e.g. 1e\+39"),
        ({"question": "what color", "image_features": [[1.0] * FEATURE_SIZE, [1.0]]},
         "image_features is not a rectangular array"),
        ({"question": "", "image_features": np.ones((2, FEATURE_SIZE))}, "question is empty"),
        ({"question": " \t", "image_features": np.ones((2, FEATURE_SIZE))}, "question is empty"),
        ({"question": 42, "image_features": np.ones((2, FEATURE_SIZE))}, "question must be a string, got int"),
        ({"question": "?!", "image_features": np.ones((2, FEATURE_SIZE))},
         r"question '\?!' has no words once its punctuation is removed"),
        ({"question": "what \udc00", "image_features": np.ones((2, FEATURE_SIZE))},
         r"question 'what \\udc00' holds half of a character \(a lone surrogate escape\): not text"),
        ({"question": "what", "image_features": np.ones((3, FEATURE_SIZE)), "boxes": np.ones((2, 4))},
         "boxes has 2 rows but image_features has 3 rows, 3 of them regions the model sees: give a box for each "
         "row, or for each of those regions"),
        ({"question": "what", "image_features": np.ones((3, FEATURE_SIZE)), "boxes": np.ones((3, 5))},
         r"boxes has shape \(3, 5\), expected \(num_regions, 4\)"),
        # A box with one NaN would come back with the attention weights, and fail only when plotted.
        ({"question": "what", "image_features": np.ones((3, FEATURE_SIZE)),
          "boxes": np.array([[0.0, 0.0, 5.0, 5.0], [0.0, np.nan, 5.0, 5.0], [1.0, 1.0, 6.0, 6.0]])},
         "boxes contains NaN or infinite values"),
        ({"question": "what", "image_features": np.ones((3, FEATURE_SIZE)), "boxes": np.zeros((0, 4))},
         "boxes has no regions"),
        ({"question": "what", "image": np.ones((3, FEATURE_SIZE))},
         "unknown keys 'image'; an input has 'question', 'image_features' and optionally 'boxes'"),
        ({"question": "what"}, "missing 'image_features'"),
        (42, "expected a dict with 'question' and 'image_features', got int"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused_with_the_item_and_the_problem(vqa, item, message):
    with pytest.raises(ValueError, match=f"^input: {message}"):
        vqa(item)
    good = {"question": "what color", "image_features": np.ones((2, FEATURE_SIZE))}
    with pytest.raises(ValueError, match=f"^inputs\\[1\\]: {message}"):
        vqa([good, item], batch_size=2)


def test_a_bad_item_of_a_generator_is_named_by_its_place(vqa):
    """A stream of many inputs once named a bad one only "input"."""
    good = {"question": "what color", "image_features": np.ones((2, FEATURE_SIZE))}
    stream = (good if index != 4 else {"question": "what"} for index in range(6))
    with pytest.raises(ValueError, match=r"^inputs\[4\]: missing 'image_features'$"):
        list(vqa(stream, batch_size=2))
    assert len(list(vqa((good for _ in range(3)), batch_size=2))) == 3


def test_the_question_may_be_given_first(vqa):
    features = region_features(4, seed=3)
    expected = vqa({"question": "what color is it", "image_features": features}, top_k=3)
    assert vqa("what color is it", image_features=features, top_k=3) == expected
    with pytest.raises(ValueError, match="^input: missing 'image_features'$"):
        vqa("what color is it")
    with pytest.raises(ValueError, match="^the input is given twice: as str and by the keywords question, "):
        vqa("what color is it", question="what shape is it", image_features=features)


def test_unreadable_feature_files_are_refused(vqa, tmp_path):
    def ask(path):
        return vqa({"question": "what color", "image_features": path})

    missing = tmp_path / "missing.npz"
    with pytest.raises(ValueError, match=f"^input: region feature file not found: {missing}$"):
        ask(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=f"^input: region feature file {garbage}: it is no .npz archive"):
        ask(garbage)
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, x=region_features(2, seed=0).T)
    truncated.write_bytes(truncated.read_bytes()[:100])
    message = rf"^input: region feature file {truncated}: cannot read: BadZipFile\('File is not a zip file'\)$"
    with pytest.raises(ValueError, match=message):
        ask(truncated)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    message = rf"^input: region feature file {photo}: it is no .npz archive \(a zip file\), but starts"
    with pytest.raises(ValueError, match=message):
        ask(photo)
    single_array = tmp_path / "single.npy"
    np.save(single_array, region_features(2, seed=0))
    with pytest.raises(ValueError, match="it holds a single array, not an .npz archive"):
        ask(single_array)
    without_x = tmp_path / "without_x.npz"
    np.savez(without_x, features=region_features(2, seed=0))
    message = rf"^input: region feature file {without_x}: no 'x' \(the region features\) among its arrays: features$"
    with pytest.raises(ValueError, match=message):
        ask(without_x)
    wrong_size = write_original_npz(tmp_path / "wrong_size.npz", np.ones((3, 7), np.float32), None)
    with pytest.raises(
        ValueError,
        match=r"wrong_size.npz: x has shape \(7, 3\), expected \(24, num_regions\) or \(num_regions, 24\)$",
    ):
        ask(wrong_size)
    few_boxes = write_original_npz(tmp_path / "few_boxes.npz", region_features(3, seed=0), region_boxes(2))
    with pytest.raises(
        ValueError, match=r"few_boxes.npz: bbox has 2 rows but x has 3 rows, 3 of them regions the model sees: give a "
    ):
        ask(few_boxes)
    # Once a traceback (OverflowError) for an infinite size.
    features = region_features(3, seed=0)
    for width in (np.inf, np.nan, np.array([640, 641])):
        np.savez(tmp_path / "bad_size.npz", x=features.T, image_w=np.array(width), image_h=np.array(480))
        message = rf"bad_size.npz: image_w x image_h is {np.asarray(width).tolist()} x 480, expected positive whole"
        with pytest.raises(ValueError, match=re.escape(message)):
            ask(tmp_path / "bad_size.npz")
    # Boxes that would have to be unpickled are refused as faulty boxes are, naming them; once the whole file.
    np.savez(tmp_path / "object_boxes.npz", x=features.T, bbox=np.array(None))
    message = r"object_boxes.npz: bbox cannot be read: ValueError\('Object arrays cannot be loaded when allow_pickle"
    with pytest.raises(ValueError, match=message):
        ask(tmp_path / "object_boxes.npz")
    # A region count the pipeline has no use for is not read.
    for count in (np.array([3, 3]), np.array(None)):
        np.savez(tmp_path / "counted.npz", x=features.T, num_bbox=count)
        assert ask(tmp_path / "counted.npz") == vqa({"question": "what color", "image_features": features})


def test_a_feature_file_s_image_size_must_be_whole_positive_numbers_and_is_read_only_whole(vqa, tmp_path):
    """The size comes back with the attention weights (for plotting): a zero or fractional one is refused, one half of
    it is left out (None) rather than failing, and a half that cannot be read is refused by name."""
    features = region_features(3, seed=0)
    path = tmp_path / "sized.npz"
    for width in (0, 640.5, -640):
        np.savez(path, x=features.T, image_w=np.array(width), image_h=np.array(480))
        message = f"region feature file {path}: image_w x image_h is {width} x 480, expected positive whole numbers"
        with pytest.raises(ValueError, match=re.escape(message)):
            vqa({"question": "what color", "image_features": path})
    expected = vqa({"question": "what color", "image_features": features}, output_attentions=True)
    for half in ({"image_w": np.array(640)}, {"image_h": np.array(480)}):
        np.savez(path, x=features.T, **half)
        result = vqa({"question": "what color", "image_features": path}, output_attentions=True)
        assert result["image_size"] is None
        assert_same_answers(result["answers"], expected["answers"])
    np.savez(path, x=features.T, image_w=np.array(None), image_h=np.array(480))
    message = rf"^input: region feature file {path}: image_w cannot be read: ValueError\('Object arrays cannot be"
    with pytest.raises(ValueError, match=message):
        vqa({"question": "what color", "image_features": path})


def test_a_square_x_of_a_feature_file_is_read_in_the_original_layout(vqa, tmp_path):
    """With as many regions as features a region, `x` is taken as the original ships it: (feature_size, regions)."""
    features = region_features(FEATURE_SIZE, seed=1)
    np.savez(tmp_path / "square.npz", x=features.T)
    from_file = vqa({"question": "what color", "image_features": tmp_path / "square.npz"}, output_attentions=True)
    given = vqa({"question": "what color", "image_features": features}, output_attentions=True)
    transposed = vqa({"question": "what color", "image_features": features.T}, output_attentions=True)
    assert from_file["region_weights"] == pytest.approx(given["region_weights"], abs=1e-6)
    assert_same_answers(from_file["answers"], given["answers"])
    assert from_file["region_weights"] != pytest.approx(transposed["region_weights"], abs=1e-6)


def test_a_feature_file_s_x_is_checked_as_given_features_are(vqa, tmp_path):
    """Integer features (an image's pixels, say) and float64 rows that float32 would make zeros (padding) are refused
    from a file as from an array."""
    integers = tmp_path / "integers.npz"
    np.savez(integers, x=np.ones((FEATURE_SIZE, 3), np.int64))
    message = f"^input: region feature file {integers}: x must hold floating-point values, got int64$"
    with pytest.raises(ValueError, match=message):
        vqa({"question": "what color", "image_features": integers})
    vanishing = np.ones((3, FEATURE_SIZE))
    vanishing[1] = 1e-50
    np.savez(tmp_path / "vanishing.npz", x=vanishing.T)
    with pytest.raises(ValueError, match="x has a row whose values are all too small for float32"):
        vqa({"question": "what color", "image_features": tmp_path / "vanishing.npz"})
    # Named as the file's other faults are: once its path alone.
    no_regions = tmp_path / "no_regions.npz"
    np.savez(no_regions, x=np.zeros((FEATURE_SIZE, 0), np.float32))
    with pytest.raises(ValueError, match=f"^input: region feature file {no_regions}: x has no regions$"):
        vqa({"question": "what color", "image_features": no_regions})


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"top_k": 0}, "top_k must be a positive integer, got 0"),
        ({"top_k": 2.5}, "top_k must be a positive integer, got 2.5"),
        ({"output_attentions": True, "return_attention": False}, "disagree; they are the same option"),
    ],
)
def test_bad_parameters_are_refused(vqa, parameters, message):
    with pytest.raises(ValueError, match=message):
        vqa({"question": "what color", "image_features": np.ones((2, FEATURE_SIZE))}, **parameters)


def test_an_empty_list_of_inputs_is_refused(vqa):
    with pytest.raises(ValueError, match="The list of inputs is empty"):
        vqa([])


def test_a_model_in_training_mode_is_reported(processor):
    model = tiny_model_for(processor).train()
    vqa = RWSANVQAPipeline(model=model, processor=processor, device="cpu")
    with CaptureLogger(pipeline_rwsan.logger) as captured:
        vqa({"question": "what color", "image_features": np.ones((2, FEATURE_SIZE))})
    assert "The model is in training mode" in captured.out
    assert model.training


def test_a_pipeline_without_processor_is_refused(model):
    with pytest.raises(ValueError, match="RWSANVQAPipeline needs the RWSANProcessor"):
        RWSANVQAPipeline(model=model, device="cpu")


def test_a_processor_that_does_not_fit_the_model_is_refused_and_nothing_is_saved(model, processor, tmp_path):
    other_answers = RWSANProcessor(
        processor.tokenizer,
        id2label={label_id: label.upper() for label_id, label in processor.id2label.items()},
        max_question_length=MAX_QUESTION_LENGTH,
        max_regions=MAX_REGIONS,
        image_feature_size=FEATURE_SIZE,
    )
    message = r"^The answers of the model \(9\) are not those of the processor \(9\): answer 0 is 'red' in the model"
    with pytest.raises(ValueError, match=message):
        RWSANVQAPipeline(model=model, processor=other_answers, device="cpu")
    with pytest.raises(ValueError, match=message):
        save_for_pipeline(model, other_answers, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()

    # A tokenizer of more words than the embedding would otherwise fail on their ids, out of the embedding's range.
    small_embedding = RWSANForVQA(RWSANConfig(**{**model.config.to_dict(), "vocab_size": len(WORDS)}))
    with pytest.raises(
        ValueError, match="^the model embeds 12 question tokens but the tokenizer of the processor has 14"
    ):
        RWSANVQAPipeline(model=small_embedding, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def saved_folder(model, processor, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "rwsan-vqa"
    save_for_pipeline(model, processor, folder)
    return folder


def test_saved_folder_holds_the_pipeline_code_and_the_processor(saved_folder, model):
    config = json.loads((saved_folder / "config.json").read_text())
    # The encoder too loads through remote code (`AutoModel`), as a folder the model saves itself.
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rwsan.RWSANConfig",
        "AutoModel": "modeling_rwsan.RWSANModel",
        "AutoModelForVisualQuestionAnswering": "modeling_rwsan.RWSANForVQA",
    }
    assert config["custom_pipelines"] == {
        "rwsan-vqa-features": {
            "impl": "pipeline_rwsan.RWSANVQAPipeline",
            "pt": ["AutoModelForVisualQuestionAnswering"],
            "type": "multimodal",
        }
    }
    for file_name in (
        "pipeline_rwsan.py",
        "modeling_rwsan.py",
        "processing_rwsan.py",
        "region_files.py",
        "processor_config.json",
    ):
        assert (saved_folder / file_name).is_file()
    # Later checkpoints of the model, saved without the pipeline file, must not name it.
    assert not hasattr(model.config, "custom_pipelines")


def test_a_model_loaded_from_the_saved_folder_names_the_pipeline_only_where_its_code_is_saved(saved_folder, tmp_path):
    """A plain save (a checkpoint of fine-tuning from the folder, say) writes no pipeline file, so its config must not
    send `pipeline(model=folder, trust_remote_code=True)` looking for one."""
    loaded = RWSANForVQA.from_pretrained(saved_folder)
    entry = json.loads((saved_folder / "config.json").read_text())["custom_pipelines"]
    assert loaded.config.custom_pipelines == entry
    loaded.save_pretrained(tmp_path / "plain")
    assert "custom_pipelines" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert loaded.config.custom_pipelines == entry  # the model's own config is left as it was
    # Saved where the pipeline's code is, the entry stays.
    shutil.copy(saved_folder / "pipeline_rwsan.py", tmp_path / "plain")
    loaded.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["custom_pipelines"] == entry


def test_saving_to_the_hub_uploads_what_it_saved_in_one_commit(vqa, tmp_path, monkeypatch):
    commits = []

    class FakeHub:
        def create_commit(self, repo_id, operations, commit_message, **kwargs):
            commits.append((repo_id, commit_message, sorted(operation.path_in_repo for operation in operations)))

    monkeypatch.setattr("transformers.utils.hub.hf_api", FakeHub)
    monkeypatch.setattr(
        "rwsan.pipeline_rwsan.create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=f"user/{repo_id}")
    )
    # A training run's folder: its checkpoints and predictions are not this save's to upload.
    (tmp_path / "shared" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "shared" / "checkpoint-5" / "optimizer.pt").write_bytes(b"state")
    (tmp_path / "shared" / "predictions_test.json").write_text("[]")
    vqa.save_pretrained(tmp_path / "shared", push_to_hub=True, commit_message="RWSAN")
    [(repo_id, message, files)] = commits
    assert (repo_id, message) == ("user/shared", "RWSAN")
    saved = {"config.json", "model.safetensors", "pipeline_rwsan.py", "processor_config.json", "tokenizer.json"}
    assert saved <= set(files)
    assert not [name for name in files if name.startswith(("checkpoint-", "predictions_"))]


def test_saving_to_the_hub_passes_on_privacy_and_the_pull_request(vqa, tmp_path, monkeypatch):
    """`private` and `create_pr`, as `PreTrainedModel.save_pretrained` takes them, reach the repository and the
    commit: a model meant private was once created public, or pushed to main instead of a pull request."""
    repositories, commits = [], []

    class FakeHub:
        def create_commit(self, repo_id, operations, commit_message, **kwargs):
            commits.append((repo_id, kwargs.get("create_pr")))

    def create_repo(repo_id, **kwargs):
        repositories.append((repo_id, kwargs.get("private")))
        return SimpleNamespace(repo_id=f"user/{repo_id}")

    monkeypatch.setattr("transformers.utils.hub.hf_api", FakeHub)
    monkeypatch.setattr("rwsan.pipeline_rwsan.create_repo", create_repo)
    vqa.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="rwsan-vqa", private=True, create_pr=True)
    assert repositories == [("rwsan-vqa", True)]
    assert commits == [("user/rwsan-vqa", True)]


def test_pipeline_factory_loads_the_saved_folder(saved_folder, vqa):
    register_for_tests()
    item = {"question": "what color is the cube", "image_features": region_features(6, seed=8)}
    expected = vqa(item)

    remote = pipeline(model=str(saved_folder), trust_remote_code=True, device="cpu")
    assert type(remote).__module__.startswith("transformers_modules.")
    assert_same_answers(remote(item), expected)
    # The registered task runs the installed code, without trust_remote_code.
    local = pipeline("vqa-features", model=str(saved_folder), device="cpu")
    assert type(local) is RWSANVQAPipeline and type(local.processor) is RWSANProcessor
    assert_same_answers(local(item), expected)


def test_pipeline_factory_loads_a_folder_saved_without_the_pipeline(model, processor, vqa, tmp_path):
    register_for_tests()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    item = {"question": "how many balls", "image_features": region_features(4, seed=9)}
    loaded = pipeline("vqa-features", model=str(tmp_path), device="cpu")
    assert type(loaded) is RWSANVQAPipeline
    assert_same_answers(loaded(item), vqa(item))


def test_a_folder_without_the_processor_is_refused_by_name(model, tmp_path):
    register_for_tests()
    model.save_pretrained(tmp_path)
    message = f"{tmp_path} has no processor_config.json, so no RWSANProcessor to load"
    with pytest.raises(OSError, match=re.escape(message)):
        pipeline("vqa-features", model=str(tmp_path), device="cpu")


def test_saved_folder_runs_where_rwsan_cannot_be_imported(saved_folder, vqa, tmp_path):
    features_path = tmp_path / "features.npy"
    features = region_features(5, seed=10)
    np.save(features_path, features)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["rwsan"] = None  # `import rwsan` now fails
        import numpy as np
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor, pipeline

        folder = {str(saved_folder)!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True)
        vqa = pipeline(model=folder, trust_remote_code=True, device="cpu")
        item = {{"question": "what color is the cube", "image_features": np.load({str(features_path)!r})}}
        print(json.dumps({{
            "classes": [type(vqa).__module__, type(vqa.model).__module__, type(vqa.processor).__module__,
                        type(processor).__module__, type(model).__module__],
            "task": vqa.task,
            "answers": vqa(item, top_k=3),
        }}))
        """
    )
    # A private module cache, so that the copied code comes from this folder only.
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in report["classes"]), report["classes"]
    assert report["task"] == "rwsan-vqa-features"
    assert_same_answers(
        report["answers"], vqa({"question": "what color is the cube", "image_features": features}, top_k=3)
    )


def test_register_pipeline_is_idempotent():
    from transformers.pipelines import PIPELINE_REGISTRY

    register_pipeline()
    register_pipeline()
    task = PIPELINE_REGISTRY.supported_tasks["vqa-features"]
    assert task["impl"] is RWSANVQAPipeline and task["type"] == "multimodal"
    assert "vqa-features" in PIPELINE_REGISTRY.get_supported_tasks()


def test_importing_rwsan_registers_its_auto_classes_and_the_pipeline(monkeypatch):
    """What `import rwsan` registers, checked on registries emptied of it (this file's fixtures register the processor
    and the pipeline themselves): with the package installed, the Auto classes and `pipeline("vqa-features")` load a
    saved folder without `trust_remote_code`."""
    import importlib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING, MODEL_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.pipelines import PIPELINE_REGISTRY

    import rwsan

    for mapping in (CONFIG_MAPPING, MODEL_MAPPING, MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING, PROCESSOR_MAPPING):
        monkeypatch.setattr(mapping, "_extra_content", {})
    tasks = {task: entry for task, entry in PIPELINE_REGISTRY.supported_tasks.items() if task != "vqa-features"}
    monkeypatch.setattr(PIPELINE_REGISTRY, "supported_tasks", tasks)
    importlib.reload(rwsan)
    assert CONFIG_MAPPING["rwsan"] is RWSANConfig
    assert MODEL_MAPPING[RWSANConfig] is rwsan.RWSANModel
    assert MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING[RWSANConfig] is RWSANForVQA
    assert PROCESSOR_MAPPING[RWSANConfig] is RWSANProcessor
    assert PIPELINE_REGISTRY.supported_tasks["vqa-features"]["impl"] is RWSANVQAPipeline
