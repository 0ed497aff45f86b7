"""Train RWSAN for VQA with the paper's recipe on the transformers Trainer.

With no data arguments it trains a small model on the built-in toy VQA set (made and prepared on first use, then
cached), on the CPU, in a few minutes:

    python train_vqa.py

On VQA-v2 prepared by data_scripts/prepare_vqa.py, the original's three uses (its --RUN train, val and test),
then the same on several GPUs:

    # train on train, evaluate on val after every epoch (VQA accuracy as RWSAN's evaluation script computes it)
    python train_vqa.py --dataset_dir data/vqa --train_split train --output_dir runs/train
    # evaluate that model on val (evaluation_val.json beside it)
    python train_vqa.py --dataset_dir data/vqa --do_train false --model_name_or_path runs/train \\
        --output_dir runs/train
    # train on train+val+vg, then answer the test set for the evaluation server
    python train_vqa.py --dataset_dir data/vqa --train_split train+val+vg --output_dir runs/full \\
        --do_predict
    # several GPUs or machines: the same command under accelerate (or torchrun), with a per-device batch of
    # 64 / processes to keep the paper's global batch of 64
    accelerate launch --multi_gpu --num_processes 8 train_vqa.py --dataset_dir data/vqa --bf16 \\
        --per_device_train_batch_size 8 ...

The `TrainingArguments` options work (`--bf16`, `--fp16`, `--gradient_accumulation_steps`,
`--resume_from_checkpoint last`, `--torch_compile`, `--push_to_hub`, ...), but for the learning-rate schedule, which
is the paper's unless `--paper_schedule false`, and label smoothing (the labels are soft scores already). The
defaults are the paper's recipe, but for two choices left to the user: the precision (fp32 unless `--bf16` or
`--fp16`; the original trains with fp16 autocast) and the word embedding's start (random unless `--glove_path`; the
original starts from GloVe 840B 300d).
`--compile_blocks` compiles only the two weight-shared attention blocks, the layer norms between their
applications and the attention flattenings, faster than `--torch_compile`;
`--cuda_graphs` (with `--pad_to_multiple_of`) replays each step's passes as a CUDA graph.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, TrainerCallback, set_seed
from transformers.integrations import get_available_reporting_integrations, get_reporting_integration_callbacks
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import CONFIG_NAME, PROCESSOR_NAME

from data_scripts import make_toy_vqa as toy_data
from rwsan import RWSANConfig, RWSANForVQA
from rwsan.data import VQACollator, load_vqa_dataset, unpack_image_features
from rwsan.evaluation import compute_vqa_accuracy
from rwsan.predict import check_each_question_once, questions_left_out_warning, write_predictions
from rwsan.processing_rwsan import (
    RWSANProcessor,
    check_processor_fits_model,
    check_same_vocabularies,
    load_glove_embeddings,
)
from rwsan.reporting import plot_training_history, write_model_card
from rwsan.training import (
    DROPPED_QUESTIONS,
    HubRepositoryError,
    ResumeError,
    StopOnNonFiniteLoss,
    VQATrainer,
    VQATrainingArguments,
    answer_indices,
    answers_and_float16_logits,
    argument_default,
    check_metric_for_best_model,
    checkpoint_folders,
    schedule_options_conflict,
    strategy_name,
    vqa_metric_names,
    vqa_metrics,
)

TOY_CACHE = Path(".cache") / "toy_vqa"
# What a run writes of its predictions, and a run that trains nothing of its evaluation.
RESULT_FILES = ("predictions_*.json", "logits_*.npy", "question_ids_*.npy", "evaluation_*.json")
# Files a training run writes over: those of a saved model, and the run's own reports.
REPLACED_FILES = ("config.json", "model.safetensors", "README.md", "metrics.json", "training_curves.png")

# The built-in default: a small RWSAN (hidden 128, each shared encoder applied once: about 0.8M parameters instead
# of 19.5M) on the toy set, so that it trains on two CPU cores in minutes. The schedule keeps the paper's shape
# (warm-up, then two decays) over 10 epochs; everything here can be overridden on the command line.
TOY_MODEL_SIZES = [
    "--hidden_size", "128",
    "--intermediate_size", "256",
    "--word_embedding_size", "64",
    "--flat_mlp_size", "64",
    "--flat_output_size", "256",
    "--num_srwsa_repeats", "1",
    "--num_sgrwsa_repeats", "1",
]  # fmt: skip
TOY_SCHEDULE = [
    "--warmup_epochs", "1",
    "--lr_decay_epochs", "8", "9",
]  # fmt: skip
TOY_TRAINING_ARGUMENTS = [
    "--num_train_epochs", "10",
    "--learning_rate", "1e-3",
    "--logging_steps", "50",
    "--save_total_limit", "2",
    "--use_cpu",
    "--output_dir", "runs/toy",
]  # fmt: skip
TOY_ARGUMENTS = TOY_MODEL_SIZES + TOY_SCHEDULE + TOY_TRAINING_ARGUMENTS


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from a saved or converted RWSANForVQA folder (or hub id)."}
    )
    glove_path: str | None = field(
        default=None, metadata={"help": "A glove.840B.300d.txt-format file to initialise the word embedding."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel: sdpa or eager."})
    hidden_size: int | None = field(default=None, metadata={"help": "Config override (paper: 512)."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Config override (paper: 4)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Config override (paper: 2048)."})
    word_embedding_size: int | None = field(default=None, metadata={"help": "Config override (paper: 300)."})
    flat_mlp_size: int | None = field(default=None, metadata={"help": "Config override (paper: 256)."})
    flat_output_size: int | None = field(default=None, metadata={"help": "Config override (paper: 1024)."})
    num_srwsa_repeats: int | None = field(default=None, metadata={"help": "Config override (paper: 3)."})
    num_sgrwsa_repeats: int | None = field(default=None, metadata={"help": "Config override (paper: 3)."})
    dropout: float | None = field(default=None, metadata={"help": "Config override (paper: 0.1)."})

    def config_overrides(self) -> dict:
        names = (
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "word_embedding_size",
            "flat_mlp_size",
            "flat_output_size",
            "num_srwsa_repeats",
            "num_sgrwsa_repeats",
            "dropout",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class DataArguments:
    dataset_dir: str | None = field(
        default=None, metadata={"help": "A folder made by data_scripts/prepare_vqa.py; none: the built-in toy set."}
    )
    train_split: str = field(default="train", metadata={"help": "train, train+val or train+val+vg."})
    eval_split: str = field(
        default="val", metadata={"help": "Split evaluated after every epoch; ignored when training on it."}
    )
    predict_split: str = field(
        default="test",
        metadata={
            "help": "Split answered by --do_predict into predictions_SPLIT.json: test (the whole test set, one file "
            "for the evaluation server's test-dev and test-std phases, as the original), test-dev (its questions "
            "only), or an annotated split (val) to score with data_scripts/evaluate_predictions.py."
        },
    )
    save_logits: bool = field(default=False, metadata={"help": "With --do_predict, also save the float16 scores."})
    max_regions: int | None = field(
        default=None,
        metadata={
            "help": "Regions kept per image (default: --model_name_or_path's own, else as many as the data was "
            "prepared with: the paper's 100 by default)."
        },
    )
    max_question_length: int | None = field(
        default=None,
        metadata={
            "help": "Words kept per question (default: --model_name_or_path's own, else as many as the data was "
            "prepared with: the paper's 16 by default)."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Round padded lengths up to a multiple (fewer shapes to compile or record)."}
    )
    pack_regions: bool = field(
        default=False,
        metadata={
            "help": "DataLoader workers send only the real regions, padded on the device: less than half the bytes "
            "to move between processes and to the GPU (faster loading with workers on a GPU)."
        },
    )
    toy_num_images: int = field(
        default=2000,
        metadata={
            "help": "Images of the built-in toy set (10 or more; with few questions per image, enough that some answer "
            "occurs 9 times, the vocabulary's threshold)."
        },
    )
    # More questions per image than VQA-v2's ~5: they cost no feature storage, and a model that sees each image
    # asked many things learns to read it rather than memorise it.
    toy_questions_per_image: int = field(default=20, metadata={"help": "Questions per image of the toy set (1 to 20)."})
    toy_seed: int = field(default=0, metadata={"help": "Seed of the built-in toy set."})


class UsageError(Exception):
    """Bad input found before training: printed as one message, without a traceback."""


def prepare_toy_dataset(num_images: int, questions_per_image: int, seed: int) -> Path:
    """Make the toy VQA set in the raw official formats and prepare it, as a user would real VQA-v2; cached."""
    from data_scripts.prepare_vqa import prepare_vqa

    name = f"{num_images}x{questions_per_image}-seed{seed}"
    raw, prepared = TOY_CACHE / f"raw-{name}", TOY_CACHE / f"prepared-{name}"
    if not prepared.is_dir():
        if not raw.is_dir():
            # Written under another name and renamed when whole: a stopped run leaves no half set to be prepared.
            partial = raw.with_name(f"{raw.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            toy_data.make_toy_vqa(partial, seed=seed, num_images=num_images, questions_per_image=questions_per_image)
            partial.rename(raw)
        prepare_vqa(raw, prepared)
    return prepared


def parts_trained_on(split: str, data_args: DataArguments) -> str:
    """The parts of `split` (names joined with "+") that --train_split holds too, joined the same way; "" for none."""
    return "+".join(sorted(set(split.split("+")) & set(data_args.train_split.split("+"))))


def eval_split_is_trained_on(data_args: DataArguments, training_args: VQATrainingArguments) -> bool:
    """Whether the run trains on all of --eval_split (train+val+vg, for the test server): nothing is left to
    evaluate on, and it is not evaluated."""
    trained_on = set(data_args.train_split.split("+")) if training_args.do_train else set()
    return set(data_args.eval_split.split("+")) <= trained_on


def evaluates(data_args: DataArguments, training_args: VQATrainingArguments) -> bool:
    """Whether the run evaluates on --eval_split."""
    return (
        training_args.do_eval and bool(data_args.eval_split) and not eval_split_is_trained_on(data_args, training_args)
    )


def load_splits(data_args: DataArguments, training_args: VQATrainingArguments):
    def load(option, split, way_out=""):
        try:
            return load_vqa_dataset(data_args.dataset_dir, split, data_args.max_question_length, data_args.max_regions)
        except ValueError as error:
            raise ValueError(f"{option} {split}: {error}{way_out}") from None

    def load_annotated(option, split, way_out=""):
        dataset = load(option, split, way_out)
        if not dataset.has_answers:
            raise ValueError(
                f"{option} {split}: the split has no answers (the test splits are unannotated); training and "
                "evaluation need an annotated split (train, val, vg)"
            )
        return dataset

    train_dataset = load_annotated("--train_split", data_args.train_split) if training_args.do_train else None
    # With split_batches, --per_device_train_batch_size is the batch of all the processes together.
    batch_is_global = training_args.accelerator_config.split_batches or training_args.world_size == 1
    one_batch = training_args.per_device_train_batch_size * (1 if batch_is_global else training_args.world_size)
    if train_dataset is not None and training_args.dataloader_drop_last and len(train_dataset) < one_batch:
        counted = (
            ""
            if batch_is_global
            else f" ({training_args.per_device_train_batch_size} per process x {training_args.world_size})"
        )
        raise ValueError(
            f"--train_split {data_args.train_split} has {len(train_dataset)} questions, fewer than one batch of "
            f"{one_batch}{counted}, which --dataloader_drop_last drops: nothing would be trained"
        )
    evaluate = evaluates(data_args, training_args)
    if training_args.do_eval and data_args.eval_split and eval_split_is_trained_on(data_args, training_args):
        if training_args.process_index == 0:
            print(f"Not evaluating: --eval_split {data_args.eval_split} is trained on", file=sys.stderr)
    elif evaluate and training_args.do_train:
        if shared := parts_trained_on(data_args.eval_split, data_args):
            raise ValueError(
                f"--eval_split {data_args.eval_split} shares {shared} with --train_split "
                f"{data_args.train_split}: its accuracy would be measured partly on training questions"
            )
    if training_args.do_predict and training_args.do_train and training_args.process_index == 0:
        if shared := parts_trained_on(data_args.predict_split, data_args):
            print(
                f"warning: --predict_split {data_args.predict_split} shares {shared} with "
                f"--train_split {data_args.train_split}: its answers are to questions the model is trained on, and "
                "their accuracy says little of the model",
                file=sys.stderr,
            )
    way_out = "; give --eval_split a split of the dataset" + (
        ", or --eval_strategy no to train without evaluating" if training_args.do_train else ""
    )
    eval_dataset = load_annotated("--eval_split", data_args.eval_split, way_out) if evaluate else None
    predict_dataset = load("--predict_split", data_args.predict_split) if training_args.do_predict else None
    if predict_dataset is not None:
        check_each_question_once(predict_dataset.question_ids, f"--predict_split {data_args.predict_split}")
    return train_dataset, eval_dataset, predict_dataset


def saved_processor(model_name_or_path: str) -> RWSANProcessor | None:
    """The processor saved with a model (a folder or hub repository), or None where it was saved without one (a
    converted checkpoint, say)."""
    local = Path(model_name_or_path).is_dir()
    if local and not (Path(model_name_or_path) / PROCESSOR_NAME).is_file():
        return None
    try:
        return RWSANProcessor.from_pretrained(model_name_or_path)
    except OSError:
        if local:
            raise
        print(f"{model_name_or_path} has no processor to compare the dataset's words with", file=sys.stderr)
        return None


def build_model(model_args: ModelArguments, processor, feature_size: int) -> RWSANForVQA:
    if model_args.model_name_or_path:
        # The one config override a trained model takes (main refuses the sizes): dropout is a training choice.
        dropout = {} if model_args.dropout is None else {"dropout": model_args.dropout}
        model = RWSANForVQA.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation, **dropout
        )
    else:
        config = RWSANConfig(
            vocab_size=len(processor.tokenizer),
            image_feature_size=feature_size,
            max_regions=processor.max_regions,
            max_question_length=processor.max_question_length,
            id2label=dict(processor.id2label),
            **model_args.config_overrides(),
        )
        config._attn_implementation = model_args.attn_implementation
        model = RWSANForVQA(config)
    if model.config.image_feature_size != feature_size:
        raise UsageError(
            f"The dataset's region features have {feature_size} values but the model expects "
            f"{model.config.image_feature_size} (config.image_feature_size)."
        )
    model_path = model_args.model_name_or_path
    if model_path:
        try:
            check_processor_fits_model(processor, model.config, model_path, "the dataset's processor")
            # A model saved with its processor tells which words its ids are: of one size, they may still differ.
            model_processor = saved_processor(model_path)
            if model_processor is not None:
                check_same_vocabularies(model_processor, processor, model_path, "the dataset's processor")
        except ValueError as error:
            raise UsageError(
                f"{error}. Use data prepared from the question and annotation files the model was trained or "
                "converted with, or train a new model."
            ) from None
    if model_args.glove_path:
        vocabulary = processor.tokenizer.get_vocab()
        embeddings = load_glove_embeddings(model_args.glove_path, vocabulary, model.config.word_embedding_size)
        model.get_input_embeddings().weight.data.copy_(embeddings)
        # The words without a vector start at zero, as in the original: a file that covers few is worth knowing of.
        print(
            f"GloVe vectors for {int(embeddings.any(dim=1).sum()):,} of the {len(vocabulary):,} question words "
            f"({model_args.glove_path})",
            file=sys.stderr,
        )
    return model


class DeleteEarlierOutputs(TrainerCallback):
    """Deletes what `outputs_to_replace` lists once training begins: after `VQATrainer` has checked a resumed
    checkpoint against the run (its epoch length, optimizer options and last step), so that a run it refuses
    deletes nothing."""

    def __init__(self, paths: list[Path], output_dir: str):
        self.paths = paths
        self.output_dir = output_dir

    def on_train_begin(self, args, state, control, **kwargs):
        # Where the run saves: with --save_on_each_node, on each machine's first process (its own disk).
        if not (args.should_save and self.paths):
            return
        print(
            f"--overwrite_output_dir: deleting {', '.join(path.name for path in self.paths)} of an earlier run in "
            f"{self.output_dir}",
            file=sys.stderr,
        )
        for path in self.paths:
            try:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                pass  # deleted by another machine's first process: --save_on_each_node on a shared disk


class PrintEpochAccuracy(TrainerCallback):
    """One readable line per evaluation during training, beside the Trainer's progress bar."""

    training = False

    def __init__(self, split: str):
        self.split = split

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.training and state.is_world_process_zero and metrics and "eval_accuracy" in metrics:
            per_type = ", ".join(
                f"{name.removeprefix('eval_accuracy_')} {value:.2f}"
                for name, value in metrics.items()
                if name.startswith("eval_accuracy_")
            )
            # Evaluations by steps fall inside epochs: "epoch 0.74", "epoch 1".
            epoch = f"{state.epoch:.2f}".rstrip("0").rstrip(".")
            print(f"epoch {epoch}: {self.split} VQA accuracy {metrics['eval_accuracy']:.2f} ({per_type})")


