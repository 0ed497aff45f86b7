"""The paper's training recipe on the transformers `Trainer`: arguments, learning-rate schedule, evaluation hooks.

The original trains with Adam (0.9, 0.98, eps 1e-9), base rate 1e-4, no weight decay and no gradient clipping; the
rate is 1/4, 2/4, 3/4 of the base during the first three epochs, then the base, multiplied by 0.2 after 12 and again
after 14 completed epochs, for 16 epochs. Everything else (mixed precision, accumulation, several processes or
machines, checkpoints) is the `Trainer`'s, through `accelerate`. Two speed-ups of its own: `--compile_blocks`
(regional compilation of the weight-shared blocks) and `--cuda_graphs` (`GraphedForwardBackward` for the training
steps, `CUDAGraphedFunction` for the forward passes of evaluation and prediction).
"""

import contextlib
import functools
import itertools
import json
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.data_loader import DataLoaderShard
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SchedulerType, get_last_checkpoint
from transformers.training_args import OptimizerNames
from transformers.utils import is_torch_xla_available, logging

from .data import unpack_image_features
from .evaluation import compute_vqa_accuracy
from .pipeline_rwsan import save_for_pipeline
from .processing_rwsan import RWSANProcessor

logger = logging.get_logger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


@dataclass
class VQATrainingArguments(TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults, plus its learning-rate schedule and bucketing.

    Unlike `TrainingArguments`, pinned batches are copied to a CUDA device without blocking (accelerate's
    `non_blocking`), unless `accelerator_config` names `non_blocking` or is an `AcceleratorConfig`; and
    `load_best_model_at_end` picks the checkpoint of the best VQA accuracy unless `metric_for_best_model` names
    another metric.
    """

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the model, its checkpoints, metrics and predictions are written (unset: the Trainer's "
            "trainer_output; runs/toy for train_vqa.py's toy run)."
        },
    )
    do_train: bool = field(default=True, metadata={"help": "Train (--do_train false to only evaluate or predict)."})
    do_eval: bool | None = field(
        default=None,
        metadata={
            "help": "Evaluate: by default as --eval_strategy says (every epoch); false: never; true with "
            "--eval_strategy no: once, at the end of train_vqa.py's run (a VQATrainer evaluates by --eval_strategy "
            "alone).",
            # As the parser takes a plain bool option: `--do_eval` alone is true.
            "nargs": "?",
            "const": True,
        },
    )
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
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "The metric --load_best_model_at_end picks the checkpoint by; default 'accuracy', the VQA "
            "accuracy on --eval_split (the Trainer's default, 'loss', is not what VQA is scored by)."
        },
    )
    # The Trainer's NaN filter hides a diverging loss (and syncs with the device every step); a NaN must stop the run.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Hide NaN/inf losses from the logs."})
    # Batches carry `question_id` for the metric and the prediction file; `VQATrainer` takes it out itself.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Drop batch keys the model does not take (question_id is kept)."}
    )
    # Every parameter takes part in every step: DDP's search for unused ones would only walk the graph each step.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Let DDP look for parameters without gradients each step (none here)."}
    )
    warmup_epochs: int = field(
        default=3, metadata={"help": "Epochs at 1/(n+1), 2/(n+1), ... of the base rate (paper: 3)."}
    )
    lr_decay_epochs: list[int] = field(
        default_factory=lambda: [12, 14],
        metadata={"help": "Completed epochs after which the rate is multiplied by --lr_decay_rate (paper: 12 14)."},
    )
    lr_decay_rate: float = field(default=0.2, metadata={"help": "Multiplier at each decay epoch (paper: 0.2)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train in an output_dir holding an earlier run's outputs, replacing them: its checkpoints "
            "(their new ones would mix, and --resume_from_checkpoint last could take theirs) and its prediction, "
            "logit and evaluation files are deleted, its model and reports (config.json, weights, README.md, "
            "metrics.json, training_curves.png) written over. Without it such a run is refused. A resumed run "
            "deletes the prediction, logit and evaluation files only."
        },
    )
    paper_schedule: bool = field(
        default=True,
        metadata={
            "help": "The paper's learning rate by epoch (--warmup_epochs, --lr_decay_epochs, --lr_decay_rate); "
            "false: the Trainer's --lr_scheduler_type with --warmup_steps."
        },
    )
    group_by_regions: bool = field(
        default=False, metadata={"help": "Batch questions with similar region counts, so padding costs less."}
    )
    compile_blocks: bool = field(
        default=False,
        metadata={
            "help": "Compile only the two weight-shared attention blocks, the layer norms between their "
            "applications and the attention flattenings (torch.compile, dynamic shapes): less compilation than "
            "--torch_compile; not together with it."
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "Record the forward and backward passes of a training step (and the forward pass of evaluation "
            "and prediction) as a CUDA graph, one per padded batch shape (give --pad_to_multiple_of), and replay it: "
            "one launch a step instead of thousands. One GPU, no --fp16, no accumulation."
        },
    )

    def __post_init__(self):
        copies_left_alone = _names_non_blocking(self.accelerator_config)
        # Without a GPU or other accelerator the run is on the CPU whatever it is told, and the Trainer refuses
        # --bf16 there unless told --use_cpu.
        if not self.use_cpu and not torch.accelerator.is_available() and not is_torch_xla_available():
            self.use_cpu = True
        # The Trainer evaluates by eval_strategy alone, and turns do_eval on from it: false was ignored. False is
        # eval_strategy no here; true stays true (a final evaluation), and unset follows eval_strategy.
        do_eval = self.do_eval
        if do_eval is False:
            if strategy_name(self.eval_strategy) not in (
                "no",
                argument_default("eval_strategy"),
            ):
                raise ValueError(f"--do_eval false and --eval_strategy {self.eval_strategy} disagree: give one of them")
            self.eval_strategy = "no"
        self.do_eval = bool(do_eval)
        # The Trainer would pick the best checkpoint by loss, which VQA is not scored by (and which, on several
        # processes, counts the last batch's repeated questions); --save_strategy best needs a metric.
        picks_best = self.load_best_model_at_end or strategy_name(self.save_strategy) == "best"
        if picks_best and self.metric_for_best_model is None:
            self.metric_for_best_model = "accuracy"
        super().__post_init__()
        if do_eval is None:
            self.do_eval = self.eval_strategy != IntervalStrategy.NO
        # A blocking copy of each batch to the GPU waits for the steps queued before it: the host could not
        # prepare the next step while the GPU runs this one. Copies from pinned memory need not wait. Only on CUDA,
        # where this is measured and tested: copies to MPS without blocking can silently corrupt data
        # (pytorch/pytorch#189690).
        if self.dataloader_pin_memory and self.device.type == "cuda" and not copies_left_alone:
            self.accelerator_config.non_blocking = True
        # Options given at their defaults are not seen here; train_vqa.py sees them on its command line.
        changed = [
            name
            for name in TRAINER_SCHEDULE_OPTIONS + PAPER_SCHEDULE_OPTIONS
            if getattr(self, name) != argument_default(name)
        ]
        if conflict := schedule_options_conflict(self.paper_schedule, changed):
            raise ValueError(conflict)
        if self.lr_scheduler_type == SchedulerType.REDUCE_ON_PLATEAU and self.greater_is_better:
            self._plateau_on_a_rising_metric()
        for strategy, steps in (("save_strategy", "save_steps"), ("eval_strategy", "eval_steps")):
            if getattr(self, steps) != argument_default(steps) and strategy_name(getattr(self, strategy)) != "steps":
                raise ValueError(
                    f"--{steps} {getattr(self, steps):g} counts steps between saves or evaluations, which happen by "
                    f"--{strategy} {strategy_name(getattr(self, strategy))} (train_vqa.py's default: epoch): give "
                    f"--{strategy} steps too"
                )
        if self.length_column_name != argument_default("length_column_name"):
            # The Trainer reads that column only from a `datasets.Dataset`; a VQADataset is measured by its items.
            raise ValueError(
                f"--length_column_name {self.length_column_name} would be ignored: --train_sampling_strategy "
                "group_by_length groups the questions by their length in words; --group_by_regions groups them by "
                "their images' regions"
            )
        if self.label_names is not None and list(self.label_names) != ["labels"]:
            raise ValueError(
                f"--label_names {' '.join(self.label_names)}: the model's only labels are `labels` (the answers' soft "
                "scores); evaluation hands the question ids back in their place, which the VQA accuracy reads"
            )
        if self.dataloader_persistent_workers and self.dataloader_num_workers == 0:
            raise ValueError(
                "--dataloader_persistent_workers keeps the DataLoader's worker processes, and there are none: give "
                "--dataloader_num_workers N too"
            )
        if self.label_smoothing_factor:
            raise ValueError(
                "--label_smoothing_factor smooths class labels; VQA's labels are soft answer scores already, "
                "which the Trainer's label smoother cannot take"
            )
        # `accelerate launch --mixed_precision fp16` (or its config) reaches the Trainer without --fp16.
        fp16 = "--fp16" if self.fp16 else f"fp16 from accelerate ({ACCELERATE_PRECISION})"
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            raise ValueError(
                f"{fp16} runs nothing in half precision on the CPU (accelerate trains in fp32 there); use bf16"
            )
        for name, autocast in (("bf16_full_eval", "--bf16"), ("fp16_full_eval", "--fp16")):
            if getattr(self, name):
                raise ValueError(
                    f"--{name} has the Trainer cast the model's own weights, for good, when it evaluates outside "
                    "training: a training or a save after it would take the rounded weights, while the evaluations "
                    f"during training run uncast; {autocast} evaluates in half precision under autocast"
                )
        if self.group_by_regions and self.train_sampling_strategy != argument_default("train_sampling_strategy"):
            raise ValueError(
                f"--group_by_regions and --train_sampling_strategy {self.train_sampling_strategy} each choose the "
                "order of the training questions; give one of them"
            )
        if self.compile_blocks and self.torch_compile:
            raise ValueError(
                "--compile_blocks and --torch_compile (or --torch_compile_mode/--torch_compile_backend) both compile "
                "the model; give one of them"
            )
        if not self.accelerator_config.even_batches and self.world_size > 1:
            raise ValueError(
                "even_batches false in --accelerator_config gives the processes different numbers of batches: "
                "training would wait forever at the step one of them lacks, and the evaluation's gathers would "
                "mismatch; without it, evaluation and prediction already answer each question once"
            )
        if self.cuda_graphs:
            unsupported = {
                f"{fp16} (its loss scaler reads the gradients on the host; use bf16)": self.mixed_precision == "fp16",
                "--gradient_accumulation_steps above 1": self.gradient_accumulation_steps > 1,
                "--torch_compile (use --compile_blocks)": self.torch_compile,
                "--activation_checkpointing (or --gradient_checkpointing: it reads the random generators while "
                "recording)": self.activation_checkpointing,
                "several processes or GPUs": self.world_size > 1 or self.n_gpu > 1,
            }
            for what, given in unsupported.items():
                if given:
                    raise ValueError(f"--cuda_graphs does not work with {what}")

    def _plateau_on_a_rising_metric(self):
        """`reduce_lr_on_plateau` is stepped with `metric_for_best_model`, and torch's scheduler waits for it to stop
        falling unless told `mode` "max": with the VQA accuracy it would cut the rate while the model improves."""
        kwargs = self.lr_scheduler_kwargs or {}
        mode = kwargs.get("mode", "max")
        if mode != "max":
            raise ValueError(
                f"--lr_scheduler_kwargs mode {mode!r} has reduce_lr_on_plateau cut the rate while "
                f"--metric_for_best_model {self.metric_for_best_model} rises, and it rises as the model improves: "
                'give mode "max", or leave mode out'
            )
        self.lr_scheduler_kwargs = {**kwargs, "mode": "max"}


ACCELERATE_PRECISION = "ACCELERATE_MIXED_PRECISION, which `accelerate launch --mixed_precision` or its config sets"
PAPER_SCHEDULE_OPTIONS = ("warmup_epochs", "lr_decay_epochs", "lr_decay_rate")
# The Trainer's own, which the paper's schedule replaces.
TRAINER_SCHEDULE_OPTIONS = ("lr_scheduler_type", "warmup_steps", "lr_scheduler_kwargs")


def schedule_options_conflict(paper_schedule: bool, given: Collection[str]) -> str | None:
    """Why the schedule options `given` (names) would be ignored by the schedule chosen, or None."""
    if paper_schedule:
        ignored_options = TRAINER_SCHEDULE_OPTIONS
        what_they_shape = (
            "the Trainer's learning-rate schedule, which the paper's replaces; give --paper_schedule false to use them"
        )
    else:
        ignored_options = PAPER_SCHEDULE_OPTIONS
        what_they_shape = (
            "the paper's learning-rate schedule, which --paper_schedule false replaces with the Trainer's "
            "(--lr_scheduler_type, --warmup_steps)"
        )
    ignored = [f"--{name}" for name in ignored_options if name in given]
    return f"{', '.join(ignored)} {'shape' if len(ignored) > 1 else 'shapes'} {what_they_shape}" if ignored else None


def strategy_name(strategy) -> str:
    """An `--*_strategy` value by its name, given as a string or, once the arguments are read, as an enum."""
    return str(getattr(strategy, "value", strategy))


def argument_default(name: str):
    """The default of a `VQATrainingArguments` field."""
    default = VQATrainingArguments.__dataclass_fields__[name]
    return default.default_factory() if default.default_factory is not MISSING else default.default


def _names_non_blocking(accelerator_config) -> bool:
    """Whether an `--accelerator_config` as given (None, a dict, a JSON text or file, an `AcceleratorConfig`) says
    whether batches are copied to the device without blocking."""
    if accelerator_config is None:
        return False
    if isinstance(accelerator_config, (str, os.PathLike)):
        text = str(accelerator_config)
        if not text.startswith("{"):
            text = Path(accelerator_config).read_text()
        accelerator_config = json.loads(text)
    # An `AcceleratorConfig` built by the caller is taken as it is.
    return not isinstance(accelerator_config, dict) or "non_blocking" in accelerator_config


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


def paper_schedule_unreached(num_training_steps: int, steps_per_epoch: int, args: VQATrainingArguments) -> str | None:
    """What of the paper's schedule a run of `num_training_steps` optimizer steps ends before (a fine-tuning run of
    two epochs never leaves the warm-up at its defaults, say), or None: nothing fails, the run just trains at
    other rates than its options suggest."""
    last_epoch = (num_training_steps - 1) // steps_per_epoch  # 0-based, as `paper_lr_multiplier` counts
    unreached = []
    if last_epoch < args.warmup_epochs:
        unreached.append(f"reaches --learning_rate (its warm-up takes {args.warmup_epochs} epochs)")
    decays = [str(epoch) for epoch in sorted(args.lr_decay_epochs) if last_epoch < epoch]
    if decays:
        unreached.append(f"decays the rate after epoch{'s' if len(decays) > 1 else ''} {', '.join(decays)}")
    if not unreached:
        return None
    return (
        f"This run's {num_training_steps} optimizer steps ({num_training_steps / steps_per_epoch:.3g} epochs of "
        f"{steps_per_epoch}) end before the paper's schedule {' or '.join(unreached)}; --warmup_epochs and "
        "--lr_decay_epochs fit it to a shorter run"
    )


def answer_indices(logits: torch.Tensor, labels=None) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the best answer only, so evaluation memory does not grow with
    questions x answers."""
    return logits.argmax(dim=-1)


