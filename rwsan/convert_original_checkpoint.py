"""Convert a checkpoint of the paper's code (`BrightQin/RWSAN`) into a `RWSANForVQA` folder.

    python -m rwsan.convert_original_checkpoint --checkpoint epoch16.pkl --output_dir rwsan-vqa \\
        [--answer_dict answer_dict.json] [--processor data/vqa/processor]

The original saves `{'state_dict', 'optimizer', 'lr_base'}` with `torch.save` (keys prefixed `module.` when it
trained under DataParallel). Sizes are read off the tensor shapes. The head count and the repeat counts leave no
trace in them: they are the paper's unless given, and a checkpoint trained with others converts without complaint
into a model that computes something else, so give the values of the run's config (`MULTI_HEAD`, `SRWSA_LAYER`,
`SGRWSA_LAYER`) when they were changed.
"""

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import torch

from .configuration_rwsan import RWSANConfig
from .modeling_rwsan import RWSANForVQA
from .pipeline_rwsan import save_for_pipeline
from .processing_rwsan import RWSANProcessor, check_processor_fits_model
from .reporting import write_model_card

# Original module path -> this implementation's, applied in order to every key (the original's names appear only here).
_KEY_RENAMES = [
    (r"^proj\.", "classifier."),
    (r"^proj_norm\.", "rwsan.fusion_norm."),
    (r"^embedding\.", "rwsan.word_embeddings."),
    (r"^lstm\.", "rwsan.question_lstm."),
    (r"^img_feat_linear\.", "rwsan.image_projection."),
    (r"^attflat_img\.", "rwsan.image_flattening."),
    (r"^attflat_lang\.", "rwsan.question_flattening."),
    (r"^RWSA_layer\.srwsa\.denceenc1\.", "rwsan.question_encoder.block."),
    (r"^RWSA_layer\.srwsa\.norm1\.", "rwsan.question_encoder.second_input_norm."),
    (r"^RWSA_layer\.srwsa\.norm2\.", "rwsan.question_encoder.third_input_norm."),
    (r"^RWSA_layer\.sgrwsa\.dec1\.", "rwsan.image_encoder.block."),
    (r"^RWSA_layer\.sgrwsa\.norm1\.", "rwsan.image_encoder.second_input_norm."),
    (r"^RWSA_layer\.sgrwsa\.norm3\.", "rwsan.image_encoder.output_norm."),
    (r"(question_encoder\.block)\.norm1\.", r"\1.attention_norm."),
    (r"(question_encoder\.block)\.norm2\.", r"\1.feed_forward_norm."),
    (r"(question_encoder\.block)\.mhatt\.", r"\1.attention."),
    (r"(image_encoder\.block)\.norm1\.", r"\1.self_attention_norm."),
    (r"(image_encoder\.block)\.norm2\.", r"\1.guided_attention_norm."),
    (r"(image_encoder\.block)\.norm3\.", r"\1.feed_forward_norm."),
    (r"(image_encoder\.block)\.mhatt1\.", r"\1.self_attention."),
    (r"(image_encoder\.block)\.mhatt2\.", r"\1.guided_attention."),
    (r"\.ffn\.mlp\.fc\.linear\.", ".feed_forward.intermediate."),
    (r"\.ffn\.mlp\.linear\.", ".feed_forward.output."),
    (r"_flattening\.mlp\.fc\.linear\.", "_flattening.score.intermediate."),
    (r"_flattening\.mlp\.linear\.", "_flattening.score.output."),
    (r"\.linear_v\.", ".value."),
    (r"\.linear_k\.", ".key."),
    (r"\.linear_q\.", ".query."),
    (r"\.linear_merge\.", ".output."),
    (r"\.a_2$", ".weight"),
    (r"\.b_2$", ".bias"),
]


class CheckpointError(ValueError):
    """The file is not a usable checkpoint of the original RWSAN code."""


def rename_original_key(key: str) -> str:
    """Map one original `state_dict` key (without any `module.` prefix) to this implementation's."""
    for pattern, replacement in _KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        # weights_only: a checkpoint must not be able to run code while it is read.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        detail = f"{type(error).__name__}: {error}"
        if isinstance(error, pickle.UnpicklingError) and "WeightsUnpickler error:" in str(error):
            # torch's message goes on to advise weights_only=False, which would let the file run code.
            refused = str(error).split("WeightsUnpickler error:")[1].split("Check the documentation")[0]
            detail = f"it is no pickle of tensors alone: {' '.join(refused.split())}"
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint of tensors ({detail})") from error
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(
            f"{path} is not a checkpoint of the original RWSAN code: expected a dict with a 'state_dict' of tensors."
        )
    names = {key: key.removeprefix("module.") for key in state_dict}
    _check_one_key_a_name(names, path)
    return {names[key]: value for key, value in state_dict.items()}