def baselines(train_dataset, eval_dataset) -> dict[str, float]:
    """Accuracy of the most common answer, and of the most common answer per question text, learned on train."""
    train_best = [Counter(answers).most_common(1)[0][0] for answers in train_dataset.answers]
    majority = Counter(train_best).most_common(1)[0][0]
    by_question: dict[str, Counter] = {}
    for question, answer in zip(train_dataset.questions, train_best):
        by_question.setdefault(question, Counter())[answer] += 1
    question_only = [
        by_question[question].most_common(1)[0][0] if question in by_question else majority
        for question in eval_dataset.questions
    ]
    gold, types = eval_dataset.answers, eval_dataset.answer_types
    return {
        "majority_answer": compute_vqa_accuracy([majority] * len(gold), gold, types)["accuracy"],
        "question_only": compute_vqa_accuracy(question_only, gold, types)["accuracy"],
    }


def show_sample_answers(model, dataset, collator, count=5):
    model.eval()
    rows = list(range(min(count, len(dataset))))
    batch = collator(dataset.__getitems__(rows))
    batch.pop("question_id")
    batch.pop("labels", None)
    batch = unpack_image_features({key: value.to(model.device) for key, value in batch.items()})
    with torch.no_grad():
        logits = model(**batch).logits
    answers = dataset.processor.post_process(logits, top_k=1)
    for row, best in zip(rows, answers):
        truth = Counter(dataset.answers[row]).most_common(1)[0][0]
        print(f"  Q: {dataset.questions[row]}  ->  {best[0]['answer']} ({best[0]['score']:.2f}); annotators: {truth}")


