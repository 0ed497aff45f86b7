"""RWSAN model configuration."""

import math
import operator
from collections.abc import Mapping

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# The VQA-v2 answer vocabulary of the paper (train+val answers seen more than 8 times).
PAPER_NUM_ANSWERS = 3129


def checked_answer_vocabulary(id2label: Mapping[int, str], name: str = "id2label") -> dict[int, str]:
    """Checks an answer vocabulary (answer id -> answer) and returns it with int ids (JSON makes them strings), in
    id order. The ids must be `0..num_answers - 1` and the answers distinct strings, at least one; `name` says
    whose vocabulary an error is about."""
    if not isinstance(id2label, Mapping):
        raise ValueError(f"{name} must map answer ids to answers, got {type(id2label).__name__}")
    answers_by_id = {}
    for label_id, label in id2label.items():
        if not str(label_id).isdigit() or not isinstance(label, str):
            raise ValueError(f"{name} must map integer ids to strings, got {label_id!r}: {label!r}")
        answers_by_id[int(label_id)] = label
    if not answers_by_id:
        raise ValueError(f"{name} has no answers")
    if sorted(answers_by_id) != list(range(len(answers_by_id))):
        raise ValueError(f"{name} ids must be 0..{len(answers_by_id) - 1}, each used once")
    if len(set(answers_by_id.values())) != len(answers_by_id):
        raise ValueError(f"{name} has repeated answers")
    return dict(sorted(answers_by_id.items()))