def answers_and_float16_logits(logits: torch.Tensor, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics` for keeping the scores (for ensembling) in half the memory of float32, with
    the best answers taken from the logits as they came: float16 rounds near-ties to equal scores, whose argmax
    would then differ from `answer_indices`'."""
    return answer_indices(logits), logits.half()


class RegionGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` over region counts whose order depends only on the seed and the epoch.

    `VQATrainer` sets the epoch before every epoch, so a run resumed from a checkpoint draws the same batches as an
    uninterrupted one (a generator seeded once would continue from wherever the killed process left it).
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


class SideStreamBatchCopy:
    """Copies pinned batches to a CUDA device on a stream of their own, so that a batch crosses while the steps
    queued before it run. accelerate copies each batch on the compute stream, where the copy waits for the step
    before it to finish and the next step waits for the copy (0.21 ms of a 10.0 ms step on an H100, run E).

    Calling it with a batch on the host returns the batch on `device`, safe to use on the current stream: that
    stream waits for the copy (without the host waiting), and the copies' memory is not reused before the current
    stream is done with it. Tensors already on a device are left as they are."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        current = torch.cuda.current_stream(self.device)
        on_host = {
            name: value for name, value in batch.items() if torch.is_tensor(value) and value.device.type == "cpu"
        }
        with torch.cuda.stream(self.stream):
            copied = {name: tensor.to(self.device, non_blocking=True) for name, tensor in on_host.items()}
        current.wait_stream(self.stream)
        for tensor in copied.values():
            tensor.record_stream(current)
        return batch | copied


def synchronize(device: torch.device):
    """Waits for the device's queued work (timings end here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CUDAGraphRecorder:
    """Where a `CUDAGraphedFunction` records: one side stream and one memory pool for all its graphs on a CUDA
    device. Sharing the pool is safe because replays never overlap and each graph's outputs are used before the
    next replay of any graph."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.pool = None

    def check(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the batch on a CUDA device, got {device}")

    @contextlib.contextmanager
    def side_stream(self, device: torch.device):
        """Runs the block on the side stream, ordered after and before the current stream's work."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def capture(self, function: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Records what `function` launches as a CUDA graph; returns (replay, what `function` returned)."""
        graph = torch.cuda.CUDAGraph()
        # The side stream is the warm-up's (its cuBLAS workspace is set up); "thread_local": DataLoader pin-memory
        # threads may query CUDA events while this thread captures. The outer stream context restores the current
        # stream even when a failed capture makes `torch.cuda.graph` raise before restoring it.
        with (
            torch.cuda.stream(self.stream),
            torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"),
        ):
            outputs = function()
        return graph.replay, outputs


class CUDAGraphedFunction:
    """`function(batch)` recorded as one CUDA graph per shape of the batch and replayed.

    Calling this object with a batch (a dict of tensors) copies the batch into the inputs of its shape's graph
    (recorded on first sight, after `warmup_passes` eager calls on a side stream, as capture requires), replays the
    graph and returns what `function` returned when recorded: tensors the graph writes again at each replay, valid
    until the next call. The warm-up calls restore the random generators, so that the recorded call draws what an
    eager call would. `recordings` counts the graphs recorded so far (those recorded again too) and
    `recording_seconds` the wall time they took, the device synchronised before and after each: a one-off cost per
    shape, which a steady-state rate leaves out.

    A graph reads the memory its tensors had when it was recorded. `module` is the module whose parameters and
    buffers `function` reads: when any of them has moved since (`model.to(...)`, `load_state_dict(...,
    assign=True)`, a new `.data` or parameter) or changed `requires_grad`, or a submodule was added or replaced,
    every graph is recorded again, with a warning, rather than replayed over memory the module no longer uses.
    """

    def __init__(
        self,
        function: Callable[[dict[str, torch.Tensor]], Any],
        module: torch.nn.Module,
        warmup_passes: int = 3,
    ):
        self.function = function
        self.module = module
        self.warmup_passes = warmup_passes
        self.recorder = CUDAGraphRecorder()
        # (replay, input tensors, outputs) by the names, shapes and dtypes of the batch's tensors
        self.graphs: dict[tuple, tuple[Callable[[], None], dict[str, torch.Tensor], Any]] = {}
        self.recordings = 0
        self.recording_seconds = 0.0
        self._note_module()

    def _note_module(self):
        """Takes note of the module as it is now: its modules, their placement, and what `module_changed` notes."""
        self.submodules = list(self.module.modules())
        self.module_placement = self._placement()
        self.module_changed()

    def _placement(self) -> list:
        """What the graphs read of the module, cheap enough to check before every replay (walking the module tree
        with `parameters()` took longer than the rest of a call's host work): for each of `submodules`, its
        children, and each parameter's and buffer's identity, memory and requires_grad. A module added or replaced
        anywhere in the tree changes its parent's children, so the list, made once, is made again then."""
        placement = []
        for module in self.submodules:
            placement.extend(map(id, module._modules.values()))
            for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
                if tensor is not None:
                    placement.append((id(tensor), tensor.data_ptr(), tensor.requires_grad))
        return placement

    def __call__(self, batch: dict[str, torch.Tensor]) -> Any:
        if self._placement() != self.module_placement:
            if self.graphs:
                logger.warning(
                    "The parameters or buffers of the %s moved in memory (or changed requires_grad, or a submodule "
                    "was added or replaced) after its CUDA graphs were recorded; recording its graphs again",
                    type(self.module).__name__,
                )
            self.graphs.clear()
            self._note_module()
        # By name: a batch whose dict lists the same tensors in another order replays the same graph.
        key = tuple(sorted((name, tuple(tensor.shape), tensor.dtype) for name, tensor in batch.items()))
        if key not in self.graphs:
            self.graphs[key] = self.record(batch)
        replay, inputs, outputs = self.graphs[key]
        for name, tensor in batch.items():
            inputs[name].copy_(tensor, non_blocking=True)
        replay()
        return outputs

    def record(self, batch: dict[str, torch.Tensor]):
        """Records `function` on tensors shaped like `batch`; returns (replay, its inputs, its outputs)."""
        device = next(iter(batch.values())).device
        self.recorder.check(device)
        # Synchronised, so that the time is the recording's alone, not that of the steps queued before it.
        synchronize(device)
        start = time.perf_counter()
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with self.recorder.side_stream(device):
                for _ in range(self.warmup_passes):
                    self.function(inputs)
                    self.after_pass()
        replay, outputs = self.recorder.capture(functools.partial(self.recorded_pass, inputs))
        self.after_pass()
        synchronize(device)
        seconds = time.perf_counter() - start
        self.recordings += 1
        self.recording_seconds += seconds
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in batch.items())
        logger.info("Recorded a CUDA graph of %s for %s in %.2f s", type(self.module).__name__, shapes, seconds)
        return replay, inputs, outputs

    def recorded_pass(self, inputs: dict[str, torch.Tensor]) -> Any:
        """What the graph records: `function(inputs)`."""
        return self.function(inputs)

    def after_pass(self):
        """Undoes what an eager call leaves behind and a replay would not: nothing, for a pure function."""

    def module_changed(self):
        """Takes note of the module's new parameters before recording again: nothing to note here."""