def weights_fingerprint(model) -> str:
    """A hash of every parameter's bytes: equal on all processes when data-parallel training kept them in sync."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def earlier_run_outputs(output_dir: Path) -> list[Path]:
    """What an earlier run left in `output_dir` that a new one would not replace: its checkpoints, and its
    prediction and evaluation files (which --push_to_hub would upload with the new model)."""
    if not output_dir.is_dir():
        return []
    results = [path for pattern in RESULT_FILES for path in sorted(output_dir.glob(pattern)) if path.is_file()]
    return list(checkpoint_folders(output_dir).values()) + results


def _names_a_local_path(name: str) -> bool:
    """Whether a model name can only be a local path: a hub repository is `name` or `namespace/name`."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, VQATrainingArguments, bool]:
    """The three argument groups, and whether this is the toy run (no --dataset_dir): then `TOY_ARGUMENTS` come
    first, as defaults the command line overrides. Options cannot be abbreviated: `--dataset_d` would otherwise
    name --dataset_dir to the parser but not to the toy check."""
    given_data, given_model, given_training = (
        HfArgumentParser(arguments, allow_abbrev=False, add_help=False).parse_known_args(argv)[0]
        for arguments in (DataArguments, ModelArguments, VQATrainingArguments)
    )
    toy = given_data.dataset_dir is None
    # A model given brings its own sizes, and the Trainer's schedule takes no epochs of the paper's.
    # Its own folder, runs/toy, the toy run makes afresh each time (make demo twice); a folder given, or one a given
    # model may lie in, is kept safe as any run's.
    toy_arguments = (
        ([] if given_model.model_name_or_path else TOY_MODEL_SIZES)
        + (TOY_SCHEDULE if given_training.paper_schedule else [])
        + TOY_TRAINING_ARGUMENTS
        + (
            ["--overwrite_output_dir"]
            if given_training.output_dir is None and not given_model.model_name_or_path
            else []
        )
    )
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, VQATrainingArguments),
        allow_abbrev=False,
        description=__doc__,
        epilog=textwrap.fill(
            "Without --dataset_dir (the toy run), these come before the options given, and override the defaults "
            f"shown: {' '.join(TOY_ARGUMENTS)} (the sizes only without --model_name_or_path, the epochs of the "
            "schedule only without --paper_schedule false), and --overwrite_output_dir without --output_dir and "
            "--model_name_or_path",
            width=100,
            break_on_hyphens=False,
        ),
        formatter_class=toy_data.HelpFormatter,
    )
    try:
        # No `train_vqa.args` file either: its arguments would come before the toy ones, unseen by the toy check.
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(
            (toy_arguments if toy else []) + argv, look_for_args_file=False
        )
    except ValueError as error:  # an inconsistent combination, found by VQATrainingArguments
        raise UsageError(str(error)) from error
    if model_args.model_name_or_path and model_args.model_name_or_path.startswith("~"):
        # As a shell would: from_pretrained takes it as it is, and `--model_name_or_path=~/model` is not expanded.
        model_args.model_name_or_path = str(Path(model_args.model_name_or_path).expanduser())
    return model_args, data_args, training_args, toy