def _check_one_key_a_name(names: dict[str, str], path) -> None:
    """`names`: each key of the checkpoint -> the name it is given. Two keys of one name would leave one weight, the
    other silently dropped (a checkpoint holding `module.proj.weight` and a stray `proj.weight`, say)."""
    keys_of = {}
    for key, name in names.items():
        keys_of.setdefault(name, []).append(key)
    shared = [keys for keys in keys_of.values() if len(keys) > 1]
    if shared:
        raise CheckpointError(f"{path} holds one weight under several keys, which would leave one of them: {shared}")


def _shape(state_dict: dict[str, torch.Tensor], key: str, path) -> torch.Size:
    if key not in state_dict:
        raise CheckpointError(f"{path} lacks the key '{key}', which every original RWSAN checkpoint has.")
    return state_dict[key].shape


def config_from_original_state_dict(state_dict: dict[str, torch.Tensor], path="checkpoint", **overrides):
    """Read the sizes off the original tensors; repeats, heads and the rest default to the paper's."""
    # A misspelt name would otherwise become a stray attribute of the config, and the model would silently keep
    # the default the caller meant to change.
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(RWSANConfig)})
    if unknown:
        raise TypeError(f"{unknown} are not RWSANConfig fields, so they cannot override the checkpoint's configuration")
    heads = overrides.get("num_attention_heads", RWSANConfig.num_attention_heads)
    if heads < 1:
        raise CheckpointError(f"num_attention_heads must be at least 1, got {heads}")
    prefix = "RWSA_layer.srwsa.denceenc1."
    guided_prefix = "RWSA_layer.sgrwsa.dec1."

    def rank(key: str) -> int:
        """Queries' and keys' size a head, from a key projection's outputs, all heads side by side."""
        outputs = _shape(state_dict, key, path)[0]
        if outputs % heads:
            raise CheckpointError(
                f"{path}: '{key}' has {outputs} outputs, which {heads} heads cannot share; give the training run's "
                "number of heads (MULTI_HEAD)"
            )
        return outputs // heads

    vocab_size, word_embedding_size = _shape(state_dict, "embedding.weight", path)
    hidden_size, image_feature_size = _shape(state_dict, "img_feat_linear.weight", path)
    sizes = {
        "vocab_size": vocab_size,
        "word_embedding_size": word_embedding_size,
        "hidden_size": hidden_size,
        "image_feature_size": image_feature_size,
        "intermediate_size": _shape(state_dict, prefix + "ffn.mlp.fc.linear.weight", path)[0],
        "text_self_attention_rank": rank(prefix + "mhatt.linear_k.weight"),
        "image_self_attention_rank": rank(guided_prefix + "mhatt1.linear_k.weight"),
        "guided_attention_rank": rank(guided_prefix + "mhatt2.linear_k.weight"),
        "flat_mlp_size": _shape(state_dict, "attflat_img.mlp.fc.linear.weight", path)[0],
        "flat_output_size": _shape(state_dict, "attflat_img.linear_merge.weight", path)[0],
        "num_labels": _shape(state_dict, "proj.weight", path)[0],
    }
    answers = overrides.get("id2label")
    if answers is not None and len(answers) != sizes["num_labels"]:
        # RWSANConfig would name the answers LABEL_i instead, logging it only.
        raise CheckpointError(
            f"{path}: the classifier has {sizes['num_labels']} outputs but id2label names {len(answers)} answers"
        )
    sizes.update(overrides)
    return RWSANConfig(**sizes)


def _read_answer_dict(path: str | os.PathLike, num_answers: int) -> dict[int, str]:
    if not isinstance(path, (str, os.PathLike)):
        # An error naming the object as the file would print all of its answers.
        raise TypeError(f"answer_dict must be the path of the original answer_dict.json, got a {type(path).__name__}")
    try:
        with open(path, encoding="utf-8") as file:
            answer_to_index, index_to_answer = json.load(file)
        id2label = {int(index): answer for index, answer in index_to_answer.items()}
        mismatched = [answer for answer, index in answer_to_index.items() if id2label.get(int(index)) != answer]
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{path} is not an answer dictionary of the original format [answer_to_index, index_to_answer] "
            f"({type(error).__name__}: {error})"
        ) from error
    if mismatched:
        raise CheckpointError(f"{path}: answer_to_index and index_to_answer disagree, e.g. on {mismatched[:5]}")
    if sorted(id2label) != list(range(num_answers)):
        raise CheckpointError(
            f"{path} has {len(id2label)} answers with indices {min(id2label, default=None)}.."
            f"{max(id2label, default=None)}, but the checkpoint's classifier has {num_answers} outputs."
        )
    return id2label


