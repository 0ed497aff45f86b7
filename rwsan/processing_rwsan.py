"""Processor for RWSAN: question tokenization, batching of region features, VQA answer scores, GloVe loading.

This file is also copied beside saved processors and imported there by transformers' dynamic module loader
(`trust_remote_code=True`), where the `rwsan` package may not be installed: it imports only the standard
library, numpy, torch, tokenizers, transformers and `configuration_rwsan`, which saving copies beside it too.
"""

import numbers
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin
from transformers.utils import PROCESSOR_NAME, logging

from .configuration_rwsan import checked_answer_vocabulary

logger = logging.get_logger(__name__)

PAD_TOKEN = "PAD"
UNK_TOKEN = "UNK"
PADDING_STRATEGIES = ("longest", "max_length")
TENSOR_TYPES = ("pt", "np")

# Characters the original deletes from questions.
_QUESTION_PUNCTUATION = r"[.,'!?\"()*#:;]"

# Python's `str.lower()` follows Unicode's Final_Sigma rule (a capital sigma that ends a word becomes "ς"),
# whereas the `Lowercase` normalizer of tokenizers turns every "Σ" into "σ". Rewriting the final capital
# sigmas before lower-casing gives Python's result. Like Python, the pattern looks past case-ignorable
# characters (apostrophes, modifier letters, ...) on both sides for a cased one; "\K" keeps the preceding
# context out of the replaced text (a variable-length look-behind would cost quadratic time here).
_CASED_NOT_IGNORABLE = r"[\p{Cased}&&\P{Case_Ignorable}]"
_FINAL_CAPITAL_SIGMA = rf"{_CASED_NOT_IGNORABLE}\p{{Case_Ignorable}}*\KΣ(?!\p{{Case_Ignorable}}*{_CASED_NOT_IGNORABLE})"

# The original breaks words at "-" and "/". `str.split()` also splits at the information separators
# U+001C..U+001F, which tokenizers does not count as whitespace, so they become spaces too.
_QUESTION_WORD_BREAKS = r"[-/\x1c-\x1f]"

# The answer normalisation of the official VQA evaluation, which the original applies to training answers
# (`prep_ans` in its data/ans_punct.py).
_ANSWER_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ANSWER_ARTICLES = frozenset({"a", "an", "the"})
# The official contraction table, less the entries that can never change an answer here: keys with capitals
# (answers are lower-cased first) and entries that map a word to itself.
_ANSWER_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_ANSWER_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern, "(?!<=\d)(\.)(?!\d)", was meant to spare periods between digits, but its "(?!<=\d)" is
# a look-ahead that always succeeds in front of a period: only a following digit spares a period.
_STRIPPABLE_PERIOD = re.compile(r"\.(?!\d)")
# The official code passes `re.UNICODE` (= 32) as the positional `count` argument of `sub`.
_MAX_PERIODS_STRIPPED = 32

# Soft target of an answer given by `count` annotators (of usually ten), indexed by min(count, 4).
_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


# Why a string that `is_text` refuses cannot be used.
HALF_CHARACTER = "holds half of a character (a lone surrogate escape): not text"