def options_given(argv: list[str]) -> set[str]:
    """The names of the options `argv` gives, whatever their values (a default given counts as given)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, VQATrainingArguments), allow_abbrev=False, add_help=False)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


# --report_to values that name no integration: the Trainer expands "all" to those installed.
NO_REPORTS = ("all", "none", None)
# Integrations that transformers' list of those installed leaves out even where they are (azure_ml beside mlflow).
UNLISTED_REPORTS = ("azure_ml", "flyte")


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: VQATrainingArguments):
    """Refuses options that would train or answer wrongly, or be ignored, before anything runs."""
    if not (training_args.do_train or training_args.do_predict or evaluates(data_args, training_args)):
        raise UsageError("nothing to do: give --do_train, --do_predict, or --do_eval with an --eval_split")
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {training_args.output_dir} is a file, not a folder")
    if training_args.do_train and training_args.max_steps == 0:
        # The Trainer reads only a negative --max_steps as unset: 0 trains one step, saved as if trained.
        raise UsageError("--max_steps 0 trains nothing; give a positive number of steps, or leave it out to train by "
                         "--num_train_epochs")  # fmt: skip
    if training_args.do_train and training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        # The Trainer would save the new model's random weights, with a model card, as if trained.
        raise UsageError(f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing; give more epochs")
    if not training_args.do_train and not model_args.model_name_or_path:
        raise UsageError(
            "--do_train false evaluates or predicts with the weights of --model_name_or_path; give it (a new "
            "model's weights are random)"
        )
    if training_args.push_to_hub and not training_args.do_train:
        # The Trainer would make the hub repository, and the run push nothing to it.
        raise UsageError(
            "--push_to_hub uploads the model a run trains, and --do_train false trains none: upload the model's "
            "folder itself (`hf upload`, or `push_to_hub` of the loaded model and processor)"
        )
    hub_names = [name for name in training_args.__dataclass_fields__ if name.startswith("hub_")]
    # (hub_strategy is an enum once read, its default a string)
    hub_options = [
        f"--{name}"
        for name in hub_names
        if strategy_name(getattr(training_args, name)) != strategy_name(argument_default(name))
    ]
    if hub_options and not training_args.push_to_hub:
        raise UsageError(
            f"{', '.join(hub_options)} would be ignored: the --hub_* options say how --push_to_hub uploads; give it too"
        )
    if data_args.save_logits and not training_args.do_predict:
        raise UsageError("--save_logits keeps the scores of --do_predict's answers; give --do_predict too")
    # (A training run refuses any earlier prediction files: `outputs_to_replace`.)
    if training_args.do_predict and not training_args.do_train and not data_args.save_logits:
        split_logits = [f"{name}_{data_args.predict_split}.npy" for name in ("logits", "question_ids")]
        stale_logits = [name for name in split_logits if (output_dir / name).exists()]
        if stale_logits:
            raise UsageError(
                f"--output_dir {training_args.output_dir} holds {', '.join(stale_logits)} of an earlier prediction, "
                f"which the new predictions_{data_args.predict_split}.json would not match: give --save_logits to "
                "write them anew, or move them away"
            )
    keeps_best = {
        "--load_best_model_at_end loads": training_args.load_best_model_at_end,
        "--save_strategy best saves": strategy_name(training_args.save_strategy) == "best",
    }
    for option, given in keeps_best.items():
        if given and training_args.do_train and not evaluates(data_args, training_args):
            reason = (
                f"--eval_split {data_args.eval_split} is trained on"
                if data_args.eval_split and training_args.do_eval
                else "no --eval_split is evaluated"
            )
            raise UsageError(
                f"{option} the checkpoint of the best evaluation, and this run evaluates nothing ({reason}): leave "
                "the option out"
            )
    if data_args.predict_split != "test" and not training_args.do_predict:
        raise UsageError(f"--predict_split {data_args.predict_split} is the split --do_predict answers; give it too")
    if training_args.resume_from_checkpoint and not training_args.do_train:
        raise UsageError("--resume_from_checkpoint resumes training; with --do_train false, use --model_name_or_path")
    evaluation_loop_options = {
        "--prediction_loss_only": training_args.prediction_loss_only,
        "--eval_do_concat_batches false": not training_args.eval_do_concat_batches,
        "--batch_eval_metrics": training_args.batch_eval_metrics,
    }
    for option, given in evaluation_loop_options.items():
        if given and (evaluates(data_args, training_args) or training_args.do_predict):
            raise UsageError(
                f"{option} changes what evaluation and prediction hand on, and the VQA accuracy and the predictions "
                "file need every question's answer at once"
            )
    model_path = model_args.model_name_or_path
    if model_path and not Path(model_path).exists() and _names_a_local_path(model_path):
        raise UsageError(f"--model_name_or_path {model_path}: no such folder")
    model_folder = Path(model_path) if model_path and Path(model_path).is_dir() else None
    if training_args.do_train and model_folder and model_folder.resolve() == Path(training_args.output_dir).resolve():
        raise UsageError(
            f"--output_dir {training_args.output_dir} is the folder of --model_name_or_path: training would replace "
            "the model it starts from; give another --output_dir"
        )
    sizes = sorted(set(model_args.config_overrides()) - {"dropout"})
    if sizes and model_args.model_name_or_path:
        raise UsageError(
            f"{', '.join('--' + name for name in sizes)} size a new model; {model_args.model_name_or_path} has its "
            "own (give them without --model_name_or_path)"
        )
    if model_args.glove_path and model_args.model_name_or_path:
        raise UsageError(
            "--glove_path initialises the word embedding of a new model; with --model_name_or_path it would "
            "overwrite the trained one"
        )
    for option in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        # The DataLoader would refuse it only when first built: the evaluation's, after an epoch of training.
        if getattr(training_args, option) < 1:
            raise UsageError(f"--{option} must be at least 1, got {getattr(training_args, option)}")
    if data_args.pad_to_multiple_of is not None and data_args.pad_to_multiple_of < 1:
        raise UsageError(f"--pad_to_multiple_of must be at least 1, got {data_args.pad_to_multiple_of}")
    if training_args.cuda_graphs and data_args.pad_to_multiple_of is None:
        raise UsageError(
            "--cuda_graphs records one graph per padded batch shape; give --pad_to_multiple_of (20 makes 5 shapes)"
        )
    if training_args.cuda_graphs and training_args.device.type != "cuda":
        raise UsageError(f"--cuda_graphs needs a CUDA device; this run is on {training_args.device}")
    reports = [name for name in training_args.report_to if name not in NO_REPORTS]
    try:
        # The Trainer would refuse an unknown name, or one whose package is missing, only once the data and the
        # model are loaded, with a traceback.
        get_reporting_integration_callbacks(reports)
    except ValueError as error:
        raise UsageError(f"--report_to: {error}") from None
    available = get_available_reporting_integrations()
    if missing := [name for name in reports if name not in available and name not in UNLISTED_REPORTS]:
        raise UsageError(
            f"--report_to {' '.join(missing)}: not installed in this environment (transformers finds "
            f"{', '.join(available) or 'none'}); install its package or leave it out"
        )
    launched_alone = "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
    if training_args.world_size == 1 and "ACCELERATE_MIXED_PRECISION" in os.environ and launched_alone:
        # accelerate's launcher sets the rendezvous for several processes or machines, and then, where it does not
        # take the run as multi-GPU, starts one process with no process group (no WORLD_SIZE, which torchrun sets):
        # each machine would train alone.
        raise UsageError(
            "MASTER_ADDR is set but WORLD_SIZE is not: `accelerate launch` was given several processes or machines "
            "and started this one alone (give it --multi_gpu, in place of --cpu: it also starts processes on CPUs, "
            "which talk through gloo), or MASTER_ADDR comes from the shell (unset it for a run of one process)"
        )
    accelerator = training_args.accelerator_config
    if data_args.pack_regions and (accelerator.split_batches or accelerator.dispatch_batches):
        raise UsageError(
            "--pack_regions does not work with split_batches or dispatch_batches in --accelerator_config: the "
            "packed regions of a batch cannot be cut between processes by sample"
        )


def check_dispatched_batches(data_args: DataArguments, training_args: VQATrainingArguments):
    """Refuses dispatch_batches without split_batches on several processes where batches can be padded to other
    lengths: accelerate joins one batch of each process into one. Called once the run's cuts are known."""
    accelerator = training_args.accelerator_config
    if not accelerator.dispatch_batches or accelerator.split_batches or training_args.world_size == 1:
        return
    longest = max(data_args.max_question_length, data_args.max_regions)
    # A multiple at least as long as the longest question and image pads every batch to those.
    if data_args.pad_to_multiple_of is None or data_args.pad_to_multiple_of < longest:
        raise UsageError(
            "dispatch_batches in --accelerator_config joins one batch of each process into one, which fails at "
            "the first batches padded to other lengths; add split_batches: true (with it, "
            "--per_device_train_batch_size is the batch of all the processes together, cut between them), or give "
            f"--pad_to_multiple_of {longest}, which pads every batch to one shape (this run cuts questions to "
            f"{data_args.max_question_length} words and images to {data_args.max_regions} regions)"
        )