@strict
class RWSANConfig(PreTrainedConfig):
    r"""
    Configuration of an RWSAN model (Residual Weight-Sharing Attention Network with Low-Rank Attention, Qin, Hu &
    Zhuang, IEEE TMM 2022). The defaults are the paper's configuration (the original `cfgs/base_cfgs.py`).

    Args:
        vocab_size (`int`, defaults to 20573): number of question tokens (`PAD`=0, `UNK`=1, then words); 20,573 on
            VQA-v2 train+val+test+VG questions.
        word_embedding_size (`int`, defaults to 300): size of the word embedding (GloVe 840B-300d in the paper).
        hidden_size (`int`, defaults to 512): size of the LSTM output and of every attention block.
        num_attention_heads (`int`, defaults to 4): heads of every low-rank attention.
        intermediate_size (`int`, defaults to 2048): inner size of the feed-forward networks.
        image_feature_size (`int`, defaults to 2048): size of one region feature (bottom-up attention Faster R-CNN).
        max_regions (`int`, defaults to 100): regions per image kept by the processor.
        max_question_length (`int`, defaults to 16): question tokens kept by the processor.
        num_srwsa_repeats (`int`, defaults to 3): how often the shared question encoder (SRWSA) is applied.
        num_sgrwsa_repeats (`int`, defaults to 3): how often the shared image encoder (SGRWSA) is applied.
        text_self_attention_rank (`int`, defaults to 4): per-head size of queries and keys in the question
            self-attention (`SRWSA_MIDSIZE` in the original).
        image_self_attention_rank (`int`, defaults to 16): same for the image self-attention (`SGRWSA_SA_MIDSIZE`).
        guided_attention_rank (`int`, defaults to 64): same for the question-guided image attention
            (`SGRWSA_GA_MIDSIZE`).
        flat_mlp_size (`int`, defaults to 256): hidden size of the attention-flattening score MLP.
        flat_output_size (`int`, defaults to 1024): size of the fused question-image representation.
        dropout (`float`, defaults to 0.1): dropout on attention maps, residual branches and MLPs.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon added to the standard deviation in every layer norm.
        id2label / label2id: the answer vocabulary: ids `0..num_answers - 1`, distinct answers; `label2id`, derived
            when not given, must be its inverse. Without them the head has `num_labels` (3,129 unless given) answers
            named `LABEL_i`.

    Example:

    ```python
    >>> from rwsan import RWSANConfig, RWSANForVQA
    >>> config = RWSANConfig(vocab_size=1000, num_labels=10)
    >>> model = RWSANForVQA(config)
    ```
    """

    model_type = "rwsan"
    # The outputs of `RWSANForVQA` beside the loss and logits, which the `Trainer`'s evaluation and prediction leave
    # out (they would be gathered over the whole split, and `compute_metrics` would get them with the logits).
    keys_to_ignore_at_inference = [
        "pooler_output",
        "question_last_hidden_state",
        "image_last_hidden_state",
        "question_hidden_states",
        "image_hidden_states",
        "question_attentions",
        "image_attentions",
        "guided_attentions",
        "question_flattening_weights",
        "image_flattening_weights",
    ]

    vocab_size: int = 20573
    word_embedding_size: int = 300
    hidden_size: int = 512
    num_attention_heads: int = 4
    intermediate_size: int = 2048
    image_feature_size: int = 2048
    max_regions: int = 100
    max_question_length: int = 16
    num_srwsa_repeats: int = 3
    num_sgrwsa_repeats: int = 3
    text_self_attention_rank: int = 4
    image_self_attention_rank: int = 16
    guided_attention_rank: int = 64
    flat_mlp_size: int = 256
    flat_output_size: int = 1024
    dropout: float | int = 0.1
    layer_norm_eps: float | int = 1e-6
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        num_labels = kwargs.get("num_labels")
        if num_labels is not None:
            # Any integer type (numpy's too), but not a bool.
            if isinstance(num_labels, bool) or not hasattr(num_labels, "__index__") or operator.index(num_labels) < 1:
                raise ValueError(f"RWSANConfig.num_labels must be a positive integer, got {num_labels!r}")
            kwargs["num_labels"] = num_labels = operator.index(num_labels)
        if self.id2label is None:
            if num_labels is None:
                kwargs["num_labels"] = PAPER_NUM_ANSWERS
        else:
            self.id2label = checked_answer_vocabulary(self.id2label, "RWSANConfig.id2label")
        # A num_labels that differs from id2label is transformers' way to give a saved model a new answer head
        # (`from_pretrained(folder, num_labels=n, ignore_mismatched_sizes=True)`): the answers become LABEL_i.
        super().__post_init__(**kwargs)
        if self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self.check()

    def check(self):
        """Raises a `ValueError` where this configuration cannot make a working model. It runs at construction, and
        again when a model is built: `from_pretrained(folder, **kwargs)` sets its keyword arguments after
        construction, past these checks."""
        id2label = checked_answer_vocabulary(self.id2label, "RWSANConfig.id2label")
        inverse = {label: index for index, label in id2label.items()}
        if self.label2id != inverse:
            differing = sorted(
                (
                    label
                    for label in inverse.keys() | self.label2id.keys()
                    if self.label2id.get(label) != inverse.get(label)
                ),
                key=str,
            )
            raise ValueError(
                f"RWSANConfig.label2id must map each answer of id2label back to its id; it differs on {differing[:5]} "
                "(a new id2label needs its label2id too)"
            )
        self._check_sizes()

    def _check_sizes(self):
        # Values of the right type but out of range raise a plain ValueError, which callers catch the usual way;
        # values of another type have already met `@strict`'s error, which names the field and the type.
        positive = (
            "vocab_size",
            "word_embedding_size",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "image_feature_size",
            "max_regions",
            "max_question_length",
            "num_srwsa_repeats",
            "num_sgrwsa_repeats",
            "text_self_attention_rank",
            "image_self_attention_rank",
            "guided_attention_rank",
            "flat_mlp_size",
            "flat_output_size",
        )
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"RWSANConfig.{name} must be a positive integer, got {value}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"RWSANConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RWSANConfig.dropout must be in [0, 1), got {self.dropout}.")
        # The layer norm divides by the unbiased standard deviation, which one feature does not have.
        for name in ("hidden_size", "flat_output_size"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"RWSANConfig.{name} must be at least 2 (it is layer-normalised), got {getattr(self, name)}."
                )
        if not 0 < self.layer_norm_eps < math.inf:
            raise ValueError(f"RWSANConfig.layer_norm_eps must be positive and finite, got {self.layer_norm_eps}.")


__all__ = ["RWSANConfig"]
