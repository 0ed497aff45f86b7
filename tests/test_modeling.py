"""RWSANConfig / RWSANForVQA: numbers against the original, masks, attention paths, loss, saving and loading."""

import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_TOLERANCE
from packaging.version import Version
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, AutoModelForVisualQuestionAnswering

from rwsan import RWSANConfig, RWSANForVQA, RWSANModel
from rwsan.modeling_rwsan import RWSANLayerNorm, RWSANLowRankAttention

REPO_ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = REPO_ROOT.parent / "shared" / "rwsan-original"
PAPER_PARAMETERS = 19_540_439


def tiny_config(**overrides) -> RWSANConfig:
    sizes = dict(
        vocab_size=40,
        word_embedding_size=12,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        image_feature_size=24,
        flat_mlp_size=16,
        flat_output_size=48,
        text_self_attention_rank=2,
        image_self_attention_rank=4,
        guided_attention_rank=8,
        num_labels=9,
    )
    sizes.update(overrides)
    return RWSANConfig(**sizes)


def tiny_inputs(config: RWSANConfig, batch_size=3, tokens=6, regions=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, config.vocab_size, (batch_size, tokens), generator=generator)
    image_features = torch.rand(batch_size, regions, config.image_feature_size, generator=generator)
    # Uneven padding: sample i has i padded tokens and 2*i padded regions.
    for sample in range(batch_size):
        if sample:
            input_ids[sample, -sample:] = 0
            image_features[sample, -2 * sample :] = 0
    return input_ids, image_features


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return RWSANForVQA(tiny_config()).eval()


def test_paper_configuration_has_the_original_parameter_count():
    model = RWSANForVQA(RWSANConfig(vocab_size=20573, num_labels=3129))
    assert model.num_parameters() == PAPER_PARAMETERS


def test_paper_defaults():
    config = RWSANConfig()
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (512, 4, 2048)
    assert (config.text_self_attention_rank, config.image_self_attention_rank, config.guided_attention_rank) == (
        4,
        16,
        64,
    )
    assert (config.num_srwsa_repeats, config.num_sgrwsa_repeats, config.num_labels) == (3, 3, 3129)
    # Those the parameter count does not pin: the processor's cuts, and the regularisation and norm of the recipe.
    assert (config.max_question_length, config.max_regions) == (16, 100)
    assert (config.dropout, config.layer_norm_eps) == (0.1, 1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 30}, r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
        ({"guided_attention_rank": 0}, r"guided_attention_rank must be a positive integer, got 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        # The layer norm divides by an unbiased standard deviation: one feature makes every logit NaN.
        ({"flat_output_size": 1}, r"flat_output_size must be at least 2 \(it is layer-normalised\), got 1"),
        ({"hidden_size": 1, "num_attention_heads": 1}, r"hidden_size must be at least 2 \(it is layer-normalised\)"),
        ({"layer_norm_eps": float("nan")}, r"layer_norm_eps must be positive and finite, got nan"),
        ({"layer_norm_eps": float("inf")}, r"layer_norm_eps must be positive and finite, got inf"),
        # An integer is a number like any other here, as for dropout.
        ({"layer_norm_eps": 0}, r"layer_norm_eps must be positive and finite, got 0"),
    ],
)
def test_config_rejects_impossible_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