def fill_in_lengths(model_args: ModelArguments, data_args: DataArguments):
    """The question and region cuts not given, when a model is: those it was trained with (its config records them),
    so that it is evaluated or trained on as it answers elsewhere. Without a model, the cuts left unset are those
    the data was prepared with."""
    if not model_args.model_name_or_path:
        return
    try:
        config = RWSANConfig.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as error:
        # A mistyped folder reads as a hub repository: say both.
        where = "" if Path(model_args.model_name_or_path).exists() else "no such folder, and as a hub repository: "
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: {where}{error}") from None
    if data_args.max_question_length is None:
        data_args.max_question_length = config.max_question_length
    if data_args.max_regions is None:
        data_args.max_regions = config.max_regions


def checkpoint_to_resume(training_args: VQATrainingArguments) -> str | None:
    """The checkpoint --resume_from_checkpoint names ("last": the newest in --output_dir), refused unless saved
    whole, or None."""
    resume = training_args.resume_from_checkpoint
    if not resume:
        return None
    checkpoint = resume
    if resume == "last":
        output_dir = Path(training_args.output_dir)
        checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if checkpoint is None:
            raise UsageError(f"--resume_from_checkpoint last: no checkpoint in {training_args.output_dir}")
    if not Path(checkpoint).is_dir():
        raise UsageError(
            f"--resume_from_checkpoint {resume}: no such folder"
            if not Path(checkpoint).exists()
            else f"--resume_from_checkpoint {resume}: a file, not a checkpoint's folder"
        )
    if not (Path(checkpoint) / TRAINER_STATE_NAME).is_file():
        raise UsageError(
            f"--resume_from_checkpoint {resume}: {checkpoint} is no checkpoint saved whole (it has no "
            f"{TRAINER_STATE_NAME}, which the Trainer writes after the weights and the optimizer's state; a run "
            "stopped while saving leaves such a folder: delete it, and `last` takes the checkpoint before it)"
        )
    # As --save_on_each_node left checkpoints on all machines but the first before VQATrainer saved there. (The
    # weights may be elsewhere: DeepSpeed's ZeRO-3 keeps them in its own folder.)
    if not (Path(checkpoint) / CONFIG_NAME).is_file():
        raise UsageError(
            f"--resume_from_checkpoint {resume}: {checkpoint} holds the Trainer's state but not the model's "
            f"{CONFIG_NAME}: copy the checkpoint of the same step that the job's first machine saved"
        )
    return checkpoint


