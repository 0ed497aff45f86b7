"""The paper's training recipe on the transformers `Trainer`: arguments, learning-rate schedule, evaluation hooks.

The original trains with Adam (0.9, 0.98, eps 1e-9), base rate 1e-4, no weight decay and no gradient clipping; the
rate is 1/4, 2/4, 3/4 of the base during the first three epochs, then the base, multiplied by 0.2 after 12 and again
after 14 completed epochs, for 16 epochs. Everything else (mixed precision, accumulation, several processes or
machines, checkpoints) is the `Trainer`'s, through `accelerate`.
"""

import functools
import math
import os
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from .evaluation import compute_vqa_accuracy
from .modeling_rwsan import RWSANForVQAOutput


@dataclass
class VQATrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults, plus its learning-rate schedule and bucketing."""

    do_train: bool = field(default=True, metadata={"help": "Train (--do_train false to only evaluate or predict)."})
    output_dir: str | None = field(default="runs/toy", metadata={"help": "Where the model and checkpoints go."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per device (paper: 64)."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    num_train_epochs: float = field(default=16, metadata={"help": "Training epochs (paper: 16)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Base learning rate (paper: 1e-4)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (paper: 0.9)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2 (paper: 0.98)."})
    adam_epsilon: float = field(default=1e-9, metadata={"help": "Adam epsilon (paper: 1e-9)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (paper: none, so AdamW is Adam)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm; 0 = none, as the paper."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on --eval_split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    logging_strategy: str = field(default="steps", metadata={"help": "When to log the training loss."})
    logging_steps: float = field(default=50, metadata={"help": "Log the training loss every N optimizer steps."})
    # The Trainer's NaN filter hides a diverging loss (and syncs with the device every step); a NaN must stop the run.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Hide NaN/inf losses from the logs."})
    # Batches carry `question_id` for the metric and the prediction file; `VQATrainer` takes it out itself.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Drop batch keys the model does not take."})
    warmup_epochs: int = field(
        default=3, metadata={"help": "Epochs at 1/(n+1), 2/(n+1), ... of the base rate (paper: 3)."}
    )
    lr_decay_epochs: list[int] = field(
        default_factory=lambda: [12, 14],
        metadata={"help": "Completed epochs after which the rate is multiplied by --lr_decay_rate (paper: 12 14)."},
    )
    lr_decay_rate: float = field(default=0.2, metadata={"help": "Multiplier at each decay epoch (paper: 0.2)."})
    group_by_regions: bool = field(
        default=False, metadata={"help": "Batch questions with similar region counts, so padding costs less."}
    )
    compile_blocks: bool = field(
        default=False,
        metadata={
            "help": "Compile only the two weight-shared attention blocks (torch.compile, dynamic shapes): less "
            "compilation than --torch_compile; not together with it."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.compile_blocks and self.torch_compile:
            raise ValueError(
                "--compile_blocks and --torch_compile (or --torch_compile_mode/--torch_compile_backend) both compile "
                "the model; give one of them"
            )


def paper_lr_multiplier(
    step: int, steps_per_epoch: int, warmup_epochs: int, lr_decay_epochs: tuple[int, ...], lr_decay_rate: float
) -> float:
    """Multiplier of the base rate for the optimizer step `step` (0-based), as the original's `WarmupOptimizer`."""
    epoch = step // steps_per_epoch
    warmup = (epoch + 1) / (warmup_epochs + 1) if epoch < warmup_epochs else 1.0
    return warmup * lr_decay_rate ** sum(epoch >= decay_epoch for decay_epoch in lr_decay_epochs)


def paper_lr_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, args: VQATrainingArguments) -> LambdaLR:
    """The original schedule as a `LambdaLR` over optimizer steps, so accumulation, several processes and resumed
    runs (the Trainer restores `last_epoch`) all see the rate of the step they are at."""
    multiplier = functools.partial(
        paper_lr_multiplier,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=args.warmup_epochs,
        lr_decay_epochs=tuple(args.lr_decay_epochs),
        lr_decay_rate=args.lr_decay_rate,
    )
    return LambdaLR(optimizer, multiplier)


def answer_indices(logits: torch.Tensor, labels=None) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the best answer only, so evaluation memory does not grow with
    questions x answers."""
    return logits.argmax(dim=-1)


_OUTPUTS_BESIDE_LOGITS = [output.name for output in fields(RWSANForVQAOutput) if output.name not in ("loss", "logits")]


def float16_logits(logits: torch.Tensor, labels=None) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for keeping the scores (for ensembling): half the memory of float32."""
    return logits.half()


class RegionGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` over region counts whose order depends only on the seed and the epoch.

    The Trainer calls `set_epoch` before every epoch, so a run resumed from a checkpoint draws the same batches as
    an uninterrupted one (a generator seeded once would continue from wherever the killed process left it).
    """

    def __init__(self, batch_size: int, region_counts: list[int], seed: int):
        super().__init__(batch_size, lengths=region_counts)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class VQATrainer(Trainer):
    """The `Trainer` with the paper's schedule, region bucketing and question-id-keyed evaluation.

    Batches carry `question_id` next to the model inputs. Training drops it; evaluation returns it in place of the
    labels, so the metric looks each prediction up by question (robust to the order several processes gather in)
    and the (batch, answers) soft scores are never gathered.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model_init is None:
            self._compile_blocks_if_asked(self.model)

    def call_model_init(self, trial=None):
        return self._compile_blocks_if_asked(super().call_model_init(trial))

    def _compile_blocks_if_asked(self, model):
        if getattr(self.args, "compile_blocks", False):
            # Dynamic shapes: batches padded to different lengths share one compilation of each block.
            model.compile_blocks(dynamic=True)
        return model

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self.update_steps_per_epoch = values[1]
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = paper_lr_scheduler(optimizer or self.optimizer, self.update_steps_per_epoch, self.args)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.group_by_regions:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RegionGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            region_counts=dataset.num_regions.tolist(),
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key != "question_id"}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        question_ids = inputs.pop("question_id")
        # Only the logits leave the model: hidden states would be gathered over the whole split.
        ignore_keys = _OUTPUTS_BESIDE_LOGITS if ignore_keys is None else ignore_keys
        loss, predictions, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        return loss, predictions, question_ids


def vqa_metrics(dataset, id2label: dict[int, str]):
    """`compute_metrics` for a `VQADataset`: the official VQA accuracy, overall and per answer type, in percent."""
    row_of_question = {int(question_id): row for row, question_id in enumerate(dataset.question_ids)}

    def compute_metrics(prediction) -> dict[str, float]:
        rows = [row_of_question[int(question_id)] for question_id in np.asarray(prediction.label_ids).reshape(-1)]
        answers = [id2label[int(index)] for index in np.asarray(prediction.predictions).reshape(-1)]
        return compute_vqa_accuracy(
            answers, [dataset.answers[row] for row in rows], [dataset.answer_types[row] for row in rows]
        )

    return compute_metrics


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops a diverged run at the first logged NaN/inf loss, naming the step and the last checkpoint before it.

    It reads the loss the Trainer logs anyway, so the training loop gains no per-step device sync.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            last_checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            raise FloatingPointError(
                f"The training loss became {loss} by optimizer step {state.global_step}. The last checkpoint saved "
                f"before it is {last_checkpoint or 'none (no checkpoint was saved yet)'}; resume from it with "
                "--resume_from_checkpoint and a lower --learning_rate, or without --fp16."
            )