SIZE_FIELDS = (
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


@pytest.mark.parametrize("name", SIZE_FIELDS)
def test_config_rejects_every_size_that_is_not_positive(name):
    # A vocabulary of no tokens or a processor that keeps no regions would fail only once the model runs.
    with pytest.raises(ValueError, match=rf"^RWSANConfig.{name} must be a positive integer, got 0.$"):
        tiny_config(**{name: 0})


@pytest.mark.parametrize("dropout", [1.0, 1, -0.1])
def test_config_rejects_a_dropout_rate_outside_zero_to_one(dropout):
    """A rate of 1 zeroes every branch in training; a negative one fails only when the model is built."""
    with pytest.raises(ValueError, match=rf"^RWSANConfig.dropout must be in \[0, 1\), got {dropout}.$"):
        tiny_config(dropout=dropout)
    assert tiny_config(dropout=0).dropout == 0


@pytest.mark.parametrize(
    "overrides, field, given",
    [({"hidden_size": 32.0}, "hidden_size", "float"), ({"vocab_size": "40"}, "vocab_size", "str")],
)
def test_config_rejects_a_size_of_another_type_by_name(overrides, field, given):
    """A float or string size would pass the range checks (32.0 is divisible by 4) and fail inside torch."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match=f"Field '{field}' expected int, got {given}"):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_srwsa_repeats": 0}, r"num_srwsa_repeats must be a positive integer, got 0"),
        ({"num_attention_heads": 3}, r"hidden_size \(16\) must be divisible by num_attention_heads \(3\)"),
        ({"id2label": {0: "red", 1: "blue"}}, r"label2id must map each answer of id2label back to its id"),
    ],
)
def test_from_pretrained_checks_the_config_values_it_is_given(tmp_path, overrides, message):
    # transformers sets these on the config after constructing it, past the config's own checks.
    RWSANForVQA(
        RWSANConfig(vocab_size=40, hidden_size=16, intermediate_size=32, id2label={0: "a", 1: "b"})
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        RWSANForVQA.from_pretrained(tmp_path, **overrides)
    relabelled = RWSANForVQA.from_pretrained(tmp_path, id2label={0: "red", 1: "blue"}, label2id={"red": 0, "blue": 1})
    relabelled.save_pretrained(tmp_path / "relabelled")
    assert RWSANForVQA.from_pretrained(tmp_path / "relabelled").config.id2label == {0: "red", 1: "blue"}


@pytest.mark.parametrize(
    "answers, message",
    [
        ({"id2label": {0: "a", 5: "b"}}, r"^RWSANConfig.id2label ids must be 0\.\.1, each used once$"),
        ({"id2label": {0: "a", 1: "a"}}, "^RWSANConfig.id2label has repeated answers$"),
        ({"id2label": {}}, "^RWSANConfig.id2label has no answers$"),
        ({"id2label": {0: "a", 1: 2}}, "^RWSANConfig.id2label must map integer ids to strings, got 1: 2$"),
        ({"num_labels": 0}, "^RWSANConfig.num_labels must be a positive integer, got 0$"),
        ({"num_labels": 2.5}, "^RWSANConfig.num_labels must be a positive integer, got 2.5$"),
        ({"num_labels": True}, "^RWSANConfig.num_labels must be a positive integer, got True$"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "c": 1}},
         r"^RWSANConfig.label2id must map each answer of id2label back to its id; it differs on \['b', 'c'\] \(a new "
         r"id2label needs its label2id too\)$"),
    ],
)  # fmt: skip
def test_config_rejects_answer_vocabularies_the_processor_would(answers, message):
    with pytest.raises(ValueError, match=message):
        RWSANConfig(vocab_size=40, **answers)


def test_a_saved_model_takes_a_new_answer_head(tmp_path):
    config = RWSANConfig(vocab_size=40, hidden_size=16, intermediate_size=32, id2label={0: "a", 1: "b"})
    RWSANForVQA(config).save_pretrained(tmp_path)
    model = RWSANForVQA.from_pretrained(tmp_path, num_labels=np.int64(5), ignore_mismatched_sizes=True)
    assert model.classifier.out_features == model.config.num_labels == 5
    assert model.config.id2label == {index: f"LABEL_{index}" for index in range(5)}
    assert model.config.label2id == {f"LABEL_{index}": index for index in range(5)}


def test_config_answer_vocabulary_from_json_round_trips(tmp_path):
    config = RWSANConfig(vocab_size=40, id2label={"1": "no", "0": "yes"})
    assert config.id2label == {0: "yes", 1: "no"} and config.label2id == {"yes": 0, "no": 1}
    # In id order, as JSON from another writer need not be: list(id2label.values())[i] is answer i.
    assert list(config.id2label.items()) == [(0, "yes"), (1, "no")]
    config.save_pretrained(tmp_path)
    loaded = RWSANConfig.from_pretrained(tmp_path)
    assert (loaded.id2label, loaded.label2id, loaded.num_labels) == (config.id2label, config.label2id, 2)


def test_weights_are_shared_not_copied(tiny_model):
    """Each encoder holds one block; the same parameters serve all nine applications."""
    question_blocks = [m for m in tiny_model.modules() if type(m).__name__ == "RWSANSelfAttentionBlock"]
    image_blocks = [m for m in tiny_model.modules() if type(m).__name__ == "RWSANGuidedAttentionBlock"]
    assert len(question_blocks) == len(image_blocks) == 1
    outputs = tiny_model(*tiny_inputs(tiny_model.config), output_attentions=True, output_hidden_states=True)
    assert len(outputs.question_attentions) == len(outputs.image_attentions) == len(outputs.guided_attentions) == 9
    assert len(outputs.question_hidden_states) == len(outputs.image_hidden_states) == 1 + 3


def test_golden_vector_through_the_converter(tmp_path):
    golden_path = ORIGINAL / "golden_small.pt"
    if not golden_path.exists():
        pytest.skip("../shared/rwsan-original is not beside the repository")
    from rwsan.convert_original_checkpoint import main

    golden = torch.load(golden_path, weights_only=True)
    checkpoint = tmp_path / "epoch16.pkl"
    # Saved as the original saves under DataParallel, with the 'module.' prefix.
    state_dict = {f"module.{key}": value for key, value in golden["state_dict"].items()}
    torch.save({"state_dict": state_dict, "optimizer": {}, "lr_base": 1e-4}, checkpoint)
    main(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "converted")])

    model = RWSANForVQA.from_pretrained(tmp_path / "converted").eval()
    assert model.config.hidden_size == golden["hyperparameters"]["HIDDEN_SIZE"]
    assert model.config.num_labels == golden["answer_size"]
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(input_ids=golden["ques_ix"], image_features=golden["img_feat"]).logits
        torch.testing.assert_close(logits, golden["logits"], atol=1e-5, rtol=0)


def test_extra_padding_leaves_logits_unchanged(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        padded = tiny_model(
            input_ids=F.pad(input_ids, (0, 5)), image_features=F.pad(image_features, (0, 0, 0, 30))
        ).logits
    torch.testing.assert_close(padded, reference, atol=1e-5, rtol=0)


def test_explicit_masks_hide_what_they_mask(tiny_model):
    """Masking the last real token and region of a question is leaving them out (the LSTM reads left to right, and
    masked positions get no attention), and changes the answer scores: the given masks are the ones used."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    attention_mask, image_attention_mask = (input_ids != 0).long(), (image_features.abs().sum(-1) != 0).long()
    attention_mask[0, -1] = image_attention_mask[0, -1] = 0  # sample 0 has no padding: its last word and region
    with torch.no_grad():
        masked = tiny_model(
            input_ids=input_ids,
            image_features=image_features,
            attention_mask=attention_mask,
            image_attention_mask=image_attention_mask,
        ).logits
        left_out = tiny_model(input_ids=input_ids[:1, :-1], image_features=image_features[:1, :-1]).logits
        unmasked = tiny_model(input_ids=input_ids, image_features=image_features).logits
    torch.testing.assert_close(masked[:1], left_out, atol=1e-5, rtol=0)
    assert (masked[0] - unmasked[0]).abs().max() > 1e-3
    # The other samples' masks are those the model derives.
    torch.testing.assert_close(masked[1:], unmasked[1:], atol=0, rtol=0)


def test_the_configured_pad_token_id_marks_the_padding():
    """Without an attention_mask, the padding is where input_ids hold config.pad_token_id, whichever id that is."""
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(pad_token_id=3)).eval()
    input_ids, image_features = tiny_inputs(model.config)
    attention_mask = (input_ids != 0).long()
    input_ids = input_ids.masked_fill(input_ids == 3, 4).masked_fill(attention_mask == 0, 3)
    with torch.no_grad():
        derived = model(input_ids=input_ids, image_features=image_features).logits
        given = model(input_ids=input_ids, image_features=image_features, attention_mask=attention_mask).logits
        unmasked = model(input_ids, image_features, attention_mask=torch.ones_like(attention_mask)).logits
    torch.testing.assert_close(derived, given, atol=0, rtol=0)
    assert (unmasked - given).abs().max() > 1e-3