# Entries of a saved config that name the code and the saving, not the model its weights are.
SAVE_RECORD_KEYS = ("transformers_version", "_name_or_path", "architectures", "auto_map", "custom_pipelines", "dtype")


def check_resumed_model(model: RWSANForVQA, checkpoint: str) -> None:
    """Refuses to resume `checkpoint` into a model other than the one it saved: its weights would not fit (another
    size), or would fit a model that computes otherwise (another number of block repeats, other answers)."""
    # Through the config class: a saved config leaves out what equals the defaults.
    saved_config = type(model.config).from_json_file(str(Path(checkpoint) / CONFIG_NAME))
    saved, built = (json.loads(config.to_json_string(use_diff=False)) for config in (saved_config, model.config))
    differing = [
        key
        for key in sorted(saved.keys() | built.keys())
        if key not in SAVE_RECORD_KEYS and saved.get(key) != built.get(key)
    ]
    if differing:
        # The answers are listed by name, thousands of them: said as a count and the first that differs.
        answers = "id2label" in differing and next(
            answer
            for answer in sorted(saved["id2label"].keys() | built["id2label"].keys(), key=int)
            if saved["id2label"].get(answer) != built["id2label"].get(answer)
        )

        def shown(config: dict) -> str:
            return ", ".join(
                f"{len(config['id2label'])} answers, answer {answers} {config['id2label'].get(answers)!r}"
                if key == "id2label"
                else f"{key}={config.get(key)!r}"
                for key in differing
                if key != "label2id"
            )

        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} saved a model with {shown(saved)}, but this run builds one with "
            f"{shown(built)}: resume with the model options (and data) the run was started with"
        )