class GraphedForwardBackward(CUDAGraphedFunction):
    """The forward and backward passes of a training step, recorded as one CUDA graph per shape of the batch and
    replayed.

    `forward_backward(batch)` runs both passes and returns the detached loss. Calling this object with a batch
    replays its shape's graph (see [`CUDAGraphedFunction`]) and points each parameter's `.grad` at the gradient the
    graph writes; the optimizer then steps eagerly as usual. The gradients must be None on every call (the
    `Trainer` clears them after each optimizer step): a recorded backward writes gradients rather than adding to
    them. The warm-up passes change no weight and, as the random generators are restored after them, no dropout
    mask either. The loss and gradients are valid until the next call, which overwrites them. `module` is the model
    trained: the gradients go to its parameters that require them.

    The graph also takes the gradients' total norm (2-norm over all of them, `gradient_norm` after each call, as
    `torch.nn.utils.clip_grad_norm_` returns it) and, with `max_grad_norm` above 0, clips them to it: done eagerly,
    that is a dozen launches and a pass over every gradient each step.
    """

    def __init__(self, *args, max_grad_norm: float = 0.0, **kwargs):
        self.max_grad_norm = max_grad_norm
        self.gradient_norm: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

    def module_changed(self):
        self.parameters = [parameter for parameter in self.module.parameters() if parameter.requires_grad]

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if any(parameter.grad is not None for parameter in self.parameters):
            raise RuntimeError(
                "CUDA-graphed training steps need the gradients cleared (None) before each step; they write the "
                "gradients rather than add to them, so gradient accumulation is not possible"
            )
        loss, self.gradient_norm, gradients = super().__call__(batch)
        for parameter, gradient in zip(self.parameters, gradients, strict=True):
            parameter.grad = gradient
        return loss

    def recorded_pass(
        self, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        loss = self.function(inputs)
        gradients = [parameter.grad for parameter in self.parameters]
        norm = torch.nn.utils.get_total_norm([gradient for gradient in gradients if gradient is not None])
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.parameters, self.max_grad_norm, norm)
        return loss, norm, gradients

    def after_pass(self):
        for parameter in self.parameters:
            parameter.grad = None