def test_a_region_whose_features_sum_to_zero_is_no_padding(tiny_model):
    """Only rows of zeros are padding: features of both signs (normalised ones, say) can sum to zero."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    image_features[0, -1] = 0
    image_features[0, -1, :2] = torch.tensor([1.0, -1.0])
    image_attention_mask = (image_features != 0).any(-1).long()
    assert image_attention_mask[0].all()
    masked = image_attention_mask.clone()
    masked[0, -1] = 0
    with torch.no_grad():
        derived = tiny_model(input_ids=input_ids, image_features=image_features).logits
        given = tiny_model(input_ids, image_features, image_attention_mask=image_attention_mask).logits
        left_out = tiny_model(input_ids, image_features, image_attention_mask=masked).logits
    torch.testing.assert_close(derived, given, atol=0, rtol=0)
    assert (left_out[0] - given[0]).abs().max() > 1e-4


def test_int32_token_ids_give_the_answers_of_int64_ones(tiny_model):
    """The forward accepts int32 input_ids (as its docstring says), with the same logits."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        int32 = tiny_model(input_ids=input_ids.int(), image_features=image_features).logits
        int64 = tiny_model(input_ids=input_ids, image_features=image_features).logits
    torch.testing.assert_close(int32, int64, atol=0, rtol=0)


def test_tuple_outputs_start_with_the_loss_then_the_logits(tiny_model):
    """As transformers' `Trainer` and other generic code read tuple outputs."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    labels = torch.full((3, tiny_model.config.num_labels), 0.3)
    with torch.no_grad():
        outputs = tiny_model(input_ids=input_ids, image_features=image_features, labels=labels)
        as_tuple = tiny_model(input_ids=input_ids, image_features=image_features, labels=labels, return_dict=False)
        without_labels = tiny_model(input_ids=input_ids, image_features=image_features, return_dict=False)
    assert list(outputs.keys())[:3] == ["loss", "logits", "pooler_output"]
    assert torch.equal(as_tuple[0], outputs.loss) and torch.equal(as_tuple[1], outputs.logits)
    assert torch.equal(without_labels[0], outputs.logits)


def test_the_encoder_returns_a_tuple_with_return_dict_false(tiny_model):
    """As `RWSANForVQA` does, and as generic code (tracing, ONNX export) asks of an encoder."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        outputs = tiny_model.rwsan(input_ids=input_ids, image_features=image_features)
        as_tuple = tiny_model.rwsan(input_ids=input_ids, image_features=image_features, return_dict=False)
    assert type(as_tuple) is tuple and len(as_tuple) == len(outputs) == 3
    assert all(torch.equal(first, second) for first, second in zip(as_tuple, outputs.values(), strict=True))