def outputs_to_replace(
    model_args: ModelArguments, training_args: VQATrainingArguments, resumed_checkpoint: str | None
) -> list[Path]:
    """What a training run deletes from its output folder with --overwrite_output_dir: an earlier run's prediction
    and evaluation files, which the model it saves would not give (and --push_to_hub would upload with it), and, but
    in a resumed run, the earlier run's checkpoints. Without the option, those refuse the run, and so do files it
    would write over (`REPLACED_FILES`: another run's model, or a user's own README.md). The option is refused where
    the model the run starts from lies among the checkpoints it deletes; a resumed run is refused where the folder
    holds checkpoints of another run than the one resumed, and writes over the files of `REPLACED_FILES` untold
    only in its checkpoint's own folder."""
    if not training_args.do_train:
        return []
    output_dir = Path(training_args.output_dir)
    earlier_outputs = earlier_run_outputs(output_dir)
    earlier_checkpoints = [path.name for path in earlier_outputs if path.is_dir()]
    earlier_results = [path for path in earlier_outputs if path.is_file()]
    overwrite = training_args.overwrite_output_dir

    def refuse_earlier_results():
        if earlier_results:
            raise UsageError(
                f"--output_dir {training_args.output_dir} holds {', '.join(path.name for path in earlier_results)} "
                "of an earlier model, which the model this run saves would not give (and --push_to_hub would upload "
                "them with it): give --overwrite_output_dir to delete them, or move them away"
            )

    def refuse_written_over():
        written_over = [name for name in REPLACED_FILES if (output_dir / name).exists()]
        if written_over:
            raise UsageError(
                f"--output_dir {training_args.output_dir} holds {', '.join(written_over)}, which this run would write "
                "over (an earlier run's model, or files of yours): give --overwrite_output_dir to replace them, or "
                "choose another --output_dir"
            )

    if resumed_checkpoint is not None:
        # In its checkpoint's own folder, a resumed run replaces only what the run itself saved (a finished run
        # trained further, say); elsewhere, the folder's model is another run's.
        own_folder = Path(resumed_checkpoint).resolve().parent == output_dir.resolve()
        if earlier_checkpoints and not own_folder:
            raise UsageError(
                f"--output_dir {training_args.output_dir} holds checkpoints ({', '.join(earlier_checkpoints)}), and "
                f"--resume_from_checkpoint {resumed_checkpoint} is not among them: the resumed run's checkpoints "
                "would mix with theirs, which --save_total_limit could delete or overwrite. Resume into the "
                "checkpoint's own folder (--resume_from_checkpoint last there), or into an --output_dir without "
                "checkpoints"
            )
        if overwrite:
            return earlier_results
        if not own_folder:
            refuse_written_over()
        refuse_earlier_results()
        return []
    if overwrite:
        if model_args.model_name_or_path and Path(model_args.model_name_or_path).exists():
            model_folder = Path(model_args.model_name_or_path).resolve()
            for path in earlier_outputs:
                if model_folder.is_relative_to(path.resolve()):
                    raise UsageError(
                        f"--model_name_or_path {model_args.model_name_or_path} is {path.name} of --output_dir, which "
                        "--overwrite_output_dir deletes: give another --output_dir"
                    )
        return earlier_outputs
    if earlier_checkpoints:
        raise UsageError(
            f"--output_dir {training_args.output_dir} holds checkpoints of an earlier run "
            f"({', '.join(earlier_checkpoints)}): a new run's would mix with them, and --resume_from_checkpoint "
            "last could take theirs. Resume that run with --resume_from_checkpoint last, start afresh with "
            "--overwrite_output_dir (which deletes them), or choose another --output_dir"
        )
    refuse_written_over()
    refuse_earlier_results()
    return []