class SamplerEpoch(TrainerCallback):
    """Sets the epoch of `VQATrainer`'s region-grouped sampler before each epoch. The Trainer's own `set_epoch` does
    not reach it where a resumed epoch skips its first batches on several processes (accelerate then wraps the
    sampler twice): the resumed epoch would take epoch 0's order, training some questions twice and others never."""

    def __init__(self, trainer: "VQATrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.region_sampler is not None:
            # As the Trainer counts the epochs a resumed run has trained.
            self.trainer.region_sampler.set_epoch(state.global_step // self.trainer.update_steps_per_epoch)


class SeedEachProcess(TrainerCallback):
    """Seeds the random generators of process `i` of a run with `seed + i` as training begins. The Trainer seeds
    every process alike, so that on several processes the same row of every batch drew the same dropout masks on
    each (transformers#31412), as if the global batch were a process's batch repeated. The order of the training
    questions does not read these generators: `VQATrainer` gives its samplers the data seed."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.process_index > 0:
            set_seed(args.seed + args.process_index)


class ResumeError(ValueError):
    """A checkpoint that this run cannot resume from as it was started."""


class HubRepositoryError(RuntimeError):
    """The hub repository that `push_to_hub` uploads to could not be made or reached."""


# Options a resumed run takes from the checkpoint's optimizer state (its parameter groups), not from its arguments,
# and those that make the optimizer whose state it loads.
OPTIMIZER_STATE_OPTIONS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim",
                           "optim_args")  # fmt: skip


# Optimizers that keep another's state: torch's AdamW fused or not (transformers' default became the fused one with
# torch 2.8, so a run may resume on either).
SAME_OPTIMIZER_STATE = {"adamw_torch_fused": "adamw_torch"}


def _optimizer_options(args: TrainingArguments) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in OPTIMIZER_STATE_OPTIONS}
    # The Trainer turns `optim` into an enum; the record keeps its name.
    options["optim"] = OptimizerNames(args.optim).value
    return options


def _same_optimizer_option(name: str, value, saved) -> bool:
    if name == "optim":
        return SAME_OPTIMIZER_STATE.get(value, value) == SAME_OPTIMIZER_STATE.get(saved, saved)
    return value == saved


class ResumeRecord(TrainerCallback, ExportableState):
    """Keeps in the run's checkpoints (`trainer_state.json`) what a resumed run must share with it, for `VQATrainer`
    to refuse one that does not:
    - the optimizer steps an epoch: else the Trainer would place the checkpoint's step in the wrong epoch, skipping
      or repeating data, and the paper's epoch-based schedule would restart misplaced;
    - the optimizer's options (`OPTIMIZER_STATE_OPTIONS`): the resumed optimizer takes them from its saved state, so
      another --learning_rate, say, would be silently ignored;
    - the number of processes: each process resumes its own random generators' state, and `RegionGroupedSampler`
      groups questions by the batch of one process, so that on another number of processes the resumed epoch would
      skip some questions and repeat others even where the steps an epoch are the same;
    - the seed of the training order (`data_seed`, else `seed`): the resumed epoch skips the batches the checkpoint
      trained, which in another order hold other questions."""

    def __init__(self):
        self.update_steps_per_epoch = None
        self.optimizer_options = None
        self.processes = None
        self.data_seed = None

    def state(self) -> dict:
        attributes = {
            "update_steps_per_epoch": self.update_steps_per_epoch,
            "optimizer_options": self.optimizer_options,
            "processes": self.processes,
            "data_seed": self.data_seed,
        }
        return {"args": {}, "attributes": attributes}

    @staticmethod
    def recorded_in(state: TrainerState) -> dict[str, Any]:
        """What a checkpoint's state recorded: its `state()` attributes, those it has (a checkpoint saved before a
        record was kept lacks it, and is resumed unchecked)."""
        records = state.stateful_callbacks
        # Named EpochLengthRecord before it kept the optimizer's options.
        record = records.get(ResumeRecord.__name__) or records.get("EpochLengthRecord") or {}
        return {name: value for name, value in record.get("attributes", {}).items() if value is not None}


def vqa_metric_names(dataset) -> list[str]:
    """What `vqa_metrics(dataset, ...)` gives: the accuracy, overall and by each of the dataset's answer types."""
    return ["accuracy", *(f"accuracy_{answer_type}" for answer_type in dict.fromkeys(dataset.answer_types))]


def check_metric_for_best_model(args: TrainingArguments, metric_names: list[str]):
    """Refuses a `metric_for_best_model` that neither `compute_metrics` (whose `metric_names` are given) nor the
    Trainer gives. The Trainer looks it up only in the first evaluation's results, and a name they lack stops the run
    there, before that checkpoint is saved: after a whole epoch, by default."""
    known = [*metric_names, "loss"]
    trainers_own = ["runtime", "samples_per_second", "steps_per_second"]
    if args.metric_for_best_model and args.metric_for_best_model.removeprefix("eval_") not in known + trainers_own:
        raise ValueError(
            f"metric_for_best_model {args.metric_for_best_model!r} is not among the evaluation's metrics: "
            f"{', '.join(known)}"
        )


# The Trainer applies --dataloader_drop_last to every DataLoader it makes.
DROPPED_QUESTIONS = (
    "--dataloader_drop_last (dataloader_drop_last=True) also drops the last batch of evaluation and prediction, "
    "leaving its questions unanswered; leave it out (with --cuda_graphs the last batch's shape is recorded once, "
    "not every epoch)"
)


class VQATrainer(Trainer):
    """The `Trainer` with the paper's schedule, region bucketing and question-id-keyed evaluation.

    Batches carry `question_id` next to the model inputs. Training drops it; evaluation returns it in place of the
    labels, so the metric looks each prediction up by question (robust to the order several processes gather in)
    and the (batch, answers) soft scores are never gathered.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_record = ResumeRecord()
        self.add_callback(self.resume_record)
        self.resumed_checkpoint = None
        # What the checkpoint resumed recorded (`ResumeRecord.recorded_in`) and its step, read once `train` is called.
        self.resumed_record: dict[str, Any] = {}
        self.resumed_step = 0
        self.region_sampler: RegionGroupedSampler | None = None
        self.add_callback(SamplerEpoch(self))
        self.add_callback(SeedEachProcess())
        # --cuda_graphs: the model trained and its recorded passes, the model evaluated and its recorded forward
        self.graphed_passes: tuple[torch.nn.Module, GraphedForwardBackward] | None = None
        self.graphed_predictions: tuple[torch.nn.Module, CUDAGraphedFunction] | None = None
        # Set where the training batches reach the GPU on a side stream (`get_train_dataloader`).
        self.batch_copy: SideStreamBatchCopy | None = None
        # The DataLoaders made for training, evaluation and prediction that are still in use, and how many of those
        # passes are running (`stop_dataloader_workers`).
        self.dataloaders_made: weakref.WeakSet = weakref.WeakSet()
        # With persistent workers: the evaluation loaders of datasets given to `evaluate` as objects, by their id.
        self.eval_dataloaders_of_datasets: dict[int, tuple[Any, torch.utils.data.DataLoader]] = {}
        self.passes_running = 0
        if self.eval_dataset is not None:
            self._refuse_dropped_questions()
        picks_by_accuracy = self.args.load_best_model_at_end and self.args.metric_for_best_model == "accuracy"
        if picks_by_accuracy and not self.compute_metrics:
            raise ValueError(
                "load_best_model_at_end picks the checkpoint of the best VQA accuracy (metric_for_best_model "
                "'accuracy'), which needs compute_metrics=vqa_metrics(eval_dataset, id2label); give it, or "
                "metric_for_best_model='loss'"
            )
        # Another compute_metrics gives metrics of its own.
        if (metric_names := getattr(self.compute_metrics, "metric_names", None)) is not None:
            check_metric_for_best_model(self.args, metric_names)
        if self.model_init is None:
            self._compile_blocks_if_asked(self.model)

    @property
    def data_seed(self) -> int:
        """The seed of the training order, the same on every process: `data_seed`, else `seed`."""
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # Unset, accelerate's sampler would take the seed the global generator was given last, which
        # `SeedEachProcess` sets apart on each process: a later training's shards of the questions would overlap.
        self.accelerator.dataloader_config.data_seed = self.data_seed

    def call_model_init(self, trial=None):
        return self._compile_blocks_if_asked(super().call_model_init(trial))

    def _compile_blocks_if_asked(self, model):
        if getattr(self.args, "compile_blocks", False):
            # Dynamic shapes: batches padded to different lengths share one compilation of each block.
            model.compile_blocks(dynamic=True)
        return model

    def get_train_dataloader(self):
        """`Trainer.get_train_dataloader`. Where accelerate would copy pinned batches to one CUDA device without
        blocking, on the compute stream, the loader yields them on the host instead, and `_prepare_inputs` copies
        them on a side stream (`SideStreamBatchCopy`)."""
        dataloader = self._made(super().get_train_dataloader())
        if (
            self.args.device.type == "cuda"
            and self.args.dataloader_pin_memory
            and self.accelerator.non_blocking
            and isinstance(dataloader, DataLoaderShard)
            and dataloader.device is not None
        ):
            self.batch_copy = SideStreamBatchCopy(dataloader.device)
            dataloader.device = None
        return dataloader

    def get_eval_dataloader(self, eval_dataset=None):
        """`Trainer.get_eval_dataloader`, with persistent workers kept for each dataset of `eval_dataset`, and for
        the last other dataset evaluated. The Trainer keeps them by name (`"eval"` for every dataset given as an
        object, which `evaluate` always gives): an evaluation after one of another dataset, or after
        `trainer.eval_dataset` was replaced, would silently read the earlier one's questions."""
        self._refuse_dropped_questions()
        if not self.args.dataloader_persistent_workers:
            return self._made(super().get_eval_dataloader(eval_dataset))
        if eval_dataset is None:
            dataset = self.eval_dataset
        elif isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]
        else:
            dataset = eval_dataset
        # Keyed by identity (a dataset need not be hashable); the dataset is kept so that its id is not reused.
        if id(dataset) not in self.eval_dataloaders_of_datasets:
            self._stop_other_eval_loaders()
            dataloader = super().get_eval_dataloader(dataset)
            del self._eval_dataloaders["eval"]
            self.eval_dataloaders_of_datasets[id(dataset)] = (dataset, dataloader)
        return self._made(self.eval_dataloaders_of_datasets[id(dataset)][1])

    def _stop_other_eval_loaders(self):
        """Stops and forgets the loaders of datasets that are not `eval_dataset` (or one of its values): each
        dataset evaluated otherwise, a split loaded anew every epoch say, would keep workers of its own."""
        named = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        kept = {id(dataset) for dataset in named}
        for key in [key for key in self.eval_dataloaders_of_datasets if key not in kept]:
            _stop_persistent_workers([self.eval_dataloaders_of_datasets.pop(key)[1]])

    def get_test_dataloader(self, test_dataset):
        self._refuse_dropped_questions()
        return self._made(super().get_test_dataloader(test_dataset))

    def _refuse_dropped_questions(self):
        if self.args.dataloader_drop_last:
            raise ValueError(DROPPED_QUESTIONS)

    def _made(self, dataloader):
        self.dataloaders_made.add(dataloader)
        return dataloader

    def __getstate__(self):
        # A WeakSet does not pickle (transformers' Ray search pickles the trainer); the copy has no loaders yet.
        return {**self.__dict__, "dataloaders_made": None}

    def __setstate__(self, state):
        self.__dict__.update(state, dataloaders_made=weakref.WeakSet())

    @contextlib.contextmanager
    def _pass(self):
        self.passes_running += 1
        failed = True
        try:
            yield
            failed = False
        finally:
            self.passes_running -= 1
            # A failed pass (an error raised in a worker, an interrupt) leaves its loader's persistent workers to the
            # garbage collector, which kills each only after a 5 s wait (`stop_dataloader_workers`). Failing to stop
            # them must not hide the pass's own error.
            if failed and not self.passes_running:
                try:
                    self.stop_dataloader_workers()
                except Exception:
                    logger.warning("Could not stop the DataLoader workers of the failed pass", exc_info=True)

    def evaluation_loop(self, *args, **kwargs):
        with self._pass():
            return super().evaluation_loop(*args, **kwargs)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None):
        # The Trainer makes the repository as it is built: offline, or with a token that may not write, a run failed
        # there with the HTTP client's traceback. It is the hub's one call here, so whatever it raises is the hub's.
        try:
            super().init_hf_repo(token, private)
        except Exception as error:
            name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            raise HubRepositoryError(
                f"--push_to_hub: cannot make or reach the hub repository {name}: {type(error).__name__}: {error}"
            ) from error

    def stop_dataloader_workers(self):
        """Has the persistent workers of the DataLoaders this trainer made for training, evaluation and prediction
        exit now, between passes; a later pass starts new ones. During a pass it raises a RuntimeError: the pass
        would end early.

        Persistent workers (`--dataloader_persistent_workers`) otherwise live as long as their DataLoader. A process
        that exits ends them at once, but a Trainer dropped within a process lives in reference cycles, which the
        garbage collector frees: it closes a DataLoader iterator's queues before the iterator's own clean-up tells
        the workers to stop, so each worker is killed only after waiting 5 s."""
        if self.passes_running:
            raise RuntimeError(
                "stop_dataloader_workers() during training, evaluation or prediction would end it early; call it "
                "once train(), evaluate() or predict() has returned"
            )
        _stop_persistent_workers(list(self.dataloaders_made))

    def predict(self, *args, **kwargs):
        """`Trainer.predict`. The persistent workers of the DataLoader it makes stop with it: the Trainer makes a new
        one for every prediction, so they would pile up."""
        made_before = set(self.dataloaders_made)
        try:
            return super().predict(*args, **kwargs)
        finally:
            _stop_persistent_workers([loader for loader in self.dataloaders_made if loader not in made_before])

    def _set_signature_columns_if_needed(self):
        # What `remove_unused_columns` (plain `TrainingArguments`' default) keeps: `question_id` is no model input.
        super()._set_signature_columns_if_needed()
        if "question_id" not in self._signature_columns:
            self._signature_columns.append("question_id")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not getattr(self.args, "cuda_graphs", False):
            return super().training_step(model, inputs, num_items_in_batch)
        # Recorded again for another model, or another clipping (its bound is recorded in the graphs).
        if (
            self.graphed_passes is None
            or self.graphed_passes[0] is not model
            or self.graphed_passes[1].max_grad_norm != self.args.max_grad_norm
        ):
            passes = GraphedForwardBackward(
                functools.partial(self._forward_backward, model), model, max_grad_norm=self.args.max_grad_norm
            )
            self.graphed_passes = (model, passes)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = {key: value for key, value in self._prepare_inputs(inputs).items() if key != "question_id"}
        return self.graphed_passes[1](inputs)

    def _graphed_gradient_norm(self, model) -> torch.Tensor | None:
        """The norm of the gradients the last replayed step wrote (clipped there as --max_grad_norm says), or None
        where the step was not replayed."""
        if getattr(self.args, "cuda_graphs", False) and self.graphed_passes and self.graphed_passes[0] is model:
            return self.graphed_passes[1].gradient_norm
        return None

    def _clip_grad_norm(self, model):
        norm = self._graphed_gradient_norm(model)
        return super()._clip_grad_norm(model) if norm is None else norm

    def _get_grad_norm(self, model, grad_norm=None):
        return super()._get_grad_norm(model, self._graphed_gradient_norm(model) if grad_norm is None else grad_norm)

    def _forward_backward(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`Trainer.training_step`'s passes for one process without accumulation (what --cuda_graphs allows)."""
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        self.accelerator.backward(loss)
        return loss.detach()

    @property
    def update_steps_per_epoch(self) -> int | None:
        """Optimizer steps an epoch of the run being trained, as the Trainer counts them."""
        return self.resume_record.update_steps_per_epoch

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; a checkpoint whose epochs had another number of optimizer steps (another batch size,
        number of processes, gradient accumulation or training set), whose optimizer had other options or whose
        training order another seed (see `ResumeRecord`), or that holds the weights alone (`save_only_model`) raises a
        `ResumeError`."""
        self.resumed_checkpoint = resume_from_checkpoint or None
        if resume_from_checkpoint is True:
            # Without a checkpoint the Trainer raises, as it should; it is given True for that.
            self.resumed_checkpoint = get_last_checkpoint(self.args.output_dir)
        state_file = Path(self.resumed_checkpoint) / TRAINER_STATE_NAME if self.resumed_checkpoint else None
        resumed_state = TrainerState.load_from_json(str(state_file)) if state_file and state_file.is_file() else None
        # The Trainer saves the random generators' states with every checkpoint but those of --save_only_model,
        # and resumes one without them (nor the optimizer's and the schedule's) without a word.
        if resumed_state is not None and not any(state_file.parent.glob("rng_state*.pth")):
            raise ResumeError(
                f"{self.resumed_checkpoint} holds the model's weights without the optimizer's, the schedule's and the "
                "random generators' states (a run's output folder, or a checkpoint saved with --save_only_model): a "
                "resumed run would restart them. Resume from a checkpoint-N folder saved whole, or start a new run "
                "from these weights (--model_name_or_path)."
            )
        options = _optimizer_options(self.args)
        self.resumed_record = ResumeRecord.recorded_in(resumed_state) if resumed_state else {}
        self.resumed_step = resumed_state.global_step if resumed_state else 0
        saved_options = self.resumed_record.get("optimizer_options", {})
        # Resumed from a checkpoint that did not record them, the optimizer's options are its unknown ones.
        unknown = self.resumed_checkpoint is not None and not saved_options
        if (saved_processes := self._recorded_otherwise("processes", self.args.world_size)) is not None:
            raise ResumeError(
                f"{self.resumed_checkpoint} was trained on {saved_processes} processes, but this run has "
                f"{self.args.world_size}: each process resumes the random generators that the process of its rank "
                "saved, and region-grouped batches (--group_by_regions) would skip some questions and repeat "
                f"others. Resume on {saved_processes} processes; another batch size a process is fine where the "
                "gradient accumulation keeps the optimizer steps an epoch."
            )
        if (saved_data_seed := self._recorded_otherwise("data_seed", self.data_seed)) is not None:
            raise ResumeError(
                f"{self.resumed_checkpoint} was trained in the order of data seed {saved_data_seed} (--data_seed, "
                f"else --seed), but this run's is {self.data_seed}: the resumed epoch skips the batches the checkpoint "
                "trained, which in another order hold other questions, so that some would be trained twice and "
                "others not at all. Resume with the seeds the run was started with, or start a new run from the "
                "checkpoint's weights (--model_name_or_path)."
            )
        differing = [
            name
            for name in options
            if name in saved_options and not _same_optimizer_option(name, options[name], saved_options[name])
        ]
        if differing:
            raise ResumeError(
                f"{self.resumed_checkpoint} was trained with "
                f"{', '.join(f'--{name} {saved_options[name]}' for name in differing)}, but this run gives "
                f"{', '.join(f'--{name} {options[name]}' for name in differing)}: the "
                "resumed optimizer takes these from its saved state, so this run's would be ignored (or, for another "
                "optimizer, fail to load that state). Resume with "
                "the values the run was started with, or start a new run from the checkpoint's weights "
                "(--model_name_or_path)."
            )
        self.resume_record.optimizer_options = None if unknown else options
        self.resume_record.processes = self.args.world_size
        self.resume_record.data_seed = self.data_seed
        with self._pass():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _recorded_otherwise(self, name: str, value) -> Any:
        """What the resumed checkpoint recorded of `name` (see `ResumeRecord`) where it is not this run's `value`;
        None where they agree or the checkpoint recorded none (saved before the record kept it: unchecked)."""
        saved = self.resumed_record.get(name)
        return saved if saved is not None and saved != value else None

    def _save_checkpoint(self, model, trial):
        # A resumed run's state holds the records its checkpoint had, and the Trainer expects one of each of its
        # stateful callbacks there: a checkpoint saved before a record existed (or under its old name) lacks it.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ExportableState):
                self.state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())
        return super()._save_checkpoint(model, trial)

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        self.resume_record.update_steps_per_epoch = values[1]
        if (recorded := self._recorded_otherwise("update_steps_per_epoch", self.update_steps_per_epoch)) is not None:
            raise ResumeError(
                f"{self.resumed_checkpoint} was trained with {recorded} optimizer steps an epoch, but this run makes "
                f"{self.update_steps_per_epoch} (global batch {values[4]}): the checkpoint's step would fall in "
                "another epoch, skipping or repeating data, and the learning-rate schedule would be misplaced. "
                "Resume with the batch size, number of processes, gradient accumulation and training split the run "
                "was started with."
            )
        max_steps = values[6]
        if self.resumed_checkpoint is not None and self.resumed_step >= max_steps:
            # The Trainer would train no step and save the checkpoint's model as this run's, with a loss of 0.
            raise ResumeError(
                f"{self.resumed_checkpoint} was saved at step {self.resumed_step}, where this run ends (step "
                f"{max_steps}, from --num_train_epochs or --max_steps): nothing is left to train; give more epochs "
                f"or steps to go on, or evaluate and predict with its weights (--model_name_or_path "
                f"{self.resumed_checkpoint} --do_train false)."
            )
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if not getattr(self.args, "paper_schedule", False):
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            if self.update_steps_per_epoch is None:
                raise RuntimeError(
                    "The paper's schedule counts its epochs in optimizer steps, which train() works out from the "
                    "training data: let train() make the schedule, or make it yourself with "
                    "rwsan.training.paper_lr_scheduler(optimizer, steps_per_epoch, args)"
                )
            unreached = paper_schedule_unreached(num_training_steps, self.update_steps_per_epoch, self.args)
            if unreached and self.is_world_process_zero():
                logger.warning(unreached)
            self.lr_scheduler = paper_lr_scheduler(optimizer or self.optimizer, self.update_steps_per_epoch, self.args)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """`Trainer.save_model` (of checkpoints too), on each machine's first process with `--save_on_each_node`
        (see `_saving_where_the_trainer_says`); the run's own folder (not a checkpoint) is saved with the pipeline
        ([`save_for_pipeline`]) when the processing class is an `RWSANProcessor`, so that `pipeline(model=folder,
        trust_remote_code=True)` answers questions from it, and from the hub repository `push_to_hub` fills: that
        saves the model again before it uploads, which would otherwise leave the pipeline out of config.json."""
        with self._saving_where_the_trainer_says():
            super().save_model(output_dir, _internal_call)
            final_folder = output_dir is None or Path(output_dir).resolve() == Path(self.args.output_dir).resolve()
            if not (final_folder and self.args.should_save and isinstance(self.processing_class, RWSANProcessor)):
                return
            zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
            if self.is_fsdp_enabled or zero_stage == 3:
                # Each process holds a shard of the weights: the pipeline's save of those held here would be wrong.
                logger.warning_once("FSDP/ZeRO-3: the output folder is saved without the pipeline (save_for_pipeline)")
                return
            save_for_pipeline(self.accelerator.unwrap_model(self.model), self.processing_class, self.args.output_dir)

    @contextlib.contextmanager
    def _saving_where_the_trainer_says(self):
        """transformers' `save_pretrained` writes on the job's first process alone, whatever its `is_main_process`
        says, so `--save_on_each_node` (each machine's first process saves, for machines without a shared disk) left
        the other machines' checkpoints without the weights and config, and they could not be resumed there. Within
        the Trainer's own saves, the model writes where the Trainer says (`args.should_save`). Not under DeepSpeed or
        FSDP, whose saves gather the weights on the first process."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        widened = self.args.save_on_each_node and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if widened:
            model.should_save_on_this_rank = lambda is_main_process: is_main_process
        try:
            yield
        finally:
            if widened:
                del model.should_save_on_this_rank

    def create_model_card(self, **kwargs):
        """Keeps a model card already in the output folder (train_vqa.py writes one with the VQA accuracy of each
        answer type) rather than replace it, as `push_to_hub` would, with the Trainer's generic card."""
        if not (Path(self.args.output_dir) / "README.md").exists():
            super().create_model_card(**kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if not getattr(self.args, "group_by_regions", False):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler and sampler.generator is None:
                # The Trainer's shuffles with the global generator, which `SeedEachProcess` sets apart on each
                # process: their shards of the questions would overlap.
                sampler.generator = torch.Generator().manual_seed(self.data_seed)
            return sampler
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self.region_sampler = RegionGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            region_counts=dataset.num_regions.tolist(),
            seed=self.data_seed,
        )
        return self.region_sampler

    def floating_point_ops(self, inputs: dict[str, torch.Tensor]) -> int:
        # The Trainer's estimate (6 x question tokens x parameters) leaves out the image regions, most of the work.
        # The mask gives the padded region count of padded and packed batches alike.
        if not hasattr(self.model, "training_flops") or "image_attention_mask" not in inputs:
            return super().floating_point_ops(inputs)
        batch_size, question_length = inputs["input_ids"].shape
        return self.model.training_flops(batch_size, question_length, inputs["image_attention_mask"].shape[1])

    def _prepare_inputs(self, inputs):
        if self.batch_copy is not None:
            inputs = self.batch_copy(inputs)
        # Batches of `VQACollator(pack_regions=True)` are padded once on the device.
        return unpack_image_features(super()._prepare_inputs(inputs))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> int | torch.Tensor | None:
        """The questions of a step's micro-batches, or of an evaluation batch (`Trainer.prediction_step` asks too).

        With a `compute_loss_func`, which returns its loss summed over the questions of its batch divided by this
        count (the Trainer's convention): every batch's count. Where `average_tokens_across_devices`, the Trainer
        multiplies the function's loss by the processes, or by DataParallel's GPUs; the count is theirs all
        together, so that the step's loss is the mean over all its questions. Else, for `compute_loss`'s weights:
        an accumulated step's count on this process (shapes, no sync), and None for a single batch, where there is
        nothing to weigh."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        questions = sum(len(batch["labels"]) for batch in batch_samples)
        if self.compute_loss_func is None:
            return questions if len(batch_samples) > 1 else None
        if not self.args.average_tokens_across_devices:
            return questions
        if self.args.world_size > 1:
            return self.accelerator.gather(torch.tensor(questions, device=device)).sum()
        # DataParallel's function sees the outputs of all its GPUs.
        return questions * max(self.args.n_gpu, 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {key: value for key, value in inputs.items() if key != "question_id"}
        # Read first: the Trainer takes the labels out of the inputs for a compute_loss_func.
        batch_size = len(inputs["labels"]) if "labels" in inputs else None
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None or self.compute_loss_func is not None:
            return result
        # The model's loss is its batch's mean, and the Trainer divides each micro-batch's by their number in the
        # step: the questions of a smaller micro-batch (the epoch's last on one process) would weigh more than the
        # others'. Weighed by its share of the step's questions, the step's loss is its whole batch's mean, as
        # without accumulation.
        weight = batch_size * self.current_gradient_accumulation_steps / num_items_in_batch
        if return_outputs:
            loss, outputs = result
            return loss * weight, outputs
        return result * weight

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        question_ids = inputs.pop("question_id")
        if getattr(self.args, "cuda_graphs", False):
            loss, logits = self._graphed_prediction(model, inputs)
            return loss, None if prediction_loss_only else logits, question_ids
        # Without ignore_keys, the Trainer leaves out the config's keys_to_ignore_at_inference: all but the logits.
        loss, predictions, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        return loss, predictions, question_ids

    def _graphed_prediction(self, model, inputs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The loss (None without labels) and logits of a batch, from its shape's recorded forward pass."""
        if self.graphed_predictions is None or self.graphed_predictions[0] is not model:
            self.graphed_predictions = (model, CUDAGraphedFunction(functools.partial(self._predict, model), model))
        loss, logits = self.graphed_predictions[1](self._prepare_inputs(inputs))
        # The graph writes its outputs again at its next replay; the evaluation loop may keep them longer.
        return None if loss is None else loss.clone(), logits.clone()

    def _predict(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`Trainer.prediction_step`'s forward pass, for one process."""
        with torch.no_grad(), self.compute_loss_context_manager():
            if "labels" not in inputs:
                return None, model(**inputs).logits
            num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        return loss.mean(), outputs.logits


def _stop_persistent_workers(dataloaders: Collection):
    for loader in dataloaders:
        # accelerate's DataLoaderShard wraps the DataLoader, which keeps the iterator of persistent workers.
        loader = getattr(loader, "base_dataloader", loader)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def vqa_metrics(dataset, id2label: dict[int, str]):
    """`compute_metrics` for a `VQADataset`: the official VQA accuracy, overall and per answer type, in percent."""
    row_of_question = {int(question_id): row for row, question_id in enumerate(dataset.question_ids)}

    def compute_metrics(prediction) -> dict[str, float]:
        question_ids = [int(question_id) for question_id in np.asarray(prediction.label_ids).reshape(-1)]
        strangers = [question_id for question_id in question_ids if question_id not in row_of_question]
        if strangers:
            raise ValueError(
                f"The evaluation answered {len(strangers)} questions that {dataset!r}, whose accuracy this metric "
                f"measures, does not have (question ids {strangers[:5]}{', ...' if len(strangers) > 5 else ''}): "
                "the dataset evaluated is another; make its compute_metrics with vqa_metrics(that dataset, ...)"
            )
        rows = [row_of_question[question_id] for question_id in question_ids]
        if len(set(rows)) != len(rows) or len(rows) != len(dataset):
            # An accuracy over some of the questions would pass for the split's.
            raise ValueError(
                f"The evaluation answered {len(rows)} questions ({len(set(rows))} distinct) of the {len(dataset)} "
                f"of {dataset!r}; every question must be answered exactly once (a DataLoader with drop_last=True "
                "loses the last batch; joined splits must not share question ids)"
            )
        answers = [id2label[int(index)] for index in np.asarray(prediction.predictions).reshape(-1)]
        return compute_vqa_accuracy(
            answers, [dataset.answers[row] for row in rows], [dataset.answer_types[row] for row in rows]
        )

    # What VQATrainer checks metric_for_best_model against.
    compute_metrics.metric_names = vqa_metric_names(dataset)
    return compute_metrics


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops a diverged run at the first logged NaN/inf loss, naming the step and the last checkpoint that is safe to
    resume from.

    It reads the losses the Trainer logs anyway, so the training loop gains no per-step device sync: the periodic
    training loss, each evaluation's loss and the run's mean training loss, logged as it ends (the only one a run
    with --logging_strategy no or --logging_steps beyond its end logs), so that a diverged run saves no model. The
    loss is seen only when logged, and a checkpoint saved since the last finite log may already hold non-finite
    weights (the update of that very step may have made them so): the checkpoint named is the last one saved before
    the step of the last finite log, or the one training started from.
    """

    LOSSES = {"loss": "training loss", "eval_loss": "evaluation loss", "train_loss": "run's mean training loss"}

    def __init__(self):
        self.start_step = self.last_finite_step = 0
        # Only a training run diverges: an evaluation of a given model says what it says, and is reported.
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        # The weights training starts from (fresh, or the checkpoint resumed from) are taken as sound.
        self.start_step = self.last_finite_step = state.global_step
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.training:
            return
        logged = {key: value for key, value in (logs or {}).items() if key in self.LOSSES}
        if all(math.isfinite(loss) for loss in logged.values()):
            if logged:
                self.last_finite_step = state.global_step
            return
        key, loss = next((key, loss) for key, loss in logged.items() if not math.isfinite(loss))
        checkpoint = last_checkpoint_before(args.output_dir, self.last_finite_step, self.start_step)
        raise FloatingPointError(
            f"The {self.LOSSES[key]} became {loss} by optimizer step {state.global_step}; a loss was last logged "
            f"finite at step {self.last_finite_step}. The last checkpoint saved before then is "
            f"{checkpoint or 'none (no checkpoint was saved yet)'} (later ones may hold non-finite weights). Resume "
            "from it with --resume_from_checkpoint and gradient clipping (--max_grad_norm, e.g. 1.0; the paper "
            "clips nothing), or without --fp16. A resumed run keeps the checkpoint's learning rate: a lower "
            "--learning_rate takes a new run."
        )


def last_checkpoint_before(output_dir: str | os.PathLike, step: int, start_step: int) -> str | None:
    """The Trainer's checkpoint folder in `output_dir` with the highest step below `step`, or at `start_step` (the
    one a run resumed from), or None."""
    steps = checkpoint_folders(output_dir)
    eligible = [checkpoint_step for checkpoint_step in steps if checkpoint_step < step or checkpoint_step == start_step]
    return str(steps[max(eligible)]) if eligible else None


def checkpoint_folders(output_dir: str | os.PathLike) -> dict[int, Path]:
    """The Trainer's checkpoint folders in `output_dir`, by step, in step order."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return {}
    steps = {
        int(match.group(1)): path
        for path in folder.iterdir()
        if path.is_dir() and (match := _CHECKPOINT_NAME.match(path.name)) is not None
    }
    return dict(sorted(steps.items()))