def test_attentions_and_hidden_states_are_returned_only_when_asked_for(tiny_model):
    """Without output_attentions and output_hidden_states the outputs are the fused vector and the final states (the
    flattening weights come with the attention maps), in this order, as a dict and as a tuple."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    final = ["logits", "pooler_output", "question_last_hidden_state", "image_last_hidden_state"]
    maps = ["question_attentions", "image_attentions", "guided_attentions"]
    with torch.no_grad():
        plain = tiny_model(input_ids=input_ids, image_features=image_features)
        as_tuple = tiny_model(input_ids=input_ids, image_features=image_features, return_dict=False)
        with_attentions = tiny_model(input_ids=input_ids, image_features=image_features, output_attentions=True)
        with_states = tiny_model(input_ids=input_ids, image_features=image_features, output_hidden_states=True)
    assert list(plain.keys()) == final and len(as_tuple) == len(final)
    assert plain.pooler_output.shape == (3, tiny_model.config.flat_output_size)
    assert plain.question_last_hidden_state.shape == (3, 6, 32) and plain.image_last_hidden_state.shape == (3, 7, 32)
    assert list(with_attentions.keys()) == final + maps + ["question_flattening_weights", "image_flattening_weights"]
    assert list(with_states.keys()) == final + ["question_hidden_states", "image_hidden_states"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ids, features: (ids, features, {"attention_mask": torch.ones(3, 1)}),
         r"^attention_mask must have the shape of input_ids, \(3, 6\), got \(3, 1\)$"),
        (lambda ids, features: (ids, features, {"attention_mask": torch.ones(1, 6)}),
         r"^attention_mask must have the shape of input_ids, \(3, 6\), got \(1, 6\)$"),
        (lambda ids, features: (ids, features, {"image_attention_mask": torch.ones(3, 1)}),
         r"^image_attention_mask must have the shape \(batch_size, num_regions\) of image_features, \(3, 7\), "
         r"got \(3, 1\)$"),
        (lambda ids, features: (ids[:1], features, {}), "^input_ids has 1 questions but image_features has 3 images$"),
        (lambda ids, features: (ids, features[:1], {}), "^input_ids has 3 questions but image_features has 1 images$"),
        (lambda ids, features: (ids, features[0], {}),
         r"^image_features must have shape \(batch_size, num_regions, 24\), got \(7, 24\)$"),
        (lambda ids, features: (ids, features[..., :20], {}),
         r"^image_features must have shape \(batch_size, num_regions, 24\), got \(3, 7, 20\)$"),
        (lambda ids, features: (ids.float(), features, {}),
         r"^input_ids must be a \(batch_size, question_length\) tensor of int64 or int32 token ids, got shape "
         r"\(3, 6\) and dtype torch.float32$"),
        (lambda ids, features: (ids[0], features, {}), r"got shape \(6,\) and dtype torch.int64$"),
        (lambda ids, features: (ids[:, :0], features, {}),
         r"^the model needs at least one question, one token position and one region position \(masked ones count\), "
         r"got input_ids \(3, 0\) and image_features \(3, 7, 24\)$"),
        (lambda ids, features: (ids, features[:, :0], {}), r"got input_ids \(3, 6\) and image_features \(3, 0, 24\)$"),
        (lambda ids, features: (ids[:0], features[:0], {}), r"got input_ids \(0, 6\) and image_features \(0, 7, 24\)$"),
        # Broadcast, one answer's scores would stand for every question's.
        (lambda ids, features: (ids, features, {"labels": torch.zeros(1, 9)}),
         r"^labels must have the shape \(batch_size, num_labels\) of the logits, \(3, 9\), got \(1, 9\)$"),
        # Cast unseen.
        (lambda ids, features: (ids, (features * 100).long(), {}),
         "^image_features must be floating-point, got dtype torch.int64$"),
    ],
    ids=[
        "attention_mask (B, 1)",
        "attention_mask (1, T)",
        "image_attention_mask (B, 1)",
        "fewer questions",
        "fewer images",
        "2-D image_features",
        "other feature size",
        "float input_ids",
        "1-D input_ids",
        "no token positions",
        "no region positions",
        "no questions",
        "labels (1, A)",
        "integer image_features",
    ],
)  # fmt: skip
def test_mis_shaped_inputs_are_refused_by_name(tiny_model, change, message):
    input_ids, image_features, masks = change(*tiny_inputs(tiny_model.config))
    with pytest.raises(ValueError, match=message):
        tiny_model(input_ids=input_ids, image_features=image_features, **masks)


@pytest.mark.parametrize("name", ["input_ids", "image_features", "attention_mask", "image_attention_mask"])
def test_inputs_that_are_not_tensors_are_refused_by_name(tiny_model, name):
    """Lists and numpy arrays failed with an AttributeError from inside the model."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    inputs = {
        "input_ids": input_ids,
        "image_features": image_features,
        "attention_mask": (input_ids != 0).long(),
        "image_attention_mask": torch.ones(image_features.shape[:2], dtype=torch.long),
    }
    inputs[name] = inputs[name].numpy()
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got ndarray"):
        tiny_model(**inputs)


def test_without_pad_token_id_the_attention_mask_is_needed():
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(pad_token_id=None)).eval()
    input_ids, image_features = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="^attention_mask is needed: config.pad_token_id is None"):
        model(input_ids=input_ids, image_features=image_features)
    with torch.no_grad():
        logits = model(input_ids, image_features, attention_mask=(input_ids != 0).long()).logits
        model.config.pad_token_id = 0
        torch.testing.assert_close(logits, model(input_ids, image_features).logits, atol=0, rtol=0)


def test_sdpa_and_eager_paths_agree_in_eval_and_backward(tiny_model):
    """Also where SDPA gets the narrow queries and keys (ranks 2 and 4 here) padded with zeros to 8 a head, so that
    cuDNN's and the memory-efficient kernels take them: the scores, and the gradients of those narrow projections,
    are the eager path's."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    labels = torch.zeros(input_ids.shape[0], tiny_model.config.num_labels)
    labels[:, 2] = 0.9
    question_attention = tiny_model.rwsan.question_encoder.block.attention
    image_attention = tiny_model.rwsan.image_encoder.block.self_attention
    results = {}
    for implementation in ("sdpa", "eager"):
        tiny_model.set_attn_implementation(implementation)
        tiny_model.zero_grad()
        # Each path is the one asked for: two runs of one path would agree trivially.
        with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
            outputs = tiny_model(input_ids=input_ids, image_features=image_features, labels=labels)
        assert (sdpa.call_count > 0) == (implementation == "sdpa")
        query_and_key_sizes = {(call.args[0].shape[-1], call.args[1].shape[-1]) for call in sdpa.call_args_list}
        assert query_and_key_sizes == ({(8, 8)} if implementation == "sdpa" else set())
        outputs.loss.backward()
        results[implementation] = [
            outputs.logits.detach(),
            tiny_model.classifier.weight.grad.clone(),
            question_attention.query.weight.grad.clone(),
            question_attention.key.weight.grad.clone(),
            image_attention.key.weight.grad.clone(),
        ]
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], atol=1e-5, rtol=0)
    for sdpa_gradient, eager_gradient in zip(results["sdpa"][1:], results["eager"][1:]):
        assert eager_gradient.abs().max() > 1e-3
        torch.testing.assert_close(sdpa_gradient, eager_gradient, atol=1e-5, rtol=1e-4)


def test_sdpa_drops_attention_weights_in_training_only():
    """The paper's dropout on the attention weights reaches SDPA in training, and is off in evaluation."""
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(dropout=0.3))
    input_ids, image_features = tiny_inputs(model.config)
    for training, expected in ((True, {0.3}), (False, {0.0})):
        model.train(training)
        with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
            model(input_ids=input_ids, image_features=image_features)
        assert {call.kwargs["dropout_p"] for call in sdpa.call_args_list} == expected