def final_evaluation(trainer: VQATrainer) -> dict[str, float]:
    """The evaluation of the model the run ends with: the Trainer's own where it evaluated these weights at the
    last step (at each epoch's end, by default), else a new one (also where the best checkpoint is loaded at the
    end): a second pass over VQA-v2 val would take as long as the first."""
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_accuracy" in entry), None)
    if last is not None and last["step"] == state.global_step and not trainer.args.load_best_model_at_end:
        return {key: value for key, value in last.items() if key != "step"}
    return trainer.evaluate()


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args, toy = parse_arguments(argv)
    check_arguments(model_args, data_args, training_args)
    # VQATrainingArguments sees only options given at other values than their defaults.
    if conflict := schedule_options_conflict(training_args.paper_schedule, options_given(argv)):
        raise UsageError(conflict)
    resumed_checkpoint = checkpoint_to_resume(training_args)
    earlier_outputs = outputs_to_replace(model_args, training_args, resumed_checkpoint)
    fill_in_lengths(model_args, data_args)
    # Only once the arguments hold together: a run refused above trains nothing.
    if not (toy or model_args.model_name_or_path or model_args.glove_path) and training_args.process_index == 0:
        print(
            "The word embedding starts random: the paper starts it from GloVe (--glove_path glove.840B.300d.txt)",
            file=sys.stderr,
        )
    # --log_level reaches this package's messages as the Trainer makes it reach transformers' (at info: each CUDA
    # graph recorded, and how long it took); they go to standard error as transformers' do.
    logging.basicConfig(format="[%(name)s] %(message)s")
    logging.getLogger("rwsan").setLevel(training_args.get_process_log_level())
    set_seed(training_args.seed)
    # Adam's moments of rarely-used embedding rows decay into subnormal floats, which make CPU arithmetic up to a
    # hundred times slower; flushing them to zero changes no result that matters (GPUs flush them anyway).
    torch.set_flush_denormal(True)

    if toy:
        # The job's first process makes the set, then each machine's first (where machines have disks of their
        # own), then the others read it: each machine's first at once raced to write the set on a shared disk.
        with (
            training_args.main_process_first(desc="toy VQA set", local=False),
            training_args.main_process_first(desc="toy VQA set"),
        ):
            try:
                data_args.dataset_dir = str(
                    prepare_toy_dataset(data_args.toy_num_images, data_args.toy_questions_per_image, data_args.toy_seed)
                )
            except ValueError as error:
                raise UsageError(
                    f"the toy set (--toy_num_images, --toy_questions_per_image, --toy_seed): {error}"
                ) from None
    try:
        train_dataset, eval_dataset, predict_dataset = load_splits(data_args, training_args)
        reference = train_dataset or eval_dataset or predict_dataset
        # The cuts this run makes (the data may be prepared with longer questions), which the saved processor and
        # the config of a model trained here record.
        data_args.max_question_length = reference.max_question_length
        data_args.max_regions = reference.max_regions
        processor = reference.processor
        processor.max_question_length = data_args.max_question_length
        processor.max_regions = data_args.max_regions
        check_dispatched_batches(data_args, training_args)
        if eval_dataset is not None:
            check_metric_for_best_model(training_args, vqa_metric_names(eval_dataset))
        model = build_model(model_args, processor, reference.feature_size)
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from error
    if training_args.do_train:
        model.config.max_question_length = processor.max_question_length
        model.config.max_regions = processor.max_regions
    if resumed_checkpoint is not None:
        check_resumed_model(model, resumed_checkpoint)
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    if training_args.dataloader_drop_last and (eval_dataset is not None or predict_dataset is not None):
        raise UsageError(DROPPED_QUESTIONS)

    collator = VQACollator(
        model.config.num_labels,
        max_regions=data_args.max_regions,
        max_question_length=data_args.max_question_length,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
        pack_regions=data_args.pack_regions,
    )
    try:
        trainer = VQATrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=processor,
            compute_metrics=vqa_metrics(eval_dataset, model.config.id2label) if eval_dataset is not None else None,
            preprocess_logits_for_metrics=answer_indices,
            callbacks=[StopOnNonFiniteLoss(), PrintEpochAccuracy(data_args.eval_split)],
        )
    except ValueError as error:  # options that fit neither the data nor the model, found by VQATrainer
        raise UsageError(str(error)) from None

    try:
        output_dir = Path(training_args.output_dir)
        metrics = {}
        if training_args.do_train:
            trainer.add_callback(DeleteEarlierOutputs(earlier_outputs, training_args.output_dir))
            try:
                train_result = trainer.train(resume_from_checkpoint=resumed_checkpoint)
            except ResumeError as error:
                raise UsageError(str(error)) from None
            metrics.update(train_result.metrics)
            if training_args.world_size > 1:
                print(
                    f"rank {training_args.process_index} of {training_args.world_size}: weights sha256 "
                    f"{weights_fingerprint(trainer.accelerator.unwrap_model(trainer.model))}"
                )
            # With the pipeline code and `custom_pipelines`: the folder answers questions as a hub repository would.
            trainer.save_model()
            trainer.save_state()
        if eval_dataset is not None:
            metrics.update(final_evaluation(trainer))
        if trainer.is_world_process_zero() and not training_args.do_train and eval_dataset is not None:
            # Beside the model's own metrics.json (the folder may be the model's), which a run that trains nothing
            # keeps.
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / f"evaluation_{data_args.eval_split}.json"
            path.write_text(json.dumps(metrics, indent=2) + "\n")
            print(f"Wrote {path}")
        if trainer.is_world_process_zero() and training_args.do_train:
            if toy and eval_dataset is not None:
                metrics.update(
                    {f"baseline_{name}": value for name, value in baselines(train_dataset, eval_dataset).items()}
                )
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            plot_training_history(trainer.state.log_history, output_dir / "training_curves.png", data_args.eval_split)
            provenance = f"trained with `train_vqa.py` on `{data_args.train_split}` of `{data_args.dataset_dir}`."
            # The hub repository where --push_to_hub uploads (the Trainer names it); else the card names the folder.
            model_id = getattr(trainer, "hub_model_id", None)
            # The toy set is no hub dataset: the card names none.
            datasets = () if toy else ("vqa_v2",)
            evaluated_split = data_args.eval_split if eval_dataset is not None else None
            write_model_card(
                output_dir, model.config, provenance, metrics, model_id, datasets=datasets, eval_split=evaluated_split
            )
            # Without --output_dir the Trainer's default folder takes the run, which nothing else names.
            print(f"Saved the model, its processor, metrics.json and training_curves.png in {output_dir}")
        if training_args.push_to_hub:  # with --do_train (check_arguments refuses it without)
            # Before the prediction files are written: the upload takes the whole output folder.
            trainer.push_to_hub()

        if predict_dataset is not None:
            trainer.compute_metrics = None  # test splits have no answers to score against
            if data_args.save_logits:
                trainer.preprocess_logits_for_metrics = answers_and_float16_logits
            prediction = trainer.predict(predict_dataset)
            if trainer.is_world_process_zero():
                indices, scores = prediction.predictions if data_args.save_logits else (prediction.predictions, None)
                path = output_dir / f"predictions_{data_args.predict_split}.json"
                write_predictions(prediction.label_ids, indices, model.config.id2label, path)
                if data_args.save_logits:
                    np.save(output_dir / f"logits_{data_args.predict_split}.npy", scores.astype(np.float16))
                    np.save(output_dir / f"question_ids_{data_args.predict_split}.npy", prediction.label_ids)
                print(f"Wrote {path} ({len(indices)} questions)")
                if warning := questions_left_out_warning(data_args.dataset_dir, data_args.predict_split):
                    print(f"warning: {warning}", file=sys.stderr)

        if trainer.is_world_process_zero() and eval_dataset is not None:
            print(f"Final {data_args.eval_split} VQA accuracy: {metrics['eval_accuracy']:.2f}")
            if "baseline_question_only" in metrics:
                print(
                    f"Baselines on the same split: majority answer {metrics['baseline_majority_answer']:.2f}, "
                    f"question only {metrics['baseline_question_only']:.2f}"
                )
                print("Sample answers:")
                show_sample_answers(model, eval_dataset, collator)
        return metrics
    finally:
        # Also when the run fails: persistent workers left to the garbage collector are killed after 5 s each.
        trainer.stop_dataloader_workers()


if __name__ == "__main__":
    try:
        main()
    except (UsageError, FloatingPointError, HubRepositoryError) as error:
        sys.exit(f"error: {error}")
    finally:
        # Each process of a multi-process run tears its process group down while the interpreter is whole: left to
        # the interpreter's exit, gloo's worker threads abort one process now and then ("terminate called without
        # an active exception", pytorch/pytorch#190489), after the run has finished.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