def is_text(value: str) -> bool:
    """Whether the string can be written as UTF-8, as the tokenizer and Arrow tables need. JSON and Python strings
    may hold half of a character: a lone surrogate escape such as `"\\ud83d"`, from text cut inside an emoji."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_question(question: str) -> list[str]:
    """Splits a question into words exactly like the original RWSAN code: lower-cases it, deletes the
    characters `.,'!?"()*#:;`, breaks words at "-" and "/", and splits at whitespace."""
    return re.sub(_QUESTION_PUNCTUATION, "", question.lower()).replace("-", " ").replace("/", " ").split()


def build_question_tokenizer(vocab: Mapping[str, int], max_length: int = 16) -> PreTrainedTokenizerFast:
    """Builds the fast word-level question tokenizer.

    Its normalizer and pre-tokenizer split questions into the words of [`split_question`], except for
    characters that the running Python's Unicode database does not know yet while tokenizers does: for
    instance U+1C89, new in Unicode 16, is lower-cased by tokenizers and kept by the `str.lower()` of
    Python 3.11. VQA questions contain none of them.

    Args:
        vocab (`Mapping[str, int]`):
            Word -> id, with `"PAD"` -> 0, `"UNK"` -> 1 and ids `0..len(vocab) - 1`. Other words become UNK.
        max_length (`int`, *optional*, defaults to 16):
            The tokenizer's `model_max_length`: `tokenizer(questions, truncation=True)` keeps the first
            `max_length` words, like the original.
    """
    _check_vocab(vocab)
    check_positive_int("max_length", max_length)
    word_level = Tokenizer(WordLevel(vocab=dict(vocab), unk_token=UNK_TOKEN))
    word_level.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(_FINAL_CAPITAL_SIGMA), "ς"),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(_QUESTION_PUNCTUATION), ""),
            normalizers.Replace(Regex(_QUESTION_WORD_BREAKS), " "),
        ]
    )
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        # Questions are plain text: "PAD" in a question is the word "pad", and "UNKNOWN" is not "UNK" "NOWN".
        split_special_tokens=True,
    )


def normalize_answer(answer: str) -> str:
    """Normalizes an answer like the original's `prep_ans` (the official VQA answer processing): punctuation,
    periods, number words, articles and contractions. (`prep_ans` then deletes commas, but the punctuation step
    has already deleted or spaced every one, and the word step writes none.) This makes the training labels;
    predictions are scored after `rwsan.evaluation.normalize_answer`, the evaluation script's step, which first
    turns tabs and newlines into spaces and so can differ (`"a\\t-b-c"`: `"b c"` here, `"bc"` there)."""
    return normalize_answer_words(normalize_answer_punctuation(answer))


def normalize_answer_words(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, no articles, contractions."""
    words = (_ANSWER_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_ANSWER_CONTRACTIONS.get(word, word) for word in words if word not in _ANSWER_ARTICLES)


def answer_scores(answers: Sequence[str], label2id: Mapping[str, int]) -> dict[int, float]:
    """The original's soft VQA targets for one question.

    Each annotator answer is normalized with [`normalize_answer`]; an answer given by 1, 2, 3 or at least 4
    annotators scores 0.3, 0.6, 0.9 or 1.0. Answers missing from `label2id` are dropped.

    Returns:
        `dict[int, float]`: answer id -> score, for the answers in `label2id`.
    """
    _check_answer_list("answers", answers)
    return _soft_scores(answers, label2id)


def load_glove_embeddings(
    glove_path: str | os.PathLike, vocab: Mapping[str, int], embedding_size: int = 300
) -> torch.Tensor:
    """Reads the GloVe vectors of the words of `vocab` from a text file in the format of glove.840B.300d.txt.

    A line holds a word and `embedding_size` numbers, separated by single spaces. As a few words of the 840B
    file contain spaces, the vector is the last `embedding_size` fields and the word is all that comes before;
    the first line must hold exactly `embedding_size` numbers, so that a file of longer vectors is refused.
    The file is streamed, and only the vectors of vocabulary words are parsed.

    The original took its vectors from torchnlp's `GloVe`, which gives zeros for the words it does not have
    and, for a word on several lines, the vector of the last one. So does this function, PAD and UNK included:
    their rows are zeros unless the file has vectors for the words "PAD" and "UNK".

    Returns:
        `torch.Tensor`: float32, `(len(vocab), embedding_size)`; row `i` is the vector of the word of id `i`.

    Raises:
        ValueError: the file is not in that format, or has a vector for none of the words (another language's, or
            another tokenisation's: the vocabulary is lower case).
    """
    _check_vocab(vocab)
    check_positive_int("embedding_size", embedding_size)
    if not os.path.isfile(glove_path):
        raise FileNotFoundError(f"GloVe file not found: {glove_path}")

    row_of_word = {word.encode("utf-8"): row for word, row in vocab.items()}
    embeddings = torch.zeros(len(vocab), embedding_size)
    found = False
    with open(glove_path, "rb") as glove_file:
        for line_number, line in enumerate(glove_file, start=1):
            line = line.rstrip()
            num_fields_after_first = line.count(b" ")
            if num_fields_after_first < embedding_size:
                raise ValueError(
                    f"{glove_path}, line {line_number}: expected a word and {embedding_size} values, "
                    f"found {num_fields_after_first} fields after the first"
                )
            # Only a few words have spaces, and none opens the published files: more fields on the first line mean
            # longer vectors, whose leading values would be read as part of every word, matching none.
            if line_number == 1 and num_fields_after_first != embedding_size:
                raise ValueError(
                    f"{glove_path}, line 1: a word and {num_fields_after_first} values, but the word embedding has "
                    f"{embedding_size}: the file's vectors are of another size"
                )
            word_end = -1
            for _ in range(num_fields_after_first - embedding_size + 1):
                word_end = line.index(b" ", word_end + 1)
            row = row_of_word.get(line[:word_end])
            if row is not None:
                where = f"{glove_path}, line {line_number}"
                embeddings[row] = _parse_glove_vector(line[word_end + 1 :], where)
                found = True
    if not found:
        raise ValueError(
            f"{glove_path} has a vector for none of the {len(vocab):,} question words: the embedding would start "
            "at zero. Is it GloVe's English file (glove.840B.300d.txt)?"
        )
    return embeddings