def test_eager_attention_drops_attention_weights_in_training_only():
    """The same on the eager path (--attn_implementation eager, or output_attentions=True in training): each of the
    attention maps the model returns is dropped out before it weighs the values."""
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(dropout=0.3))
    model.set_attn_implementation("eager")
    input_ids, image_features = tiny_inputs(model.config)
    for training, expected_rate in ((True, 0.3), (False, 0.0)):
        model.train(training)
        with mock.patch.object(F, "dropout", wraps=F.dropout) as dropout:
            outputs = model(input_ids=input_ids, image_features=image_features, output_attentions=True)
        maps = outputs.question_attentions + outputs.image_attentions + outputs.guided_attentions
        dropped = [call for call in dropout.call_args_list if call.args[0].dim() == 4]
        assert len(dropped) == len(maps) > 0
        assert {id(call.args[0]) for call in dropped} == {id(attention) for attention in maps}
        assert {(call.args[1], call.args[2]) for call in dropped} == {(expected_rate, training)}


def test_every_dropout_layer_runs_and_reaches_the_logits():
    """The original drops out each attention and feed-forward branch before its residual sum, the feed-forward's
    hidden layer and each flattening's score MLP: in training each dropout layer runs once an application of its
    block (nine times a pass here) or once a pass, at the configured rate, and what it returns is what the model
    computes with (made zero, it changes the logits)."""
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(dropout=0.3)).train()
    input_ids, image_features = tiny_inputs(model.config)
    dropouts = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}
    in_blocks = {name for name in dropouts if ".block." in name}
    assert (len(in_blocks), len(dropouts)) == (3 + 4, 3 + 4 + 2)
    assert {module.p for module in dropouts.values()} == {0.3}
    calls = dict.fromkeys(dropouts, 0)
    for name, module in dropouts.items():
        module.register_forward_hook(lambda module, args, output, name=name: calls.__setitem__(name, calls[name] + 1))
    model(input_ids=input_ids, image_features=image_features)
    assert calls == {name: 9 if name in in_blocks else 1 for name in dropouts}

    model.eval()
    with torch.no_grad():
        reference = model(input_ids=input_ids, image_features=image_features).logits
        for name, module in dropouts.items():
            hook = module.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
            changed = model(input_ids=input_ids, image_features=image_features).logits
            hook.remove()
            assert (changed - reference).abs().max() > 1e-4, name


def attention_modules(model: RWSANForVQA) -> list[RWSANLowRankAttention]:
    return [module for module in model.modules() if isinstance(module, RWSANLowRankAttention)]


def loss_and_gradients(model: RWSANForVQA) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The logits and every parameter's gradient of one training pass, and how many linear layers it ran."""
    input_ids, image_features = tiny_inputs(model.config)
    labels = torch.full((input_ids.shape[0], model.config.num_labels), 0.3)
    model.zero_grad()
    with mock.patch.object(F, "linear", wraps=F.linear) as linear:
        outputs = model(input_ids=input_ids, image_features=image_features, labels=labels)
    outputs.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    return outputs.logits.detach(), gradients, linear.call_count


