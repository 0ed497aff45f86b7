"""Tests of the RWSAN processor: question splitting and tokenization, answer normalisation and soft scores,
batching of region features, post-processing, saving and loading, and GloVe loading."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast
from transformers.testing_utils import CaptureLogger
from transformers.utils import PaddingStrategy

from rwsan import RWSANConfig, RWSANForVQA, processing_rwsan
from rwsan.processing_rwsan import (
    RWSANProcessor,
    answer_scores,
    build_question_tokenizer,
    check_processor_fits_model,
    load_glove_embeddings,
    normalize_answer,
    split_question,
)

ORIGINAL_ANSWER_DICT = Path(__file__).resolve().parents[1] / ".." / "shared" / "rwsan-original" / "answer_dict.json"

VOCAB = {
    "PAD": 0, "UNK": 1, "what": 2, "is": 3, "the": 4, "color": 5, "of": 6, "t": 7, "shirt": 8, "whats": 9,
    "café": 10, "pad": 11, "unknown": 12,
}  # fmt: skip
ID2LABEL = {0: "yes", 1: "no", 2: "2", 3: "3", 4: "t shirt"}

# Inputs written as plain Python values, so that a subprocess can be given the same batch.
SAMPLE_BATCH = {
    "text": ["What is the color of the T-shirt?", "what"],
    "image_features": [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0]]],
    "image_boxes": [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]], [[float(i)] * 4 for i in range(4)]],
    "answers": [["yes", "yes"], ["2", "two", "no"]],
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_question_tokenizer(VOCAB, max_length=4)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return RWSANProcessor(tokenizer, id2label=ID2LABEL, max_question_length=4, max_regions=3, image_feature_size=2)


def tokenizer_words(tokenizer, text):
    backend = tokenizer.backend_tokenizer
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]


@pytest.mark.parametrize(
    "question, words",
    [
        ("What is the color of the T-shirt?", ["what", "is", "the", "color", "of", "the", "t", "shirt"]),
        ("What's this?", ["whats", "this"]),
        ("a/b", ["a", "b"]),
        ("well-known/used", ["well", "known", "used"]),
        ("  many   spaces\there\nand\u00a0nbsp\u3000wide\u2028line\x85next ",
         ["many", "spaces", "here", "and", "nbsp", "wide", "line", "next"]),
        ("file\x1cseparator\x1fend", ["file", "separator", "end"]),
        ('"Quoted" (parens) *star* #hash: semi; excl! q?', ["quoted", "parens", "star", "hash", "semi", "excl", "q"]),
        ("mid.dle, don't", ["middle", "dont"]),
        ("Café CRÈME", ["café", "crème"]),
        ("İstanbul", ["i\u0307stanbul"]),
        # Python lower-cases a capital sigma that ends a word to "ς".
        ("ΟΔΟΣ ΣΑ ΟΔΟΣ. Α'Σ ΑΣ'Β", ["οδος", "σα", "οδος", "ας", "ασβ"]),
        ("", []),
        ("?!.", []),
    ],
)  # fmt: skip
def test_question_words(tokenizer, question, words):
    assert split_question(question) == words
    assert tokenizer_words(tokenizer, question) == words


def test_tokenizer_splits_like_python_for_every_known_character(tokenizer):
    # Characters this Python's Unicode database does not know (category Cn) are left out: tokenizers may know
    # them from a newer Unicode version and lower-case them where `str.lower()` cannot.
    known_characters = [
        chr(code) for code in range(sys.maxunicode + 1) if unicodedata.category(chr(code)) not in ("Cn", "Cs")
    ]
    # Each character inside a word, then just after and just before a capital sigma (Python's Final_Sigma rule).
    for template in ("A{}b", "AΣ{}", "{}Σ"):
        text = " ".join(template.format(character) for character in known_characters)
        assert tokenizer_words(tokenizer, text) == split_question(text), template


def test_tokenizer_ids_treat_special_token_names_as_words(tokenizer):
    encoded = tokenizer(["What's the T-shirt's color?", "PAD UNK UNKNOWN café Café zebra"])
    assert encoded["input_ids"] == [[9, 4, 7, 1, 5], [11, 1, 12, 10, 10, 1]]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("PAD", 0)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("UNK", 1)


def test_tokenizer_truncates_to_max_length():
    tokenizer = build_question_tokenizer(VOCAB)
    question = " ".join(["what", "is"] * 10)
    assert tokenizer(question, truncation=True)["input_ids"] == [2, 3] * 8


@pytest.mark.parametrize(
    "vocab, message",
    [
        ({"UNK": 0, "PAD": 1}, "vocab must map 'PAD' to 0 and 'UNK' to 1, got 1 and 0"),
        ({"PAD": 0, "UNK": 1, "what": 3}, r"vocab ids must be 0\.\.2, each used once"),
        ({"PAD": 0, "UNK": 1, "what": 1}, r"vocab ids must be 0\.\.2, each used once"),
    ],
)
def test_build_question_tokenizer_rejects_bad_vocab(vocab, message):
    with pytest.raises(ValueError, match=message):
        build_question_tokenizer(vocab)


@pytest.mark.parametrize(
    "answer, normalized",
    [
        ("Two", "2"), ("none", "0"), ("ten", "10"), ("The dog", "dog"), ("an apple", "apple"),
        ("a/b", "b"), ("dont", "don't"), ("Whats up", "what's up"), ("Im", "im"), ("somebody'd", "somebodyd"),
        ("1,000", "1000"), ("1,5 yes-no", "15 yesno"), ("red,white", "red white"), ("red, white", "red white"),
        ("3.5", "3.5"), ("yes.", "yes"), ("u.s.", "us"), ("10:30", "10:30"),
        ("t-shirt", "t shirt"), ("black - white", "black white"), ("hot-dog!", "hot dog"), ("(red)", "red"),
        ('"quoted"', "quoted"), ("x = y", "x y"), ("  many   spaces ", "many spaces"),
        # The official code strips at most 32 periods.
        ("." * 33 + "yes", ".yes"),
    ],
)  # fmt: skip
def test_normalize_answer(answer, normalized):
    assert normalize_answer(answer) == normalized


@pytest.mark.skipif(not ORIGINAL_ANSWER_DICT.is_file(), reason="original answer vocabulary not available")
def test_original_answer_vocabulary_is_normalized_and_loads():
    answer_to_id, id_to_answer = json.loads(ORIGINAL_ANSWER_DICT.read_text())
    assert len(answer_to_id) == 3129
    assert all(normalize_answer(answer) == answer for answer in answer_to_id)
    processor = RWSANProcessor(build_question_tokenizer(VOCAB), id2label=id_to_answer)
    assert processor.label2id == answer_to_id


def test_answer_scores_worked_example():
    # "two" normalizes to "2": "2" is given by 4 annotators, "3" by 6.
    answers = ["2"] * 3 + ["two"] + ["3"] * 6
    assert answer_scores(answers, {"2": 0, "3": 1, "4": 2}) == {0: 1.0, 1: 1.0}


def test_answer_scores_by_count():
    label2id = {"red": 0, "blue": 1, "green": 2, "black": 3, "white": 4}
    answers = ["red"] + ["blue"] * 2 + ["Green"] * 3 + ["black."] * 4 + ["white"] * 5 + ["purple"]
    assert answer_scores(answers, label2id) == {0: 0.3, 1: 0.6, 2: 0.9, 3: 1.0, 4: 1.0}
    assert answer_scores([], label2id) == {}


@pytest.mark.parametrize(
    "answers, message",
    [("yes", "answers must be a list of annotator answers, got str"), (["yes", 2], r"answers\[1\] must be a string")],
)
def test_answer_scores_rejects_bad_answers(answers, message):
    with pytest.raises(ValueError, match=message):
        answer_scores(answers, {"yes": 0})


def test_processor_batch(processor):
    batch = processor(**SAMPLE_BATCH)
    assert set(batch) == {"input_ids", "attention_mask", "image_features", "image_attention_mask", "image_boxes",
                          "labels"}  # fmt: skip
    assert torch.equal(batch["input_ids"], torch.tensor([[2, 3, 4, 5], [2, 0, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]))
    # The second image has 4 regions: max_regions (3) keeps the first 3.
    assert torch.equal(
        batch["image_features"],
        torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]]),
    )
    assert torch.equal(batch["image_attention_mask"], torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert torch.equal(
        batch["image_boxes"],
        torch.tensor([[[0.0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 0, 0]], [[0.0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]]]),
    )
    # "2" and "two" both normalize to "2", given twice: 0.6.
    assert torch.equal(batch["labels"], torch.tensor([[0.6, 0, 0, 0, 0], [0, 0.3, 0.6, 0, 0]]))
    assert {key: value.dtype for key, value in batch.items()} == {
        "input_ids": torch.int64, "attention_mask": torch.int64, "image_features": torch.float32,
        "image_attention_mask": torch.int64, "image_boxes": torch.float32, "labels": torch.float32,
    }  # fmt: skip


def test_processor_accepts_numpy_and_torch_of_any_float_dtype(processor):
    reference = processor(**SAMPLE_BATCH)
    first, second = (np.array(features) for features in SAMPLE_BATCH["image_features"])
    for image_features in (
        [first.astype(np.float16), torch.tensor(second, dtype=torch.bfloat16)],
        (torch.tensor(first, dtype=torch.float64), second.astype(np.float32)),
    ):
        batch = processor(**{**SAMPLE_BATCH, "image_features": image_features})
        assert torch.equal(batch["image_features"], reference["image_features"])


def test_processor_takes_integer_pixel_boxes(processor):
    reference = processor(**SAMPLE_BATCH)
    for image_boxes in (
        [np.asarray(boxes, dtype=np.int64) for boxes in SAMPLE_BATCH["image_boxes"]],
        [torch.tensor(boxes, dtype=torch.int32) for boxes in SAMPLE_BATCH["image_boxes"]],
    ):
        batch = processor(**{**SAMPLE_BATCH, "image_boxes": image_boxes})
        assert batch["image_boxes"].dtype == torch.float32
        assert torch.equal(batch["image_boxes"], reference["image_boxes"])


def test_processor_pads_questions_on_the_right_whatever_the_tokenizer_says(processor):
    # The LSTM reads every position from the first: padding in front would change the answers.
    reference = processor(text=["what", "the color"])
    processor.tokenizer.padding_side = "left"
    try:
        batch = processor(text=["what", "the color"])
    finally:
        processor.tokenizer.padding_side = "right"
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["input_ids"], torch.tensor([[2, 0], [4, 5]]))


def test_processor_keeps_the_first_words_whatever_the_tokenizer_says(processor):
    # As the original: a question longer than max_question_length loses its last words.
    long_question = " ".join(["what"] + ["the color"] * processor.max_question_length)
    reference = processor(text=[long_question])["input_ids"]
    processor.tokenizer.truncation_side = "left"
    try:
        batch = processor(text=[long_question])
    finally:
        processor.tokenizer.truncation_side = "right"
    assert torch.equal(batch["input_ids"], reference)
    assert reference.shape == (1, processor.max_question_length) and reference[0, :3].tolist() == [2, 4, 5]


def test_processor_padded_array_input_matches_list_input(processor):
    features = np.zeros((2, 5, 2), dtype=np.float32)
    boxes = np.zeros((2, 5, 4), dtype=np.float32)
    for index in range(2):
        num_regions = len(SAMPLE_BATCH["image_features"][index])
        features[index, :num_regions] = SAMPLE_BATCH["image_features"][index]
        boxes[index, :num_regions] = SAMPLE_BATCH["image_boxes"][index]
    from_lists = processor(**SAMPLE_BATCH)
    for image_features, image_boxes in (
        (features, boxes),
        (torch.from_numpy(features), torch.from_numpy(boxes)),
        (features, SAMPLE_BATCH["image_boxes"]),  # each image's own boxes, beside the padded features
    ):
        from_array = processor(**{**SAMPLE_BATCH, "image_features": image_features, "image_boxes": image_boxes})
        for key in from_lists:
            assert torch.equal(from_array[key], from_lists[key]), key


@pytest.mark.parametrize("as_list", [False, True], ids=["array", "list"])
def test_processor_zero_rows_are_padding_wherever_they_are(processor, as_list):
    """As for the original's `make_mask` and the model's own mask: trailing zero rows are dropped, others stay in
    place with mask 0."""
    features = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]])
    batch = processor(image_features=list(features) if as_list else features)
    assert torch.equal(batch["image_attention_mask"], torch.tensor([[1, 0, 1]]))
    assert torch.equal(batch["image_features"], features[:, :3])


def test_processor_keeps_only_the_regions_before_the_cut_up_to_their_last_real_one(processor):
    """Counted over all rows and then capped at max_regions, a real row past the cut would keep the padding before
    it and refuse a box for each region the model sees; no test held this before."""
    # max_regions is 3: the model sees rows 0 to 2, of which only row 0 is a region; row 3 is cut.
    features = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    batch = processor(image_features=[features], image_boxes=[[[0.0, 0.0, 5.0, 5.0]]])
    assert torch.equal(batch["image_features"], torch.tensor([[[1.0, 1.0]]]))
    assert torch.equal(batch["image_attention_mask"], torch.tensor([[1]]))
    assert torch.equal(batch["image_boxes"], torch.tensor([[[0.0, 0.0, 5.0, 5.0]]]))
    # A box for each row is taken too, and the same one region kept.
    boxes = np.arange(16, dtype=np.float32).reshape(4, 4)
    batch = processor(image_features=[features], image_boxes=[boxes])
    assert torch.equal(batch["image_features"], torch.tensor([[[1.0, 1.0]]]))
    assert torch.equal(batch["image_boxes"], torch.from_numpy(boxes[None, :1]))
    with pytest.raises(
        ValueError,
        match=r"^image_boxes\[0\] has 0 boxes but image_features\[0\] has 4 rows, 1 of them regions the model sees: ",
    ):
        processor(image_features=[features], image_boxes=[np.zeros((0, 4))])


def test_processor_zero_rows_appended_to_list_input_change_nothing(processor):
    appended = {
        "image_features": [np.concatenate([rows, np.zeros((5, 2))]) for rows in SAMPLE_BATCH["image_features"]],
        "image_boxes": [np.concatenate([rows, np.ones((5, 4))]) for rows in SAMPLE_BATCH["image_boxes"]],
    }
    for padding in ("longest", "max_length"):
        reference = processor(**SAMPLE_BATCH, padding=padding)
        batch = processor(**{**SAMPLE_BATCH, **appended}, padding=padding)
        for key in reference:
            assert torch.equal(batch[key], reference[key]), (padding, key)


def test_processor_padding_strategies(processor):
    inputs = {"text": ["what", "the color"], "image_features": [np.ones((1, 2))] * 2}
    longest = processor(**inputs, padding="longest")
    assert torch.equal(longest["input_ids"], torch.tensor([[2, 0], [4, 5]]))
    assert longest["image_features"].shape == (2, 1, 2)
    # As tokenizers read it, and transformers' own strategy names.
    for same in (True, PaddingStrategy.LONGEST):
        batch = processor(**inputs, padding=same)
        assert all(torch.equal(batch[key], longest[key]) for key in longest), same
    assert processor(**inputs, padding=PaddingStrategy.MAX_LENGTH)["input_ids"].shape == (2, 4)
    max_length = processor(**inputs, padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(max_length["input_ids"], [[2, 0, 0, 0], [4, 5, 0, 0]])
    np.testing.assert_array_equal(max_length["attention_mask"], [[1, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(max_length["image_attention_mask"], [[1, 0, 0], [1, 0, 0]])
    assert isinstance(max_length["image_features"], np.ndarray) and max_length["image_features"].shape == (2, 3, 2)


def test_processor_pads_a_question_without_words_as_the_original_whatever_its_batch(processor):
    # All padding, over which attention spreads evenly: padded to the longest question of its batch, its answer
    # would depend on the batch. Padded to max_question_length, it is the original's, alone or not.
    batch = processor(text=["", "?!"])
    assert torch.equal(batch["input_ids"], torch.zeros(2, 4, dtype=torch.long))
    assert torch.equal(batch["attention_mask"], torch.zeros(2, 4, dtype=torch.long))
    assert processor(text=["what", ""])["input_ids"].tolist() == [[2, 0, 0, 0], [0, 0, 0, 0]]
    assert processor(text=["what", "what is"])["input_ids"].shape == (2, 2)

    torch.manual_seed(0)
    model = RWSANForVQA(fitting_config(hidden_size=16, intermediate_size=32, flat_mlp_size=8, flat_output_size=16))
    model.eval()
    features = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[5.0, 6.0], [0.5, 0.0]])]

    def logits(questions, **options):
        with torch.no_grad():
            return model(**processor(text=questions, image_features=features[: len(questions)], **options)).logits

    alone = logits(["?!"])
    assert torch.allclose(logits(["?!", "what is the color"])[0], alone[0], atol=1e-6)
    assert torch.allclose(logits(["?!"], padding="max_length"), alone, atol=1e-6)
    # The test can fail: the answer does depend on the padding.
    one_pad = model(
        input_ids=torch.zeros(1, 1, dtype=torch.long),
        attention_mask=torch.zeros(1, 1, dtype=torch.long),
        image_features=torch.tensor(features[0], dtype=torch.float32)[None],
    ).logits
    assert not torch.allclose(one_pad, alone, atol=1e-4)


def test_processor_defaults_match_the_paper():
    processor = RWSANProcessor(build_question_tokenizer(VOCAB))
    question = " ".join(["what"] * 20)
    batch = processor(text=question, image_features=[np.ones((120, 2048))], padding="max_length")
    assert batch["input_ids"].shape == (1, 16) and batch["attention_mask"].sum() == 16
    assert batch["image_features"].shape == (1, 100, 2048) and batch["image_attention_mask"].sum() == 100
    assert processor.id2label is None and processor.label2id is None


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"image_features": [np.ones((2, 2)), np.ones((2, 3))]},
         r"image_features\[1\] has shape \(2, 3\), expected \(num_regions, 2\)"),
        ({"image_features": [np.ones((2, 2)), np.zeros((0, 2))]}, r"image_features\[1\] has no regions"),
        ({"image_features": [np.float32(1.0)]}, r"image_features\[0\] has shape \(\), expected \(num_regions, 2\)"),
        ({"image_features": np.zeros((1, 3, 2))},
         r"image_features\[0\] has no regions: all its rows are zero, which marks padding"),
        ({"image_features": [np.ones((1, 2)), np.zeros((2, 2))]},
         r"image_features\[1\] has no regions: all its rows are zero, which marks padding"),
        # Real rows past max_regions (3) are cut: the model would see none.
        ({"image_features": [np.concatenate([np.zeros((3, 2)), np.ones((2, 2))])]},
         r"image_features\[0\] has no regions: its first 3 rows \(all the model sees\) are zero, which marks padding"),
        ({"image_features": [np.array([[1.0, np.nan]])]}, r"image_features\[0\] contains NaN or infinite values"),
        ({"image_features": [np.ones((1, 2)), torch.tensor([[1.0, math.inf]])]},
         r"image_features\[1\] contains NaN or infinite values"),
        ({"image_features": [[[1.0, 2.0], [1.0]]]}, r"image_features\[0\] is not a rectangular array"),
        ({"image_features": [np.ones((1, 2)), torch.tensor([[1e300, 0.0]], dtype=torch.float64)]},
         r"image_features\[1\] holds values beyond float32's range \(the model computes in float32 at most\), "
         r"e.g. 1e\+300"),
        ({"image_features": np.array([[[1.0, 1.0], [1e-50, 0.0]]])},
         r"image_features has a row whose values are all too small for float32 \(the model computes in float32 at "
         r"most\), e.g. 1e-50: it would become all zeros, which mark padding"),
        ({"image_features": [np.ones((1, 2), dtype=np.int64)]},
         r"image_features\[0\] must hold floating-point values, got int64"),
        ({"image_features": np.ones((3, 2))},
         r"image_features must be a sequence of \(num_regions, 2\) arrays or one \(batch_size, num_regions, 2\) "
         r"array, got an array of shape \(3, 2\)"),
        ({"text": ["what", 3]}, r"text\[1\] must be a string, got int"),
        ({"text": ["what", "what \ud83d"]},
         r"text\[1\] is 'what \\ud83d', which holds half of a character \(a lone surrogate escape\): not text"),
        ({"image_features": [np.ones((1, 2))], "image_boxes": [np.ones((1, 4), dtype=bool)]},
         r"image_boxes\[0\] must hold real numbers, got bool"),
        ({"text": 3}, "text must be a list with one entry per question, got int"),
        ({"text": b"what", "image_features": [np.ones((1, 2))]},
         "text must be a list with one entry per question, got bytes"),
        ({"text": ["what", "is"], "image_features": [np.ones((1, 2))] * 3},
         "The inputs have different batch sizes: text has 2, image_features has 3"),
        ({"image_features": [np.ones((1, 2))] * 2, "image_boxes": [np.ones((1, 4))]},
         "The inputs have different batch sizes: image_features has 2, image_boxes has 1"),
        ({"text": ["what"], "answers": [["yes"], ["no"]]},
         "The inputs have different batch sizes: text has 1, answers has 2"),
        ({"image_features": [np.ones((2, 2))], "image_boxes": [np.ones((3, 4))]},
         r"image_boxes\[0\] has 3 boxes but image_features\[0\] has 2 rows, 2 of them regions the model sees: "
         r"give a box for each row, or for each of those regions"),
        ({"image_features": np.stack([np.ones((3, 2)), [[1, 1], [1, 1], [0, 0]]]),
          "image_boxes": [np.ones((3, 4)), np.ones((1, 4))]},
         r"image_boxes\[1\] has 1 boxes but image_features\[1\] has 3 rows, 2 of them regions the model sees"),
        ({"image_features": [np.ones((2, 2))], "image_boxes": [np.ones((2, 5))]},
         r"image_boxes\[0\] has shape \(2, 5\), expected \(num_regions, 4\)"),
        ({"text": ["what"], "answers": ["yes"]}, r"answers\[0\] must be a list of annotator answers, got str"),
        ({"text": ["what"], "answers": [["yes", 1]]}, r"answers\[0\]\[1\] must be a string, got int"),
        ({"text": ["what"], "padding": False},
         r"padding must be True or one of \('longest', 'max_length'\), got False"),
        ({"text": ["what"], "padding": "do_not_pad"},
         r"padding must be True or one of \('longest', 'max_length'\), got 'do_not_pad'"),
        ({"text": ["what"], "return_tensors": "tf"}, r"return_tensors must be one of \('pt', 'np'\), got 'tf'"),
        ({"text": []}, "The batch is empty."),
        ({}, "Give `text`, `image_features` or both."),
        ({"text": ["what"], "image_boxes": [np.ones((1, 4))]}, "`image_boxes` were given without `image_features`."),
    ],
)  # fmt: skip
def test_processor_rejects_bad_inputs(processor, inputs, message):
    with pytest.raises(ValueError, match=message):
        processor(**inputs)


def test_processor_needs_answer_vocabulary_for_answers_and_post_process(tokenizer):
    processor = RWSANProcessor(tokenizer)
    with pytest.raises(ValueError, match="`answers` needs an answer vocabulary"):
        processor(text=["what"], answers=[["yes"]])
    with pytest.raises(ValueError, match="`post_process` needs an answer vocabulary"):
        processor.post_process(torch.zeros(1, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"id2label": ["yes", "no"]}, "id2label must map answer ids to answers, got list"),
        ({"id2label": {0: "yes", 2: "no"}}, r"id2label ids must be 0\.\.1, each used once"),
        ({"id2label": {0: "yes", "one": "no"}}, "id2label must map integer ids to strings, got 'one': 'no'"),
        ({"id2label": {0: "yes", 1: "yes"}}, "id2label has repeated answers"),
        ({"id2label": {}}, "id2label has no answers"),
        ({"max_regions": 0}, "max_regions must be a positive integer, got 0"),
        ({"max_question_length": 2.0}, "max_question_length must be a positive integer, got 2.0"),
        ({"image_feature_size": True}, "image_feature_size must be a positive integer, got True"),
    ],
)
def test_processor_rejects_bad_settings(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RWSANProcessor(tokenizer, **kwargs)


def test_processor_rejects_tokenizer_with_other_special_ids():
    word_level = Tokenizer(WordLevel({"UNK": 0, "PAD": 1}, unk_token="UNK"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="PAD", unk_token="UNK")
    with pytest.raises(ValueError, match="The tokenizer must have pad token id 0 and unk token id 1.*got 1 and 0"):
        RWSANProcessor(tokenizer)


def fitting_config(**overrides) -> RWSANConfig:
    """The config of a model that `processor` fits, but for `overrides`."""
    fitting = {"vocab_size": len(VOCAB), "id2label": ID2LABEL, "image_feature_size": 2}
    return RWSANConfig(**{**fitting, "max_question_length": 4, "max_regions": 3, **overrides})


def test_check_processor_fits_model_passes_the_fitting_model(processor):
    check_processor_fits_model(processor, fitting_config())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"id2label": {**ID2LABEL, 3: "three"}},
         r"^The answers of model M \(5\) are not those of processor P \(5\): answer 3 is 'three' in the model but "
         r"'3' in the processor, so the model's answers would be named wrongly$"),
        ({"id2label": {**ID2LABEL, 5: "maybe"}},
         r"^The answers of model M \(6\) are not those of processor P \(5\): answer 5 is 'maybe' in the model but "
         "missing in the processor"),
        ({"vocab_size": 10},
         r"^model M embeds 10 question tokens but the tokenizer of processor P has 13: they were not built from the "
         r"same questions \(the paper's 20,573 words come from the train, val, test2015 and VG question files, all "
         r"four\)$"),
        # More rows than words is also what transformers' advice of embeddings resized to a multiple gives.
        ({"vocab_size": 16},
         r"^model M embeds 16 question tokens but the tokenizer of processor P has 13: they were not built from the "
         r"same questions \(.*, all four\); or, with words added to the tokenizer, the embedding was resized to a "
         r"multiple \(`resize_token_embeddings\(\.\.\., pad_to_multiple_of=\.\.\.\)`\): resize it to "
         r"`len\(processor\.tokenizer\)`$"),
        ({"image_feature_size": 2048},
         r"^processor P takes region features of 2 values but model M expects 2048 \(config.image_feature_size\)$"),
    ],
)  # fmt: skip
def test_check_processor_fits_model_names_what_differs(processor, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_processor_fits_model(processor, fitting_config(**overrides), "model M", "processor P")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_question_length": 14}, "processor P keeps 4 question words but model M was trained on 14 "
         "(config.max_question_length): answers may differ from the model's own"),
        ({"max_regions": 36}, "processor P keeps 3 regions but model M was trained on 36 (config.max_regions)"),
    ],
)  # fmt: skip
def test_check_processor_fits_model_warns_of_other_lengths(processor, overrides, message):
    """The model runs on any length: another cut may be meant, and is said rather than refused."""
    with CaptureLogger(processing_rwsan.logger) as captured:
        check_processor_fits_model(processor, fitting_config(**overrides), "model M", "processor P")
    assert message in captured.out
    with CaptureLogger(processing_rwsan.logger) as captured:
        check_processor_fits_model(processor, fitting_config(), "model M", "processor P")
    assert captured.out == ""


def test_check_processor_fits_model_needs_the_processor_answers(tokenizer):
    with pytest.raises(ValueError, match=r"^the processor has no answer vocabulary \(id2label\), so it cannot name"):
        check_processor_fits_model(RWSANProcessor(tokenizer, image_feature_size=2), fitting_config())


def test_processor_model_input_names(processor):
    assert processor.model_input_names == ["input_ids", "attention_mask", "image_features", "image_attention_mask"]


def test_processor_id2label_and_label2id(tokenizer):
    processor = RWSANProcessor(tokenizer, id2label={"1": "no", "0": "yes"})
    assert processor.id2label == {0: "yes", 1: "no"}
    assert processor.label2id == {"yes": 0, "no": 1}


def test_post_process(processor):
    log3, log9 = math.log(3), math.log(9)
    logits = torch.tensor([[0.0, log9, -log3, log3, -log9], [log3, 0.0, 0.0, log9, 0.0]])
    top2 = processor.post_process(logits, top_k=2)
    assert [[prediction["answer"] for prediction in row] for row in top2] == [["no", "3"], ["3", "yes"]]
    assert [[prediction["score"] for prediction in row] for row in top2] == [
        [pytest.approx(0.9), pytest.approx(0.75)],
        [pytest.approx(0.9), pytest.approx(0.75)],
    ]
    assert processor.post_process(logits, top_k=np.int64(2)) == top2
    everything = processor.post_process(logits.numpy(), top_k=10)
    assert [prediction["answer"] for prediction in everything[0]] == ["no", "3", "yes", "2", "t shirt"]
    assert [prediction["score"] for prediction in everything[0]] == pytest.approx([0.9, 0.75, 0.5, 0.25, 0.1])


def test_post_process_ranks_confident_answers_by_logit(processor):
    # Both sigmoids round to 1.0 in float32; the answer is the one with the higher logit, as argmax gives it.
    top2 = processor.post_process(torch.tensor([[17.0, 0.0, 0.0, 25.0, 0.0], [25.0, 0.0, 0.0, 17.0, 0.0]]), top_k=2)
    assert [[prediction["answer"] for prediction in row] for row in top2] == [["3", "yes"], ["yes", "3"]]
    assert top2[0][0]["score"] == 1.0


def test_post_process_rejects_nan_logits(processor):
    with pytest.raises(ValueError, match="logits contain NaN values"):
        processor.post_process(torch.tensor([[0.0, math.nan, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True, "3"])
def test_post_process_rejects_bad_top_k(processor, top_k):
    with pytest.raises(ValueError, match=f"top_k must be a positive integer, got {top_k!r}"):
        processor.post_process(torch.zeros(1, 5), top_k=top_k)


@pytest.mark.parametrize("shape", [(2, 4), (5,)])
def test_post_process_rejects_bad_logits_shape(processor, shape):
    with pytest.raises(ValueError, match=r"logits must have shape \(batch_size, 5\), got " + re.escape(str(shape))):
        processor.post_process(torch.zeros(shape))


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert {"processing_rwsan.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in tmp_path.iterdir()
    }
    saved_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved_config["auto_map"] == {"AutoProcessor": "processing_rwsan.RWSANProcessor"}
    assert saved_config["id2label"] == {str(label_id): label for label_id, label in ID2LABEL.items()}

    loaded = RWSANProcessor.from_pretrained(tmp_path)
    assert loaded.tokenizer.get_vocab() == VOCAB
    assert loaded.id2label == ID2LABEL
    assert (loaded.max_question_length, loaded.max_regions, loaded.image_feature_size) == (4, 3, 2)
    expected, actual = processor(**SAMPLE_BATCH), loaded(**SAMPLE_BATCH)
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_a_prepared_dataset_given_for_its_processor_is_pointed_to_it(processor, tmp_path):
    processor.save_pretrained(tmp_path / "vqa" / "processor")
    (tmp_path / "vqa" / "images").mkdir()
    message = f"{tmp_path / 'vqa'} has no processor_config.json: it is a prepared dataset, whose processor is in "
    message += str(tmp_path / "vqa" / "processor")
    with pytest.raises(OSError, match=f"^{re.escape(message)}$"):
        RWSANProcessor.from_pretrained(tmp_path / "vqa")


def test_loads_as_remote_code_without_rwsan(processor, tmp_path):
    saved = tmp_path / "saved"
    processor.save_pretrained(saved)
    script = textwrap.dedent(
        f"""
        import json
        import sys

        sys.modules["rwsan"] = None  # `import rwsan` now fails
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        batch = {{key: value.tolist() for key, value in processor(**{SAMPLE_BATCH!r}).items()}}
        print(json.dumps({{"module": type(processor).__module__, "batch": batch}}))
        """
    )
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["module"].startswith("transformers_modules.")
    assert output["batch"] == {key: value.tolist() for key, value in processor(**SAMPLE_BATCH).items()}


GLOVE_VOCAB = {"PAD": 0, "UNK": 1, "the": 2, "what": 3, "color": 4, "café": 5, ". . .": 6}


def write_lines(path, lines):
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def test_load_glove_embeddings(tmp_path):
    glove_path = write_lines(
        tmp_path / "glove.txt",
        [
            "the 0.1 0.2 0.3",
            ". . . 1 2 3",  # a word with spaces: the vector is the last 3 fields
            "what 1.5 -2 3e-1",
            "PAD 9 9 9 ",
            "what 4 5 6\r",  # the last line of a repeated word wins
            "at name@domain.com 7 8 9",
            "café -1 -2 -3",
            "unused x y z",  # values of words outside the vocabulary are not parsed
        ],
    )
    embeddings = load_glove_embeddings(glove_path, GLOVE_VOCAB, embedding_size=3)
    expected = torch.tensor(
        [[9, 9, 9], [0, 0, 0], [0.1, 0.2, 0.3], [4, 5, 6], [0, 0, 0], [-1, -2, -3], [1, 2, 3]], dtype=torch.float32
    )
    assert embeddings.dtype == torch.float32
    assert torch.equal(embeddings, expected)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["the 0.1 0.2 0.3", "what 0.1 0.2"], "line 2: expected a word and 3 values, found 2 fields after the first"),
        (["", "the 1 2 3"], "line 1: expected a word and 3 values, found 0 fields after the first"),
        # 4-value vectors read as 3: every word would be "the 0.1" and no row would be set
        (["the 0.1 0.2 0.3 0.4", "what 1 2 3 4"], "line 1: a word and 4 values, but the word embedding has 3"),
        (["the 0.1 x 0.3"], "line 1: the vector holds a value that is not a number"),
        (["the 0.1  0.3"], "line 1: the vector holds a value that is not a number"),
        (["the 0.1 nan 0.3"], "line 1: the vector holds NaN or infinite values"),
    ],
)
def test_load_glove_embeddings_rejects_bad_lines(tmp_path, lines, message):
    glove_path = write_lines(tmp_path / "glove.txt", lines)
    with pytest.raises(ValueError, match=message):
        load_glove_embeddings(glove_path, GLOVE_VOCAB, embedding_size=3)


def test_load_glove_embeddings_refuses_a_file_with_none_of_the_words(tmp_path):
    """Else the embedding would start at zero without a word: a file of another language or casing, say."""
    glove_path = write_lines(tmp_path / "glove.txt", ["The 0.1 0.2 0.3", "Quoi 1 2 3"])
    message = f"{glove_path} has a vector for none of the {len(GLOVE_VOCAB)} question words"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_glove_embeddings(glove_path, GLOVE_VOCAB, embedding_size=3)


def test_load_glove_embeddings_missing_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"GloVe file not found: {missing}"):
        load_glove_embeddings(missing, GLOVE_VOCAB)