def check_positive_int(name: str, value) -> None:
    """Refuses anything but a positive integer (numpy's too), bools and whole floats included: a float size fails
    only later, at the first slice it makes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def checked_top_k(top_k) -> int:
    """`top_k` as an int, once `check_positive_int` has taken it."""
    check_positive_int("top_k", top_k)
    return int(top_k)


def _check_vocab(vocab: Mapping[str, int]) -> None:
    if vocab.get(PAD_TOKEN) != 0 or vocab.get(UNK_TOKEN) != 1:
        raise ValueError(
            f"vocab must map {PAD_TOKEN!r} to 0 and {UNK_TOKEN!r} to 1, got {vocab.get(PAD_TOKEN)} and "
            f"{vocab.get(UNK_TOKEN)}"
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"vocab ids must be 0..{len(vocab) - 1}, each used once")


def normalize_answer_punctuation(answer: str) -> str:
    """The official `processPunctuation` (the only normalisation the evaluation gives ground-truth answers)."""
    # Like the official code, the conditions look at the answer as given, not at the partly processed one.
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(answer) is not None
    processed = answer
    for mark in _ANSWER_PUNCTUATION:
        if has_digit_comma_digit or f"{mark} " in answer or f" {mark}" in answer:
            processed = processed.replace(mark, "")
        else:
            processed = processed.replace(mark, " ")
    return _STRIPPABLE_PERIOD.sub("", processed, count=_MAX_PERIODS_STRIPPED)


def _check_answer_list(name: str, answers) -> None:
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise ValueError(f"{name} must be a list of annotator answers, got {type(answers).__name__}")
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"{name}[{index}] must be a string, got {type(answer).__name__}")


def _soft_scores(answers: Sequence[str], label2id: Mapping[str, int]) -> dict[int, float]:
    counts = Counter(normalize_answer(answer) for answer in answers)
    return {label2id[label]: _SOFT_SCORES[min(n, 4)] for label, n in counts.items() if label in label2id}


def _check_batch_sequence(name: str, batch) -> None:
    # Bytes are a sequence too, of numbers: b"what" would be four questions.
    if isinstance(batch, (str, bytes, bytearray)) or not isinstance(batch, Sequence):
        raise ValueError(f"{name} must be a list with one entry per question, got {type(batch).__name__}")


def _check_batch_sizes(**batches) -> None:
    sizes = {name: len(batch) for name, batch in batches.items() if batch is not None}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{name} has {size}" for name, size in sizes.items())
        raise ValueError(f"The inputs have different batch sizes: {described}")
    if 0 in sizes.values():
        raise ValueError("The batch is empty.")


def as_float32_array(name: str, values, integers: bool, zero_rows_mark_padding: bool = False) -> np.ndarray:
    """`values` as a float32 numpy array; they must be floating-point, or integers too where `integers`. Where
    `zero_rows_mark_padding`, a row of wider floats that float32 would make all zeros is refused."""
    if isinstance(values, torch.Tensor):
        taken = values.is_floating_point() or (integers and not values.is_complex() and values.dtype != torch.bool)
    else:
        try:
            values = np.asarray(values)
        except ValueError:  # ragged nested lists
            raise ValueError(f"{name} is not a rectangular array") from None
        taken = values.dtype.kind in ("fiu" if integers else "f")
    if not taken:
        raise ValueError(
            f"{name} must hold {'real numbers' if integers else 'floating-point values'}, got {values.dtype}"
        )
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.numpy() if values.dtype == torch.float64 else values.to(torch.float32).numpy()
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:
        # Wider floats may hold values float32 cannot, which the cast would make infinite: named as such, not as
        # the "NaN or infinite values" they were not.
        beyond = np.isfinite(values) & (np.abs(values) > np.finfo(np.float32).max)
        if beyond.any():
            raise ValueError(
                f"{name} holds values beyond float32's range (the model computes in float32 at most), e.g. "
                f"{float(values[beyond][0])}"
            )
        converted = values.astype(np.float32)
        # A row whose every value is below float32's smallest would turn into zeros: the region would silently
        # become padding.
        if zero_rows_mark_padding and values.ndim >= 2:
            vanished = values.any(axis=-1) & ~converted.any(axis=-1)
            if vanished.any():
                row = values[vanished][0]
                raise ValueError(
                    f"{name} has a row whose values are all too small for float32 (the model computes in float32 "
                    f"at most), e.g. {float(row[np.flatnonzero(row)[0]])}: it would become all zeros, which mark "
                    "padding"
                )
        return converted
    return values.astype(np.float32, copy=False)


def _region_batch(
    name: str, batch, row_size: int, integers: bool = False, zero_rows_mark_padding: bool = False
) -> list[np.ndarray]:
    """Splits a batch of region rows, a sequence of `(rows, row_size)` arrays or one `(batch_size, rows, row_size)`
    array, into checked float32 `(rows, row_size)` arrays, one per image; `integers`: integer values are taken
    too (pixel boxes), not only floating-point ones; `zero_rows_mark_padding`: see `as_float32_array`."""
    if isinstance(batch, (np.ndarray, torch.Tensor)):
        if batch.ndim != 3:
            raise ValueError(
                f"{name} must be a sequence of (num_regions, {row_size}) arrays or one (batch_size, "
                f"num_regions, {row_size}) array, got an array of shape {tuple(batch.shape)}"
            )
        items = list(as_float32_array(name, batch, integers, zero_rows_mark_padding))
    else:
        _check_batch_sequence(name, batch)
        items = [
            as_float32_array(f"{name}[{index}]", item, integers, zero_rows_mark_padding)
            for index, item in enumerate(batch)
        ]

    for index, item in enumerate(items):
        check_region_rows(f"{name}[{index}]", item, row_size)
    return items


def check_region_rows(name: str, rows: np.ndarray, row_size: int) -> None:
    """Refuses region rows that are not a `(num_regions, row_size)` array of finite values."""
    if rows.ndim != 2 or rows.shape[1] != row_size:
        raise ValueError(f"{name} has shape {tuple(rows.shape)}, expected (num_regions, {row_size})")
    if not np.isfinite(rows).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def no_regions_fault(rows: np.ndarray, max_rows: int) -> str | None:
    """Why an image's `(rows, feature_size)` features give the model no region to see, or None. All-zero rows mark
    padding, and only the first `max_rows` are seen."""
    if len(rows) == 0:
        return "has no regions"
    if rows[:max_rows].any():
        return None
    seen = f"its first {max_rows} rows (all the model sees) are" if len(rows) > max_rows else "all its rows are"
    return f"has no regions: {seen} zero, which marks padding"


def _num_rows_before_zero_padding(name: str, features: list[np.ndarray], max_rows: int) -> list[int]:
    """How many rows of each image's features to keep: the first `max_rows` but their trailing all-zero ones,
    which are padding."""
    num_rows = []
    for index, rows in enumerate(features):
        if fault := no_regions_fault(rows, max_rows):
            raise ValueError(f"{name}[{index}] {fault}")
        num_rows.append(int(np.flatnonzero(rows[:max_rows].any(axis=1))[-1]) + 1)
    return num_rows


def box_count_fault(num_boxes: int, num_rows: int, num_seen: int) -> str | None:
    """Why `num_boxes` region boxes do not go with an image's `num_rows` rows of features, of which the model sees
    the first `num_seen` (up to their zero padding or the cut), said of the features ("... has {fault}"), or None.
    They go with them as a box for each row, or for each of those regions (features padded into one array come
    with the boxes of their real regions)."""
    if num_seen <= num_boxes <= num_rows:
        return None
    return (
        f"{num_rows} rows, {num_seen} of them regions the model sees: give a box for each row, or for each of those "
        "regions"
    )


def _pad_rows(items: list[np.ndarray], num_kept_rows: list[int], num_rows: int) -> np.ndarray:
    padded = np.zeros((len(items), num_rows, items[0].shape[1]), dtype=np.float32)
    for index, (item, num_kept) in enumerate(zip(items, num_kept_rows)):
        padded[index, :num_kept] = item[:num_kept]
    return padded


def _parse_glove_vector(values: bytes, where: str) -> torch.Tensor:
    try:
        vector = torch.tensor([float(value) for value in values.split(b" ")])
    except ValueError:
        raise ValueError(f"{where}: the vector holds a value that is not a number") from None
    if not torch.isfinite(vector).all():
        raise ValueError(f"{where}: the vector holds NaN or infinite values")
    return vector


class RWSANProcessor(ProcessorMixin):
    r"""
    Builds RWSAN inputs from questions and pre-extracted region features of images (e.g. bottom-up attention
    features), builds soft answer targets, and turns answer logits into answers.

    Args:
        tokenizer ([`PreTrainedTokenizerFast`]):
            The question tokenizer, as built by [`build_question_tokenizer`] (pad id 0, unk id 1).
        id2label (`Mapping[int, str]`, *optional*):
            The answer vocabulary, answer id -> answer, with ids `0..num_answers - 1`; string ids (as in JSON
            files) are accepted. Needed for `answers=` and [`~RWSANProcessor.post_process`].
        max_question_length (`int`, *optional*, defaults to 16):
            Questions are cut to this many words; `padding="max_length"` pads them to it.
        max_regions (`int`, *optional*, defaults to 100):
            Regions beyond this many are cut; `padding="max_length"` pads the regions to it.
        image_feature_size (`int`, *optional*, defaults to 2048):
            Size of the feature vector of a region.
    """

    def __init__(
        self,
        tokenizer,
        id2label: Mapping[int, str] | None = None,
        max_question_length: int = 16,
        max_regions: int = 100,
        image_feature_size: int = 2048,
    ):
        super().__init__(tokenizer)
        if tokenizer.pad_token_id != 0 or tokenizer.unk_token_id != 1:
            raise ValueError(
                "The tokenizer must have pad token id 0 and unk token id 1 (see `build_question_tokenizer`), "
                f"got {tokenizer.pad_token_id} and {tokenizer.unk_token_id}"
            )
        check_positive_int("max_question_length", max_question_length)
        check_positive_int("max_regions", max_regions)
        check_positive_int("image_feature_size", image_feature_size)
        self.id2label = None if id2label is None else checked_answer_vocabulary(id2label)
        self.max_question_length = max_question_length
        self.max_regions = max_regions
        self.image_feature_size = image_feature_size

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """`ProcessorMixin.from_pretrained`. A local folder without `processor_config.json` (a model saved without
        its processor, say) is refused by name: loading would otherwise fail on the tokenizer, with an error that
        asks for sentencepiece."""
        folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if folder.is_dir() and not (folder / PROCESSOR_NAME).is_file():
            # A prepared dataset keeps its processor in a folder of its own.
            if (folder / "processor" / PROCESSOR_NAME).is_file():
                raise OSError(
                    f"{folder} has no {PROCESSOR_NAME}: it is a prepared dataset, whose processor is in "
                    f"{folder / 'processor'}"
                )
            raise OSError(
                f"{folder} has no {PROCESSOR_NAME}, so no RWSANProcessor to load (a model saved without it?); save "
                f"one there with processor.save_pretrained({str(folder)!r})"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        # Region boxes are returned for display only: the model does not take them.
        return ["input_ids", "attention_mask", "image_features", "image_attention_mask"]

    @property
    def label2id(self) -> dict[str, int] | None:
        if self.id2label is None:
            return None
        return {label: label_id for label_id, label in self.id2label.items()}

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        image_features=None,
        image_boxes=None,
        answers: Sequence[Sequence[str]] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = "longest",
    ) -> BatchFeature:
        """
        Prepares a batch.

        Args:
            text (`str` or `Sequence[str]`, *optional*):
                The questions.
            image_features (*optional*):
                The region features of each image: a sequence of `(num_regions_i, image_feature_size)` arrays
                or tensors (numpy or torch, any floating dtype), or one `(batch_size, num_regions,
                image_feature_size)` array or tensor. All-zero rows are padding, as in the original (and the
                model's own mask): trailing ones are dropped, others stay in place with `image_attention_mask`
                0. Regions beyond `max_regions` are cut.
            image_boxes (*optional*):
                The region boxes, given like `image_features` with 4 values per region: as many rows as the
                features of the same image, or one per region before their zero padding (features padded into
                one array may come with each image's own boxes).
            answers (`Sequence[Sequence[str]]`, *optional*):
                The annotator answers of each question, turned into soft targets as by [`answer_scores`].
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` for torch tensors, `"np"` for numpy arrays.
            padding (`bool` or `str`, *optional*, defaults to `"longest"`):
                `"longest"` (or `True`, as for tokenizers) pads questions and regions to the longest of the batch
                (questions to `max_question_length` where one of them has no words, see below); `"max_length"` pads
                them to `max_question_length` and `max_regions`, like the original. A question without words (all its
                characters punctuation, or none) is all padding, and attention over it reads the padding
                positions: padded as the original pads every question, it gets the same answer whatever its batch
                (its logits still differ from the original's by a few thousandths, see `RWSANModel.forward`).
                Further padding changes no answer of a question with words.

        Returns:
            [`BatchFeature`] with, for the inputs given:
            - `input_ids`, `attention_mask`: int64, `(batch_size, question_length)`;
            - `image_features`: float32, `(batch_size, num_regions, image_feature_size)`, zero padding rows;
            - `image_attention_mask`: int64, `(batch_size, num_regions)`, 1 for real regions (rows not all zero);
            - `image_boxes`: float32, `(batch_size, num_regions, 4)`, zero padding rows (not a model input);
            - `labels`: float32, `(batch_size, num_answers)`.
        """
        if padding is True:
            padding = "longest"
        if padding not in PADDING_STRATEGIES:
            # A batch is arrays of one length: `False` and "do_not_pad" cannot be.
            raise ValueError(f"padding must be True or one of {PADDING_STRATEGIES}, got {padding!r}")
        if return_tensors not in TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of {TENSOR_TYPES}, got {return_tensors!r}")
        if text is None and image_features is None:
            raise ValueError("Give `text`, `image_features` or both.")
        if image_boxes is not None and image_features is None:
            raise ValueError("`image_boxes` were given without `image_features`.")

        if isinstance(text, str):
            text = [text]
        if text is not None:
            _check_batch_sequence("text", text)
        if answers is not None:
            _check_batch_sequence("answers", answers)
        if image_features is not None:
            image_features = _region_batch(
                "image_features", image_features, self.image_feature_size, zero_rows_mark_padding=True
            )
        if image_boxes is not None:
            image_boxes = _region_batch("image_boxes", image_boxes, 4, integers=True)
        _check_batch_sizes(text=text, image_features=image_features, image_boxes=image_boxes, answers=answers)

        data = {}
        if text is not None:
            data.update(self._encode_questions(text, padding))
        if image_features is not None:
            data.update(self._pad_regions(image_features, image_boxes, padding))
        if answers is not None:
            data["labels"] = self._soft_labels(answers)
        return BatchFeature(data, tensor_type=return_tensors)

    def post_process(self, logits, top_k: int = 5) -> list[list[dict[str, str | float]]]:
        """
        Turns answer logits into the `top_k` most likely answers of each question, best first.

        Args:
            logits (`torch.Tensor` or `np.ndarray` of shape `(batch_size, num_answers)`):
                The model's answer logits. Scores are their sigmoids: the model is trained with binary
                cross-entropy.
            top_k (`int`, *optional*, defaults to 5):
                How many answers to give per question; more than `num_answers` gives all of them.

        Returns:
            `list[list[dict]]`: per question, `{"answer": str, "score": float}` dicts by decreasing score.
        """
        id2label = self._require_answer_vocabulary("post_process")
        top_k = checked_top_k(top_k)
        logits = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float32)
        if logits.ndim != 2 or logits.shape[1] != len(id2label):
            raise ValueError(f"logits must have shape (batch_size, {len(id2label)}), got {tuple(logits.shape)}")
        if logits.isnan().any():
            raise ValueError("logits contain NaN values")
        # Ranked by logit: the sigmoid rounds every logit above about 17 to a score of 1.0, ties in any order.
        top_logits, top_ids = logits.topk(min(top_k, len(id2label)), dim=-1)
        return [
            [{"answer": id2label[label_id], "score": score} for score, label_id in zip(row_scores, row_ids)]
            for row_scores, row_ids in zip(top_logits.sigmoid().tolist(), top_ids.tolist())
        ]

    def _encode_questions(self, questions: Sequence[str], padding: str) -> dict[str, np.ndarray]:
        for index, question in enumerate(questions):
            if not isinstance(question, str):
                raise ValueError(f"text[{index}] must be a string, got {type(question).__name__}")
            if not is_text(question):
                raise ValueError(f"text[{index}] is {question!r}, which {HALF_CHARACTER}")
        # Cut and padded on the right whatever the tokenizer's truncation_side and padding_side: the original keeps
        # a question's first words, and its LSTM runs over every position from the first, so padding in front
        # would change the answers. (verbose=False: the tokenizer would warn of questions longer than the cut.)
        encoded = self.tokenizer(list(questions), verbose=False)
        for name in ("input_ids", "attention_mask"):
            encoded[name] = [values[: self.max_question_length] for values in encoded[name]]
        if padding == "max_length" or not all(encoded["input_ids"]):
            length = self.max_question_length
        else:
            length = max(len(input_ids) for input_ids in encoded["input_ids"])
        padded = self.tokenizer.pad(
            encoded, padding="max_length", max_length=length, padding_side="right", return_tensors="np"
        )
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    def _pad_regions(
        self, image_features: list[np.ndarray], image_boxes: list[np.ndarray] | None, padding: str
    ) -> dict[str, np.ndarray]:
        num_kept_regions = _num_rows_before_zero_padding("image_features", image_features, self.max_regions)
        if image_boxes is not None:
            for index, (features, boxes, num_kept) in enumerate(zip(image_features, image_boxes, num_kept_regions)):
                if fault := box_count_fault(len(boxes), len(features), num_kept):
                    raise ValueError(
                        f"image_boxes[{index}] has {len(boxes)} boxes but image_features[{index}] has {fault}"
                    )
        num_rows = self.max_regions if padding == "max_length" else max(num_kept_regions)
        padded_features = _pad_rows(image_features, num_kept_regions, num_rows)
        batch = {
            "image_features": padded_features,
            "image_attention_mask": padded_features.any(axis=-1).astype(np.int64),
        }
        if image_boxes is not None:
            batch["image_boxes"] = _pad_rows(image_boxes, num_kept_regions, num_rows)
        return batch

    def _soft_labels(self, answers: Sequence[Sequence[str]]) -> np.ndarray:
        id2label = self._require_answer_vocabulary("answers")
        label2id = self.label2id
        labels = np.zeros((len(answers), len(id2label)), dtype=np.float32)
        for index, question_answers in enumerate(answers):
            _check_answer_list(f"answers[{index}]", question_answers)
            for label_id, score in _soft_scores(question_answers, label2id).items():
                labels[index, label_id] = score
        return labels

    def _require_answer_vocabulary(self, needed_by: str) -> dict[int, str]:
        if self.id2label is None:
            raise ValueError(f"`{needed_by}` needs an answer vocabulary: give the processor an `id2label`.")
        return self.id2label


def check_same_vocabularies(expected: RWSANProcessor, given: RWSANProcessor, expected_name: str, given_name: str):
    """Raises a `ValueError` where `given` numbers question words or answers otherwise than `expected` (data prepared
    from other question files than a model's, say): the model would read other words and name other answers."""
    for what, expected_vocabulary, given_vocabulary in (
        ("question", expected.tokenizer.get_vocab(), given.tokenizer.get_vocab()),
        ("answer", expected.id2label, given.id2label),
    ):
        if expected_vocabulary != given_vocabulary:
            raise ValueError(f"{given_name} has another {what} vocabulary than {expected_name}")


def check_processor_fits_model(
    processor: RWSANProcessor, config, model_name: str = "the model", processor_name: str = "the processor"
) -> None:
    """Raises a `ValueError` where `processor` does not fit the model of `config` (an `RWSANConfig`): other answers
    (the processor would name the model's answers wrongly), a tokenizer of another size than the word embedding
    (its ids would mean other words, or fall outside the embedding), or region features of another size. Warns
    where the processor keeps another number of question words or regions than the model was trained on
    (`config.max_question_length`, `config.max_regions`).

    `model_name` and `processor_name` say in the message which model and processor are meant.
    """
    if processor.id2label is None:
        raise ValueError(
            f"{processor_name} has no answer vocabulary (id2label), so it cannot name the answers of {model_name}"
        )
    if processor.id2label != config.id2label:
        first_difference = min(
            label_id
            for label_id in processor.id2label.keys() | config.id2label.keys()
            if processor.id2label.get(label_id) != config.id2label.get(label_id)
        )
        raise ValueError(
            f"The answers of {model_name} ({len(config.id2label)}) are not those of {processor_name} "
            f"({len(processor.id2label)}): answer {first_difference} is "
            f"{_answer_or_missing(config.id2label.get(first_difference))} in the model but "
            f"{_answer_or_missing(processor.id2label.get(first_difference))} in the processor, so the model's "
            "answers would be named wrongly"
        )
    if len(processor.tokenizer) != config.vocab_size:
        # Rows past the tokenizer's would be harmless, but a smaller vocabulary is also what a processor prepared
        # from fewer question files has, whose words would take other words' rows: the counts must agree.
        resized = (
            "; or, with words added to the tokenizer, the embedding was resized to a multiple "
            "(`resize_token_embeddings(..., pad_to_multiple_of=...)`): resize it to `len(processor.tokenizer)`"
            if config.vocab_size > len(processor.tokenizer)
            else ""
        )
        raise ValueError(
            f"{model_name} embeds {config.vocab_size} question tokens but the tokenizer of {processor_name} has "
            f"{len(processor.tokenizer)}: they were not built from the same questions (the paper's 20,573 words "
            f"come from the train, val, test2015 and VG question files, all four){resized}"
        )
    if processor.image_feature_size != config.image_feature_size:
        raise ValueError(
            f"{processor_name} takes region features of {processor.image_feature_size} values but {model_name} "
            f"expects {config.image_feature_size} (config.image_feature_size)"
        )
    # The model runs on any number of words and regions; the config records what its training kept. Another cut
    # may be meant (data prepared with longer questions, folders converted before the config took the
    # processor's lengths), so it is said, not refused.
    for name, what in (("max_question_length", "question words"), ("max_regions", "regions")):
        if getattr(processor, name) != getattr(config, name):
            logger.warning_once(
                f"{processor_name} keeps {getattr(processor, name)} {what} but {model_name} was trained on "
                f"{getattr(config, name)} (config.{name}): answers may differ from the model's own"
            )


def _answer_or_missing(answer: str | None) -> str:
    return "missing" if answer is None else repr(answer)


# Saving a processor then copies this file beside it and records it in `auto_map`, so that
# `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works where `rwsan` is not installed.
RWSANProcessor.register_for_auto_class("AutoProcessor")