def test_projections_reading_one_input_run_as_one_product_with_the_same_results(tiny_model):
    stacked_logits, stacked_gradients, stacked_products = loss_and_gradients(tiny_model)
    # A hook on a layer makes its attention call the layers one by one, as written.
    for attention in attention_modules(tiny_model):
        attention.value.register_forward_pre_hook(lambda module, args: None)
    logits, gradients, products = loss_and_gradients(tiny_model)

    # Nine applications of each block: self-attention stacks three layers (two products fewer), in the question and
    # the image blocks; the guided attention's value and key layers, which read the question once a pass, are
    # stacked too (one fewer).
    assert products - stacked_products == 9 * 2 + 9 * 2 + 1
    torch.testing.assert_close(stacked_logits, logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(stacked_gradients, gradients, atol=1e-6, rtol=1e-5)


class DoubledLinear(torch.nn.Linear):
    """An adapter-like layer: its forward is not `F.linear(x, weight, bias)`."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(inputs)


def double_outputs(layer: torch.nn.Linear, change: str, attention: RWSANLowRankAttention, name: str):
    """Makes `layer` return twice its output, in one of the ways users and libraries change layers."""
    if change == "forward hook":
        layer.register_forward_hook(lambda module, args, output: 2 * output)
    elif change == "forward replaced on the instance":  # as accelerate's hooks do
        layer.forward = lambda inputs: 2 * torch.nn.Linear.forward(layer, inputs)
    elif change == "subclass":
        doubled = DoubledLinear(layer.in_features, layer.out_features)
        doubled.load_state_dict(layer.state_dict())
        setattr(attention, name, doubled)


@pytest.mark.parametrize("name", ["value", "key", "query"])
@pytest.mark.parametrize("where", ["self_attention", "guided_attention"])
@pytest.mark.parametrize("change", ["forward hook", "forward replaced on the instance", "subclass", "global hook"])
def test_a_changed_projection_layer_takes_effect(tiny_model, name, where, change):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    attention = getattr(tiny_model.rwsan.image_encoder.block, where)
    layer = getattr(attention, name)
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        if change == "global hook":
            hook = torch.nn.modules.module.register_module_forward_hook(
                lambda module, args, output: 2 * output if module is layer else output
            )
        else:
            double_outputs(layer, change, attention, name)
        try:
            changed = tiny_model(input_ids=input_ids, image_features=image_features).logits
        finally:
            if change == "global hook":
                hook.remove()
    # Doubling the guided attention's keys or queries sharpens near-uniform scores: about 8e-4 at this size. Ignored,
    # a change would leave the logits as they were, to the bit.
    assert (changed - reference).abs().max() > 1e-4


def test_the_question_is_projected_for_guided_attention_once_a_pass(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    block = tiny_model.rwsan.image_encoder.block
    calls = {name: 0 for name in ("guided value", "guided key", "guided query", "self-attention value")}
    layers = {
        "guided value": block.guided_attention.value,
        "guided key": block.guided_attention.key,
        "guided query": block.guided_attention.query,
        "self-attention value": block.self_attention.value,
    }
    for name, layer in layers.items():
        layer.register_forward_hook(lambda module, args, output, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        tiny_model(input_ids=input_ids, image_features=image_features)
    # The question's values and keys are the same in each of the nine applications of the block.
    assert calls == {"guided value": 1, "guided key": 1, "guided query": 9, "self-attention value": 9}


def test_a_backward_hook_on_a_projection_layer_is_called(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    calls = []
    tiny_model.rwsan.image_encoder.block.self_attention.value.register_full_backward_hook(
        lambda module, grad_input, grad_output: calls.append(grad_output[0].shape)
    )
    tiny_model(input_ids=input_ids, image_features=image_features).logits.sum().backward()
    assert len(calls) == 9  # one a block application


class UnconcatenatableWeight(torch.Tensor):
    """A weight of a tensor subclass that computes as a plain one but cannot be concatenated, as many quantised and
    sharded weights cannot (their layers stay `nn.Linear`)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            raise NotImplementedError("this weight cannot be concatenated")
        if func is F.linear:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("where", ["self_attention", "guided_attention"])
def test_a_weight_of_a_tensor_subclass_is_not_stacked_with_the_others(tiny_model, where):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    key = getattr(tiny_model.rwsan.image_encoder.block, where).key
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        key.weight = torch.nn.Parameter(key.weight.detach().as_subclass(UnconcatenatableWeight))
        assert type(key.weight) is UnconcatenatableWeight
        logits = tiny_model(input_ids=input_ids, image_features=image_features).logits
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)


def test_weights_offloaded_by_accelerate_give_the_same_logits(tiny_model):
    from accelerate import cpu_offload

    input_ids, image_features = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        cpu_offload(tiny_model, execution_device=torch.device("cpu"))
        assert tiny_model.rwsan.image_encoder.block.self_attention.value.weight.is_meta
        offloaded = tiny_model(input_ids=input_ids, image_features=image_features).logits
    torch.testing.assert_close(offloaded, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "offloaded",
    [
        "rwsan.question_encoder",
        "rwsan.image_encoder",
        pytest.param(
            "",
            marks=pytest.mark.skipif(
                Version(importlib.metadata.version("accelerate")) < Version("1.15"),
                reason='accelerate before 1.15 refuses device_map={"": "disk"} (it points to disk_offload)',
            ),
        ),
    ],
)
def test_encoders_offloaded_whole_by_a_device_map_give_the_same_logits(tiny_model, tmp_path, offloaded):
    """A module placed whole gets accelerate's hook, which moves the arguments of its forward."""
    input_ids, image_features = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
    tiny_model.save_pretrained(tmp_path / "model")
    top_modules = [f"rwsan.{name}" for name, _ in tiny_model.rwsan.named_children()] + ["classifier"]
    device_map = (
        {"": "disk"} if not offloaded else {name: "disk" if name == offloaded else "cpu" for name in top_modules}
    )
    model = RWSANForVQA.from_pretrained(tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "disk")
    with torch.no_grad():
        logits = model(input_ids=input_ids, image_features=image_features).logits
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)


def test_dynamically_quantized_model_answers_as_the_float_one(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(tiny_model), {torch.nn.Linear}, torch.qint8)
    assert callable(quantized.rwsan.image_projection.weight)  # not a tensor: a method of the quantized layer
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        logits = quantized(input_ids=input_ids, image_features=image_features.double()).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0)