def load_original_checkpoint(
    path: str | os.PathLike, answer_dict: str | os.PathLike | None = None, **config_overrides
) -> RWSANForVQA:
    """Build a `RWSANForVQA` from a checkpoint of the original code, weight for weight.

    Args:
        path: the original `.pkl` checkpoint (`{'state_dict', 'optimizer', 'lr_base'}` or a bare state dict).
        answer_dict: optional original `answer_dict.json` (`[ans_to_ix, ix_to_ans]`) to name the answers.
        config_overrides: `RWSANConfig` fields the shapes cannot tell (e.g. `num_srwsa_repeats`).

    Raises:
        CheckpointError (a `ValueError`): the file is unreadable, not such a checkpoint, or has missing, unexpected
            or mis-shaped keys (all of them named).
    """
    state_dict = _read_state_dict(path)
    config = config_from_original_state_dict(state_dict, path, **config_overrides)
    if answer_dict is not None:
        config.id2label = _read_answer_dict(answer_dict, config.num_labels)
        config.label2id = {answer: index for index, answer in config.id2label.items()}

    model = RWSANForVQA(config)
    expected = model.state_dict()
    names = {key: rename_original_key(key) for key in state_dict}
    _check_one_key_a_name(names, path)
    renamed = {names[key]: (key, value) for key, value in state_dict.items()}
    problems = []
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(original for key, (original, _) in renamed.items() if key not in expected)
    if missing:
        problems.append(f"missing keys (this implementation's names): {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    mis_shaped = [
        f"{original} {tuple(value.shape)} (expected {tuple(expected[key].shape)})"
        for key, (original, value) in renamed.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if mis_shaped:
        problems.append(f"mis-shaped keys: {mis_shaped}")
    if problems:
        raise CheckpointError(f"{path} does not match an RWSAN of the inferred configuration: " + "; ".join(problems))

    model.load_state_dict({key: value for key, (_, value) in renamed.items()}, strict=True)
    return model.eval()


def _read_processor(path: str | os.PathLike, model: RWSANForVQA) -> RWSANProcessor:
    if not Path(path).is_dir():
        raise CheckpointError(f"Processor folder not found: {path}")
    processor = RWSANProcessor.from_pretrained(str(path))
    # The weights do not say how many question words and regions the processor keeps: the model takes its.
    model.config.max_question_length = processor.max_question_length
    model.config.max_regions = processor.max_regions
    try:
        check_processor_fits_model(processor, model.config, "the checkpoint", f"the processor in {path}")
    except ValueError as error:
        raise CheckpointError(
            f"{error} (the checkpoint's answers are named by --answer_dict; the processor's data must be prepared "
            "with the same answers and questions)"
        ) from None
    return processor


def convert(
    checkpoint: str,
    output_dir: str,
    answer_dict: str | None = None,
    processor: str | None = None,
    **config_overrides,
) -> RWSANForVQA:
    """Convert and save; the output folder appears whole or not at all.

    With `processor` (the `processor/` folder that `prepare_vqa.py` wrote), the folder also holds the processor and
    the pipeline code: a complete, hub-ready folder that `pipeline(model=..., trust_remote_code=True)` loads.
    """
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"Output folder {output} is a file; choose another path.")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"Output folder {output} exists and is not empty; choose another or remove it.")
    model = load_original_checkpoint(checkpoint, answer_dict, **config_overrides)
    question_processor = _read_processor(processor, model) if processor is not None else None
    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the folder gets the permissions the umask gives, not a private folder's, so that
    # others on a shared machine can read the model.
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        if question_processor is None:
            model.save_pretrained(staging)
        else:
            save_for_pipeline(model, question_processor, staging)
            provenance = f"converted from `{Path(checkpoint).name}`, a checkpoint of the paper's code."
            # The paper's code and the checkpoints it released are under the MIT license.
            write_model_card(staging, model.config, provenance, license="mit", folder=output)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint of the original code (e.g. epoch16.pkl)")
    parser.add_argument("--output_dir", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--answer_dict", help="the original answer_dict.json, to name the answers")
    parser.add_argument("--processor", help="a processor folder (prepare_vqa.py's OUT/processor) to save beside it")
    # The shapes cannot tell these: a wrong value converts silently into another network.
    unchecked = " (not in the weights: give the training run's value if it was not the paper's)"
    parser.add_argument(
        "--num_srwsa_repeats", type=int, default=RWSANConfig.num_srwsa_repeats, help="SRWSA repeats" + unchecked
    )
    parser.add_argument(
        "--num_sgrwsa_repeats", type=int, default=RWSANConfig.num_sgrwsa_repeats, help="SGRWSA repeats" + unchecked
    )
    parser.add_argument(
        "--num_attention_heads", type=int, default=RWSANConfig.num_attention_heads, help="heads" + unchecked
    )
    args = parser.parse_args(argv)
    try:
        model = convert(
            args.checkpoint,
            args.output_dir,
            args.answer_dict,
            args.processor,
            num_srwsa_repeats=args.num_srwsa_repeats,
            num_sgrwsa_repeats=args.num_sgrwsa_repeats,
            num_attention_heads=args.num_attention_heads,
        )
    except (ValueError, OSError) as error:  # a bad checkpoint, setting or output folder, not a bug: no traceback
        parser.exit(2, f"error: {error}\n")
    print(f"Wrote {args.output_dir}: {model.num_parameters():,} parameters, {model.config.num_labels} answers.")
    if args.processor is None:
        print(
            "No --processor: the folder holds the model only. AutoProcessor and the pipeline need the question "
            "vocabulary: convert again with --processor DATASET/processor (from data_scripts/prepare_vqa.py)."
        )


if __name__ == "__main__":
    main()