def test_attention_outputs_are_distributions_over_real_positions(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    outputs = tiny_model(input_ids=input_ids, image_features=image_features, output_attentions=True)
    question_weights, image_weights = outputs.question_flattening_weights, outputs.image_flattening_weights
    torch.testing.assert_close(question_weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(image_weights.sum(-1), torch.ones(3))
    assert question_weights[2, -2:].max() == 0 and image_weights[2, -4:].max() == 0
    assert outputs.guided_attentions[0].shape == (3, 4, 7, 6)
    assert outputs.guided_attentions[0][1, :, :, -1].max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_is_summed_binary_cross_entropy_averaged_over_batch(tiny_model, dtype):
    """In float32 whatever the model's dtype: bfloat16 would round the soft scores (0.3 to 0.3008) and the sum."""
    model = copy.deepcopy(tiny_model).to(dtype)
    input_ids, image_features = tiny_inputs(model.config)
    labels = torch.zeros(3, model.config.num_labels)
    labels[0, 1], labels[1, 4], labels[2, 4], labels[2, 5] = 1.0, 0.3, 0.6, 0.9
    outputs = model(input_ids=input_ids, image_features=image_features.to(dtype), labels=labels)
    assert outputs.logits.dtype == dtype and outputs.loss.dtype == torch.float32
    logits = outputs.logits.detach().double()
    by_hand = 0.0
    for sample in range(3):
        for answer in range(model.config.num_labels):
            x, y = logits[sample, answer].item(), labels[sample, answer].item()
            probability = 1 / (1 + math.exp(-x))
            by_hand -= y * math.log(probability) + (1 - y) * math.log(1 - probability)
    assert outputs.loss.item() == pytest.approx(by_hand / 3, rel=1e-5)


def test_autocast_bfloat16_stays_finite_and_close(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = tiny_model(input_ids=input_ids, image_features=image_features.half()).logits
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, **BF16_TOLERANCE)


def test_a_float64_model_computes_in_float64_under_autocast(tiny_model):
    """Autocast leaves float64 as it is, so the attention's masks must stay float64 too; they were built in
    autocast's precision, which the attention refused."""
    model = copy.deepcopy(tiny_model).double()
    input_ids, image_features = tiny_inputs(model.config)
    with torch.no_grad():
        reference = model(input_ids=input_ids, image_features=image_features.double()).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=input_ids, image_features=image_features.double()).logits
    assert autocast.dtype == torch.float64
    torch.testing.assert_close(autocast, reference, rtol=0, atol=0)


@pytest.mark.parametrize("cpu_autocast", [None, torch.float16, torch.bfloat16])
def test_layer_norm_of_a_float16_model_keeps_deviations_float16_can_hold(cpu_autocast):
    # The norm of the centred values is sqrt(511) times their deviation: 5,000 x 22.6 is past float16's 65,504.
    # CPU autocast, unlike CUDA's, leaves the norm in float16.
    layer_norm = RWSANLayerNorm(512, eps=1e-6)
    torch.nn.init.normal_(layer_norm.weight)
    hidden_states = (torch.randn(2, 512, generator=torch.Generator().manual_seed(0)) * 5000).half()
    with torch.no_grad():
        reference = layer_norm(hidden_states.float())
        with torch.autocast("cpu", dtype=cpu_autocast or torch.bfloat16, enabled=cpu_autocast is not None):
            half = layer_norm.half()(hidden_states)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), reference, atol=2e-2, rtol=1e-2)


def test_a_float16_model_answers_in_float16_close_to_float32(tiny_model):
    input_ids, image_features = tiny_inputs(tiny_model.config)
    half = copy.deepcopy(tiny_model).half()
    with torch.no_grad():
        reference = tiny_model(input_ids=input_ids, image_features=image_features).logits
        logits = half(input_ids=input_ids, image_features=image_features.half()).logits
    assert logits.dtype == torch.float16
    torch.testing.assert_close(logits.float(), reference, atol=1e-2, rtol=0)


def test_the_configured_layer_norm_eps_is_the_one_every_norm_uses(tiny_model):
    """A converted checkpoint or config with another eps than the default must compute with it."""
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(layer_norm_eps=0.5)).eval()
    assert {module.eps for module in model.modules() if isinstance(module, RWSANLayerNorm)} == {0.5}
    input_ids, image_features = tiny_inputs(model.config)
    with torch.no_grad():
        default_eps = tiny_model(input_ids=input_ids, image_features=image_features).logits
        # The same weights (the same seed), and only the eps differs.
        assert all(torch.equal(first, second) for first, second in zip(tiny_model.parameters(), model.parameters()))
        assert (model(input_ids=input_ids, image_features=image_features).logits - default_eps).abs().max() > 1e-2


def test_a_plain_trainer_evaluates_on_the_logits_alone(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    from rwsan.modeling_rwsan import RWSANForVQAOutput

    beside_logits = [field.name for field in dataclasses.fields(RWSANForVQAOutput)][2:]
    assert tiny_model.config.keys_to_ignore_at_inference == beside_logits
    input_ids, image_features = tiny_inputs(tiny_model.config)
    dataset = [{"input_ids": ids, "image_features": features} for ids, features in zip(input_ids, image_features)]
    arguments = TrainingArguments(tmp_path, use_cpu=True, report_to="none", per_device_eval_batch_size=2)
    predictions = Trainer(model=tiny_model, args=arguments).predict(dataset).predictions
    with torch.no_grad():
        logits = tiny_model(input_ids=input_ids, image_features=image_features).logits
    assert isinstance(predictions, np.ndarray)
    np.testing.assert_allclose(predictions, logits.numpy(), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = RWSANForVQA(tiny_config(dropout=0.0)).train()
    input_ids, image_features = tiny_inputs(model.config)
    labels = torch.full((3, model.config.num_labels), 0.3)
    query = model.rwsan.question_encoder.block.attention.query
    calls = []
    query.register_forward_hook(lambda *_: calls.append(1))
    gradients, forward_calls, backward_calls = [], [], []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        calls.clear()
        loss = model(input_ids=input_ids, image_features=image_features, labels=labels).loss
        forward_calls.append(len(calls))
        loss.backward()
        backward_calls.append(len(calls) - forward_calls[-1])
        gradients.append(query.weight.grad.clone())
    assert model.is_activation_checkpointing
    # Checkpointed blocks run their forward pass again in the backward one.
    assert forward_calls[0] == forward_calls[1] > 0 and backward_calls == [0, forward_calls[0]]
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-6, rtol=1e-5)


def test_initialisation_is_pytorch_default():
    torch.manual_seed(0)
    model = RWSANForVQA(RWSANConfig(vocab_size=500, num_labels=100))
    projection = model.rwsan.image_projection.weight
    bound = 1 / math.sqrt(2048)  # kaiming_uniform(a=sqrt(5)) on fan_in 2048
    assert projection.abs().max() <= bound and projection.abs().max() > 0.95 * bound
    assert model.rwsan.word_embeddings.weight.std().item() == pytest.approx(1.0, abs=0.02)
    lstm_bound = 1 / math.sqrt(512)
    assert model.rwsan.question_lstm.bias_hh_l0.abs().max() <= lstm_bound
    assert model.rwsan.question_lstm.bias_hh_l0.abs().max() > 0.95 * lstm_bound
    assert torch.equal(model.rwsan.fusion_norm.weight, torch.ones(1024))
    # Biases too are uniform within 1 / sqrt(fan_in), not of fan_out (512 here).
    projection_bias = model.rwsan.image_projection.bias
    assert projection_bias.abs().max() <= bound and projection_bias.abs().max() > 0.95 * bound


@pytest.mark.parametrize(
    "config, shape",
    [(tiny_config(), (3, 6, 7)), (tiny_config(num_srwsa_repeats=1, num_attention_heads=2), (2, 5, 11))],
    ids=["tiny", "other-sizes"],
)
def test_training_flops_are_those_of_the_matrix_products(config, shape):
    """`training_flops` against the flop counter over a real forward and backward pass, plus the LSTM's products
    (one fused operator, unseen by the counter)."""
    batch_size, tokens, regions = shape
    model = RWSANForVQA(config).train()
    # The model's own products: SDPA computes narrow queries and keys padded with zeros (FUSED_ATTENTION_HEAD_MULTIPLE).
    model.set_attn_implementation("eager")
    input_ids, image_features = tiny_inputs(config, batch_size, tokens, regions)
    with FlopCounterMode(display=False) as counter:
        model(input_ids, image_features, labels=torch.zeros(batch_size, config.num_labels)).loss.backward()
    lstm = 3 * 2 * batch_size * tokens * (config.word_embedding_size + config.hidden_size) * 4 * config.hidden_size
    assert model.training_flops(batch_size, tokens, regions) == counter.get_total_flops() + lstm
    assert RWSANForVQA(RWSANConfig()).training_flops(1, 16, 100) == pytest.approx(20.03e9, rel=1e-3)


def test_save_and_load_round_trip(tmp_path, tiny_model):
    tiny_model.config.id2label = {i: f"answer {i}" for i in range(9)}
    tiny_model.config.label2id = {f"answer {i}": i for i in range(9)}
    tiny_model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "modeling_rwsan.py", "configuration_rwsan.py"} <= {
        path.name for path in tmp_path.iterdir()
    }
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_rwsan.RWSANConfig",
        "AutoModel": "modeling_rwsan.RWSANModel",
        "AutoModelForVisualQuestionAnswering": "modeling_rwsan.RWSANForVQA",
    }
    inputs = tiny_inputs(tiny_model.config)
    for loaded in (
        RWSANForVQA.from_pretrained(tmp_path),
        AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, RWSANForVQA)
        assert loaded.config.id2label[4] == "answer 4"
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(*inputs).logits, tiny_model(*inputs).logits, atol=0, rtol=0)
    assert isinstance(AutoModel.from_pretrained(tmp_path), RWSANModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RWSANConfig)


def test_remote_code_loads_where_rwsan_cannot_be_imported(tmp_path, tiny_model):
    # An encoder of its own config: the VQA model's (which its `rwsan` shares) would bring the VQA model's auto_map.
    encoder = RWSANModel(copy.deepcopy(tiny_model.config))
    encoder.load_state_dict(tiny_model.rwsan.state_dict())
    encoder.save_pretrained(tmp_path / "encoder")
    tiny_model.save_pretrained(tmp_path / "model")
    inputs = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        expected = {
            "inputs": inputs,
            "logits": tiny_model(*inputs).logits,
            "pooled": tiny_model.rwsan(*inputs).pooler_output,
        }
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["rwsan"] = None  # `import rwsan` now raises ImportError
        try:
            import rwsan
        except ImportError:
            pass
        else:
            raise SystemExit("rwsan was importable")
        import torch
        from transformers import AutoModel, AutoModelForVisualQuestionAnswering
        folder = {str(tmp_path / "model")!r}
        model = AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
        encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        for loaded, class_name in ((model, "RWSANForVQA"), (encoder, "RWSANModel")):
            assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
            assert type(loaded).__name__ == class_name, type(loaded).__name__
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(*expected["inputs"]).logits
            pooled = encoder(*expected["inputs"]).pooler_output
        torch.testing.assert_close(logits, expected["logits"], atol=0, rtol=0)
        torch.testing.assert_close(pooled, expected["pooled"], atol=0, rtol=0)
        # An encoder's folder takes a new classifier, as with rwsan installed.
        headed = AutoModelForVisualQuestionAnswering.from_pretrained(
            {str(tmp_path / "encoder")!r}, trust_remote_code=True
        ).eval()
        assert type(headed).__name__ == "RWSANForVQA", type(headed).__name__
        with torch.no_grad():
            pooled = headed.rwsan(*expected["inputs"]).pooler_output
        torch.testing.assert_close(pooled, expected["pooled"], atol=0, rtol=0)
        print("remote ok")
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout
