"""Training samples/s of RWSANForVQA at the paper configuration: the original's way against the fast path, one run.

    python bench/train_throughput.py --json bench/results/gpu.json           # a GPU: about 5 minutes
    python bench/train_throughput.py --quick --json bench/results/cpu.json   # a CPU: under 5 minutes

A training step is a forward pass with soft-score labels (binary cross-entropy), the backward pass and an Adam step
(betas (0.9, 0.98), eps 1e-9), at the paper configuration (`RWSANConfig()`: 3,129 answers, 20,573 question tokens,
19.5M parameters) and batch size 64. Rows:

Synthetic batches, made on the host by `VQACollator` from items shaped like `VQADataset`'s (10-100 regions per
image, mean about 42; questions of mostly 5-10 words, at most 16) and moved to the device once:
  fp32 eager            no autocast, eager attention; every batch padded to its longest question and image.
  original              the original's way: fp16 autocast + GradScaler, eager attention, padded to the batch's
                        longest.
  bf16 SDPA             bf16 autocast, SDPA attention, fused Adam.
The variants below pad to multiples of --pad_to_multiple_of, so that only a few shapes occur (5 at the default 20):
  graphed_passes        bf16 SDPA with the forward and backward passes recorded as one CUDA graph per padded shape
                        and replayed, Adam eager: a few launches a step instead of thousands (train_vqa.py
                        --cuda_graphs; CUDA only).
  compiled_blocks       bf16 SDPA with the two weight-shared attention blocks and the norms between their
                        applications compiled (`model.compile_blocks`, dynamic shapes): small graphs instead of
                        one with 18 block applications unrolled.
  blocks_graphed_passes compiled blocks inside the recorded passes (CUDA only).
  encoders_graphed_passes
                        compiled encoders inside the recorded passes (CUDA only): a larger region than the
                        blocks, each encoder's three block applications and the layer norms between them in one
                        graph, so that fewer kernels run (the gradients of the shared weights are summed inside
                        it), after about twice the compilation. An experiment: train_vqa.py compiles the blocks.
  compiled              torch.compile of the whole model (dynamic shapes); minutes of compilation.
  cuda_graphs           the same in mode "reduce-overhead" (CUDA only).
  grouped               the fastest bf16 variant run before it (bf16 SDPA, graphed_passes, blocks_graphed_passes; the
                        other compiling rows run last) on batches of similar region counts (the sampler of
                        `--group_by_regions`).
The real data pipeline, on a VQA-like set written in the original's raw formats and prepared by
data_scripts/prepare_vqa.py (or the one in --dataset_dir):
  loader                the DataLoader alone: VQADataset + VQACollator, worker processes, pinned memory.
  loader_packed         the same with `VQACollator(pack_regions=True)`: the workers send only the real regions.
  loader_in_process     packed regions gathered in the main process (no workers), pinned there.
  loader_training       the same fastest variant fed by the DataLoader of packed regions, padded on the device as
                        that variant pads.
  trainer_graphs        train_vqa.py's path: VQATrainer with the fast-path arguments and --cuda_graphs, for a fixed
                        number of steps (CUDA only).
  trainer               the same with its fastest options on CUDA: --compile_blocks --cuda_graphs
                        --group_by_regions --pack_regions; on a CPU with none of these.
  trainer_in_process    the same loading in the main process (--dataloader_num_workers 0).
  trainer_blocking      trainer with the batches copied to the GPU as the Trainer does by default, waiting for the
                        steps queued before them (VQATrainingArguments copies without waiting; CUDA only).
  trainer_encoders      trainer with the two encoders compiled instead of the blocks (an experiment: what
                        encoders_graphed_passes compiles, through the Trainer; CUDA only).
  evaluate              VQATrainer.evaluate as train_vqa.py runs it after each epoch (bf16, the answer of each
                        question kept; packed regions on CUDA) over --eval_questions questions, eager.
  evaluate_graphs       the same with --cuda_graphs (recorded forward passes; CUDA only).

With --profile_steps N, each Trainer row that trains runs N more steps after the timed ones under torch.profiler and
prints what the device ran in them, summed by kernel name (`bench/kernel_profile.py`; kept in the JSON too). With
batches grouped by regions they are taken from the middle of a mega-batch (right after the timed steps come its
largest batches).
With --inductor_option NAME=VALUE, the compiled rows are compiled under that inductor setting (e.g.
combo_kernels=True, which joins independent small kernels into one launch), to compare it with a run without.
With --attn_implementation eager, the Trainer and evaluation rows run the attention as the original writes it (two
matrix products around a masked softmax, which inductor fuses inside compiled blocks) rather than through SDPA's
fused kernels: at the paper's short sequences a fused kernel's fixed cost may outweigh what it fuses.

Compilation and warm-up (each padded shape is run before timing) are left out of samples/s and printed apart. The
timed loops read nothing back from the device (but for the Trainer's logging, every 50 steps, as in train_vqa.py);
it is synchronised only before and after them. Every row runs in its own try/except, so a failure is reported and
the other rows still run; rows that would overrun --time_budget are skipped. The most important rows run first (see
RUN_ORDER); the whole-model compilations come last.
"""

import argparse
import ast
import contextlib
import ctypes
import datetime
import functools
import gc
import itertools
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # data_scripts is a folder of the repository, not part of the installed package.
    sys.path.insert(0, str(REPO_ROOT))

from bench.arguments import checked_device, require_at_least  # noqa: E402
from bench.kernel_profile import KernelProfile, print_kernel_profile, profiler_for, summarize  # noqa: E402
from bench.raw_vqa_files import (  # noqa: E402
    MAX_REGIONS,
    MIN_REGIONS,
    NUM_ANNOTATORS,
    annotation,
    generate_once,
    write_random_image,
    write_train_split,
)
from data_scripts.prepare_vqa import prepare_vqa  # noqa: E402
from rwsan import RWSANConfig, RWSANForVQA  # noqa: E402
from rwsan.data import VQACollator, load_vqa_dataset, unpack_image_features  # noqa: E402
from rwsan.predict import file_writing_problem  # noqa: E402
from rwsan.training import (  # noqa: E402
    GraphedForwardBackward,
    VQATrainer,
    VQATrainingArguments,
    answer_indices,
    synchronize,
)

PAPER_BATCH_SIZE = 64
ADAM_ARGUMENTS = {"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-9}
# Bottom-up-attention features keep 10-100 regions per image, most images 20-60: 10 + Gamma(2, 16), mean about 42.
REGION_GAMMA_SHAPE, REGION_GAMMA_SCALE = 2.0, 16.0
# VQA-v2 questions have mostly 5-10 words: 3 + Poisson(4.5), mean 7.5, cut at max_question_length.
MIN_QUESTION_WORDS, QUESTION_POISSON_MEAN = 3, 4.5
SOFT_SCORES = (0.3, 0.6, 0.9, 1.0)
MAX_ANSWERS_PER_QUESTION = 3
# The answer vocabulary keeps the multiple-choice answers seen more than 8 times; each answer is that of 10 questions.
QUESTIONS_PER_ANSWER = 10
QUESTION_WORD_POOL = 5000
# Batches per mega-batch of the Trainer's length-grouped sampler (transformers' `get_length_grouped_indices`).
TRAINER_MEGA_BATCHES = 50
# A small model and data set for --tiny (a smoke test of this script, not a measurement).
TINY_SIZES = {
    "vocab_size": 60,
    "word_embedding_size": 16,
    "hidden_size": 32,
    "intermediate_size": 64,
    "image_feature_size": 48,
    "flat_mlp_size": 16,
    "flat_output_size": 48,
    "text_self_attention_rank": 2,
    "image_self_attention_rank": 4,
    "guided_attention_rank": 8,
    "num_labels": 12,
}
ROWS = (
    "fp32_eager",
    "original",
    "bf16_sdpa",
    "graphed_passes",
    "compiled_blocks",
    "blocks_graphed_passes",
    "encoders_graphed_passes",
    "compiled",
    "cuda_graphs",
    "grouped",
    "loader",
    "loader_packed",
    "loader_in_process",
    "loader_training",
    "trainer_graphs",
    "trainer",
    "trainer_in_process",
    "trainer_blocking",
    "trainer_encoders",
    "evaluate",
    "evaluate_graphs",
)
# The fastest path (compiled blocks inside CUDA-graphed passes) runs early, for the rows that reuse it and for its
# compilation to be cached for the Trainer's; the other compiling rows come last: each can take minutes.
RUN_ORDER = (
    "original",
    "fp32_eager",
    "bf16_sdpa",
    "graphed_passes",
    "blocks_graphed_passes",
    "grouped",
    "loader",
    "loader_packed",
    "loader_in_process",
    "loader_training",
    "trainer_graphs",
    "trainer",
    "trainer_blocking",
    "trainer_in_process",
    "evaluate",
    "evaluate_graphs",
    "compiled_blocks",
    "encoders_graphed_passes",
    "trainer_encoders",
    "cuda_graphs",
    "compiled",
)
# Eager passes on a side stream before the passes of a shape are recorded as a CUDA graph.
GRAPH_WARMUP_PASSES = 3


@dataclass(frozen=True)
class Variant:
    """How one synthetic row trains."""

    title: str
    attn_implementation: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool = False
    fused_optimizer: bool = False
    compile_mode: str | None = None
    # What is compiled: "model" (`torch.compile(model)`), "blocks" (`model.compile_blocks`) or "encoders" (the
    # residual weight-sharing modules, each applying its block three times).
    compile_scope: str = "model"
    # Forward and backward recorded as one CUDA graph per padded shape and replayed (`GraphedForwardBackward`).
    graphed_passes: bool = False
    # Round padded lengths up to --pad_to_multiple_of (for compiled shapes); otherwise pad to the batch's longest.
    bucketed: bool = False

    @property
    def cuda_graphs(self) -> bool:
        return self.compile_mode == "reduce-overhead"

    @property
    def needs_cuda(self) -> bool:
        return self.cuda_graphs or self.graphed_passes


def bf16_variant(title: str, **options) -> Variant:
    """A variant built on bf16 autocast + SDPA + fused Adam."""
    return Variant(title, "sdpa", torch.bfloat16, fused_optimizer=True, **options)


VARIANTS = {
    "fp32_eager": Variant("fp32 eager", "eager", None),
    "original": Variant(
        "fp16 autocast + eager + GradScaler (the original's way)", "eager", torch.float16, grad_scaler=True
    ),
    "bf16_sdpa": bf16_variant("bf16 autocast + SDPA + fused Adam"),
    "graphed_passes": bf16_variant("bf16 + SDPA + CUDA-graphed passes", graphed_passes=True, bucketed=True),
    "compiled_blocks": bf16_variant(
        "bf16 + SDPA + compiled blocks", compile_mode="default", compile_scope="blocks", bucketed=True
    ),
    "blocks_graphed_passes": bf16_variant(
        "bf16 + SDPA + compiled blocks + CUDA-graphed passes",
        compile_mode="default",
        compile_scope="blocks",
        graphed_passes=True,
        bucketed=True,
    ),
    "encoders_graphed_passes": bf16_variant(
        "bf16 + SDPA + compiled encoders + CUDA-graphed passes",
        compile_mode="default",
        compile_scope="encoders",
        graphed_passes=True,
        bucketed=True,
    ),
    "compiled": bf16_variant("bf16 + SDPA + torch.compile of the whole model", compile_mode="default", bucketed=True),
    "cuda_graphs": bf16_variant(
        "bf16 + SDPA + torch.compile of the whole model, reduce-overhead", compile_mode="reduce-overhead", bucketed=True
    ),
}


def compiles(key: str) -> bool:
    """Whether the row of `key` is a synthetic variant that compiles."""
    return key in VARIANTS and VARIANTS[key].compile_mode is not None


# The rows reusing the fastest synthetic variant (grouped, loader_training) pick the fastest bf16 variant that ran.
FAST_PATH_CANDIDATES = tuple(key for key, variant in VARIANTS.items() if variant.autocast_dtype == torch.bfloat16)
TRAINER_ROWS = tuple(key for key in ROWS if key.startswith(("trainer", "evaluate")))
# Rows of loading or answering alone, whose rates are not comparable with those of training.
NOT_TRAINING_ROWS = ("loader", "loader_packed", "loader_in_process", "evaluate", "evaluate_graphs")
# Characters of a row's title in the printed table (the JSON keeps it whole).
TITLE_WIDTH = 68
CUDA_ONLY_TRAINER_ROWS = ("trainer_graphs", "trainer_blocking", "trainer_encoders", "evaluate_graphs")
# The Trainer rows with its fastest options, which compile the blocks (or the encoders) on CUDA.
FASTEST_TRAINER_ROWS = ("trainer", "trainer_in_process", "trainer_blocking", "trainer_encoders")
# The rows reusing the fast path; it is kept only while one of them is still to run.
FAST_PATH_REUSERS = ("grouped", "loader_training")


@dataclass
class Row:
    key: str
    title: str
    section: str
    samples_per_second: float | None = None
    warmup_seconds: float | None = None
    peak_memory_bytes: int | None = None
    timed_steps: int | None = None
    mean_padded_question_length: float | None = None
    mean_padded_regions: float | None = None
    note: str = ""
    error: str | None = None
    # The Trainer rows: seconds of CUDA graph recordings within the timed steps, left out of samples_per_second.
    recording_seconds_left_out: float | None = None
    # The Trainer rows: the host's milliseconds a timed step in each part of it (`HostClock`), and in the rest.
    host_milliseconds_per_step: dict[str, float] | None = None
    # The Trainer rows with --profile_steps: what the device ran in those steps after the timed ones.
    kernel_profile: KernelProfile | None = None


# ----------------------------------------------------------------------------------------------- synthetic data


def sample_region_counts(rng: np.random.Generator, count: int) -> np.ndarray:
    regions = MIN_REGIONS + rng.gamma(REGION_GAMMA_SHAPE, REGION_GAMMA_SCALE, count)
    return np.clip(np.rint(regions), MIN_REGIONS, MAX_REGIONS).astype(np.int64)


def sample_question_lengths(rng: np.random.Generator, count: int, max_length: int) -> np.ndarray:
    return np.minimum(MIN_QUESTION_WORDS + rng.poisson(QUESTION_POISSON_MEAN, count), max_length)


def synthetic_items(config: RWSANConfig, count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Items as `VQADataset` returns them: `input_ids` (words,), `image_features` (regions, features) float16 (the
    prepared data's dtype) and `labels` (answers,) with 1-3 soft scores."""
    items = []
    question_lengths = sample_question_lengths(rng, count, config.max_question_length)
    for words, regions in zip(question_lengths, sample_region_counts(rng, count)):
        labels = np.zeros(config.num_labels, np.float32)
        num_answers = rng.integers(1, MAX_ANSWERS_PER_QUESTION + 1)
        labels[rng.choice(config.num_labels, num_answers, replace=False)] = rng.choice(SOFT_SCORES, num_answers)
        features = rng.random((regions, config.image_feature_size), dtype=np.float32).astype(np.float16)
        items.append(
            {
                "input_ids": rng.integers(2, config.vocab_size, words),
                "image_features": features,
                "labels": labels,
            }
        )
    return items


def collated_batches(
    items: list[dict], batch_size: int, collator: VQACollator, group_by_regions: bool, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Whole batches of the items in a random order, or in the order of the Trainer's `--group_by_regions`."""
    generator = torch.Generator().manual_seed(seed)
    if group_by_regions:
        lengths = [len(item["image_features"]) for item in items]
        # Sorted within mega-batches of 50 batches, as the sampler does on a data set of 200+ batches.
        order = get_length_grouped_indices(lengths, batch_size, TRAINER_MEGA_BATCHES, generator)
    else:
        order = torch.randperm(len(items), generator=generator).tolist()
    return [
        collator([items[index] for index in order[start : start + batch_size]])
        for start in range(0, len(order) - batch_size + 1, batch_size)
    ]


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def bucket_shapes(max_question_length: int, multiple: int) -> list[tuple[int, int]]:
    """Every (question length, regions) a `VQACollator(pad_to_multiple_of=multiple)` batch can have."""
    question_lengths = {
        min(round_up(length, multiple), max_question_length) for length in range(1, max_question_length + 1)
    }
    region_counts = {min(round_up(regions, multiple), MAX_REGIONS) for regions in range(MIN_REGIONS, MAX_REGIONS + 1)}
    return sorted(itertools.product(question_lengths, region_counts))


def resized_batch(batch: dict[str, torch.Tensor], question_length: int, num_regions: int) -> dict[str, torch.Tensor]:
    """`batch` padded or cut to the given lengths: a warm-up batch of that shape (only its shape matters)."""

    def resize(tensor: torch.Tensor, length: int) -> torch.Tensor:
        if tensor.shape[1] >= length:
            return tensor[:, :length].contiguous()
        return F.pad(tensor, [0, 0] * (tensor.dim() - 2) + [0, length - tensor.shape[1]])

    return {
        "input_ids": resize(batch["input_ids"], question_length),
        "attention_mask": resize(batch["attention_mask"], question_length),
        "image_features": resize(batch["image_features"], num_regions),
        "image_attention_mask": resize(batch["image_attention_mask"], num_regions),
        "labels": batch["labels"],
    }


def padded_shape(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(question length, regions) the batch is padded to; the mask has the regions of packed batches too."""
    return batch["input_ids"].shape[1], batch["image_attention_mask"].shape[1]


def mean_padded_shape(shapes: list[tuple[int, int]]) -> dict[str, float]:
    """A row's mean padded question length and regions over `shapes` (question length, regions); none without
    shapes."""
    if not shapes:
        return {}
    question_lengths, region_counts = zip(*shapes)
    return {
        "mean_padded_question_length": float(np.mean(question_lengths)),
        "mean_padded_regions": float(np.mean(region_counts)),
    }


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without `question_id`, on the device (asynchronously from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items() if key != "question_id"}


# ------------------------------------------------------------------------------------------------ raw VQA data


def write_raw_vqa(root: Path, config: RWSANConfig, num_images: int, seed: int = 0):
    """A train split in the original's raw formats (vqa/*.json, coco_extract/train2014/*.npz with `x` float32
    (features, regions)), sized like the paper's: each of `config.num_labels` answers is the multiple-choice answer of
    10 questions, so the prepared answer vocabulary has exactly that many answers; images have VQA-like region
    counts, questions VQA-like lengths."""
    rng = np.random.default_rng(seed)
    features_dir = root / "coco_extract" / "train2014"
    features_dir.mkdir(parents=True)
    for image_id, num_regions in enumerate(sample_region_counts(rng, num_images), start=1):
        write_random_image(features_dir, image_id, int(num_regions), config.image_feature_size, rng)

    answers = [f"answer{index}" for index in range(config.num_labels)]
    num_words = min(QUESTION_WORD_POOL, config.vocab_size - 2)
    num_questions = QUESTIONS_PER_ANSWER * config.num_labels
    question_lengths = sample_question_lengths(rng, num_questions, config.max_question_length)
    questions, annotations = [], []
    for question_id, words in enumerate(question_lengths):
        image_id = int(rng.integers(1, num_images + 1))
        text = " ".join(f"word{index}" for index in rng.integers(0, num_words, words))
        questions.append({"image_id": image_id, "question": f"{text}?", "question_id": question_id})
        best = answers[question_id % len(answers)]
        num_agreeing = int(rng.integers(4, NUM_ANNOTATORS + 1))
        others = rng.integers(0, len(answers), NUM_ANNOTATORS - num_agreeing)
        given = [best] * num_agreeing + [answers[index] for index in others]
        annotations.append(annotation(question_id, image_id, given, best))
    write_train_split(root, questions, annotations)


# ----------------------------------------------------------------------------------------------- measurement


def build_model(config: RWSANConfig, attn_implementation: str, device: torch.device) -> RWSANForVQA:
    """The model of every row: the same initial weights (seed 0), in training mode on `device`."""
    torch.manual_seed(0)
    model = RWSANForVQA(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(device).train()


def compile_encoders(model: RWSANForVQA, **compile_kwargs):
    """Compiles the two residual weight-sharing encoders in place, each applying its block three times: a larger
    region than `model.compile_blocks`, whose backward sums three of each shared weight's nine gradients."""
    for encoder in (model.rwsan.question_encoder, model.rwsan.image_encoder):
        encoder.compile(**compile_kwargs)


class TrainingStep:
    """One training step of a variant: forward with labels under autocast, backward, Adam step. Returns the loss
    without reading it back."""

    def __init__(self, model: RWSANForVQA, variant: Variant, device: torch.device):
        self.model = model
        self.variant = variant
        self.device = device
        self.forward = model
        if variant.compile_mode is not None:
            # Dynamic shapes: every padded length shares one compilation (CUDA graphs are still one per shape).
            if variant.compile_scope == "blocks":
                model.compile_blocks(mode=variant.compile_mode, dynamic=True)
            elif variant.compile_scope == "encoders":
                compile_encoders(model, mode=variant.compile_mode, dynamic=True)
            else:
                self.forward = torch.compile(model, mode=variant.compile_mode, dynamic=True)
        self.optimizer = torch.optim.Adam(
            model.parameters(), **ADAM_ARGUMENTS, fused=True if variant.fused_optimizer else None
        )
        self.scaler = torch.amp.GradScaler(device.type) if variant.grad_scaler else None
        self.passes = self.forward_backward
        if variant.graphed_passes:
            # What train_vqa.py --cuda_graphs runs.
            self.passes = GraphedForwardBackward(self.forward_backward, model, GRAPH_WARMUP_PASSES)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.passes(batch)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.variant.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        autocast = self.variant.autocast_dtype
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            loss = self.forward(**batch).loss
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach()


def load_glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


GLIBC = load_glibc()


def compiled_graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def resident_set_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """How far memory grew at most during a block, above what was in use when it began: allocated device memory
    on CUDA; on Linux CPUs the resident set size of this process (its high-water mark is reset first); None
    elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start: int | None = None
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
                self.start = resident_set_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc_info):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.bytes = resident_set_kib("VmHWM") * 1024 - self.start


class TimeBudget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


# Where the Trainer's main thread spends a training step, as `HostClock` sums it.
WAITING_FOR_BATCHES = "waiting for batches"
COPIES_AND_PADDING = "copies and padding"
TRAINING_STEP = "training_step"
OPTIMIZER_STEP = "optimizer step"
SCHEDULE_AND_ZERO_GRAD = "schedule and zero_grad"


class HostClock(TrainerCallback):
    """The seconds the Trainer's main thread spends in each part of its training steps, summed in `seconds`:
    `WAITING_FOR_BATCHES` (`get_batch_samples`: the DataLoader's next batch), `COPIES_AND_PADDING`
    (`_prepare_inputs`: the batch's copies to the device and the padding of packed regions), `TRAINING_STEP` (the
    rest of `training_step`: the model's training mode, the forward and backward passes' launches or the graph's
    checks and replay), `OPTIMIZER_STEP`, and `SCHEDULE_AND_ZERO_GRAD` (from the optimizer step to the step's end:
    the learning rate's schedule, `model.zero_grad()`). A part timed inside another is left out of the outer one.
    No part reads from the device; where the host waits for it anyway (a synchronisation, a full launch queue), the
    part that waits grows by the device's time, and that names it."""

    def __init__(self):
        parts = (WAITING_FOR_BATCHES, COPIES_AND_PADDING, TRAINING_STEP, OPTIMIZER_STEP, SCHEDULE_AND_ZERO_GRAD)
        self.seconds = dict.fromkeys(parts, 0.0)
        # The seconds of the parts timed inside each part being timed, innermost last.
        self.inner_seconds: list[float] = []
        self.optimizer_start = self.optimizer_end = None

    @contextlib.contextmanager
    def timing(self, part: str):
        start = time.perf_counter()
        self.inner_seconds.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[part] += elapsed - self.inner_seconds.pop()
            if self.inner_seconds:
                self.inner_seconds[-1] += elapsed

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_end = time.perf_counter()
        self.seconds[OPTIMIZER_STEP] += self.optimizer_end - self.optimizer_start

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds[SCHEDULE_AND_ZERO_GRAD] += time.perf_counter() - self.optimizer_end


class ShapeRecordingTrainer(VQATrainer):
    """`VQATrainer` that keeps the padded (question length, regions) of every training batch it prepares, for the
    Trainer rows' padded TxR, and times the parts of its steps on the host (`host_clock`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.padded_shapes: list[tuple[int, int]] = []
        self.host_clock = HostClock()
        self.add_callback(self.host_clock)

    def get_batch_samples(self, *args, **kwargs):
        with self.host_clock.timing(WAITING_FOR_BATCHES):
            return super().get_batch_samples(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        with self.host_clock.timing(TRAINING_STEP):
            return super().training_step(*args, **kwargs)

    def _prepare_inputs(self, inputs):
        with self.host_clock.timing(COPIES_AND_PADDING):
            inputs = super()._prepare_inputs(inputs)
        if self.model.training:
            self.padded_shapes.append(padded_shape(inputs))
        return inputs


class SteadyStateTimer(TrainerCallback):
    """Times the Trainer's optimizer steps `warmup_steps + 1` to `warmup_steps + timed_steps` (after compilation,
    graph recording and the workers' start), synchronising with the device only at those two points (and around
    any recording, which synchronises itself). The rate is printed at once, so that a run stopped later
    (profiling, a timeout) still leaves it in the log.

    A CUDA graph recorded while timed (a padded shape first met there: rare shapes of fine buckets are) is a one-off
    cost that a longer run pays once: its time (`recording_seconds`, synchronised around each recording) is left
    out of the rate, and a note says how much."""

    def __init__(
        self,
        warmup_steps: int,
        timed_steps: int,
        synchronize: Callable[[], None],
        batch_size: int,
        name: str,
        recordings: Callable[[], tuple[int, float]] = lambda: (0, 0.0),
        padded_shapes: list[tuple[int, int]] | None = None,
        host_seconds: dict[str, float] | None = None,
    ):
        self.warmup_steps = warmup_steps
        self.timed_steps = timed_steps
        self.synchronize = synchronize
        self.batch_size = batch_size
        self.name = name
        # How many CUDA graphs the Trainer has recorded so far, and the seconds they took (a recording while timed
        # costs eager passes).
        self.recordings = recordings
        # The padded shape of each training batch so far, where the Trainer keeps them (`ShapeRecordingTrainer`).
        self.padded_shapes = padded_shapes if padded_shapes is not None else []
        # The host's seconds so far in each part of a step, where they are kept (`HostClock.seconds`).
        self.host_seconds = host_seconds if host_seconds is not None else {}
        self.host_seconds_at_steady_start: dict[str, float] = {}
        # The timed steps' host milliseconds a step in each part, and in the rest of the loop ("the rest").
        self.host_milliseconds: dict[str, float] = {}
        self.train_start = self.steady_start = self.host_end = self.end = None
        self.graphs_at_steady_start = self.recordings_at_steady_start = self.shapes_at_steady_start = None
        # Seconds of CUDA graph recordings within the timed steps, left out of the rate.
        self.seconds_left_out = 0.0
        self.timed_shapes: list[tuple[int, int]] = []
        self.notes: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.synchronize()
            self.steady_start = time.perf_counter()
            self.graphs_at_steady_start = compiled_graph_count()
            self.recordings_at_steady_start = self.recordings()
            self.shapes_at_steady_start = len(self.padded_shapes)
            self.host_seconds_at_steady_start = dict(self.host_seconds)
        elif state.global_step == self.warmup_steps + self.timed_steps:
            self.host_end = time.perf_counter()
            self.synchronize()
            self.end = time.perf_counter()
            self.timed_shapes = self.padded_shapes[self.shapes_at_steady_start :]
            if compiled_graph_count() != self.graphs_at_steady_start:
                self.notes.append("recompiled while timed")
            (count, seconds), (count_before, seconds_before) = self.recordings(), self.recordings_at_steady_start
            recordings, self.seconds_left_out = count - count_before, seconds - seconds_before
            if recordings:
                self.notes.append(
                    f"recorded {recordings} CUDA graph{'s' * (recordings > 1)} while timed "
                    f"({self.seconds_left_out:.2f} s, left out of the rate)"
                )
            print(
                f"{self.name}: {self.samples_per_second:,.1f} samples/s over steps {self.warmup_steps + 1}-"
                f"{state.global_step}",
                flush=True,
            )
            if self.host_seconds:
                self.host_milliseconds = self.host_parts()
                parts = ", ".join(f"{part} {milliseconds:.2f}" for part, milliseconds in self.host_milliseconds.items())
                step = self.timed_seconds * 1e3 / self.timed_steps
                print(f"{self.name}: the host's ms a step: {parts} (a step {step:.2f})", flush=True)

    @property
    def timed_seconds(self) -> float:
        """The timed steps' wall time, the recordings within them left out."""
        return self.end - self.steady_start - self.seconds_left_out

    @property
    def samples_per_second(self) -> float:
        return self.timed_steps * self.batch_size / self.timed_seconds

    def host_parts(self) -> dict[str, float]:
        """The timed steps' host milliseconds a step in each part of `host_seconds`, in the rest of the loop, and
        waiting at the end for the work the host had queued ("the device's backlog": how far ahead of the device
        the host ran, a step's share); the recordings left out of the rate are left out of `TRAINING_STEP`, where
        they ran."""
        seconds = {part: total - self.host_seconds_at_steady_start[part] for part, total in self.host_seconds.items()}
        if TRAINING_STEP in seconds:
            seconds[TRAINING_STEP] -= self.seconds_left_out
        seconds["the rest"] = self.host_end - self.steady_start - self.seconds_left_out - sum(seconds.values())
        seconds["the device's backlog"] = self.end - self.host_end
        return {part: total * 1e3 / self.timed_steps for part, total in seconds.items()}


class StepProfiler(TrainerCallback):
    """Profiles what the device runs in the Trainer's optimizer steps `after_step + 1` to `after_step + steps`
    (`bench/kernel_profile.py`), kept in `kernels`; their wall time per step in `wall_seconds`."""

    def __init__(self, after_step: int, steps: int, device: torch.device, synchronize: Callable[[], None]):
        self.after_step = after_step
        self.steps = steps
        self.device = device
        self.synchronize = synchronize
        self.profiler = None
        self.start = None
        self.kernels: KernelProfile | None = None
        self.wall_seconds = None

    def on_step_end(self, args, state, control, **kwargs):
        # With no steps to profile, a profiler started at the last step would never be stopped.
        if self.steps and state.global_step == self.after_step:
            self.synchronize()
            self.profiler = profiler_for(self.device)
            self.profiler.start()
            self.start = time.perf_counter()
        elif state.global_step == self.after_step + self.steps and self.profiler is not None:
            self.synchronize()
            self.wall_seconds = (time.perf_counter() - self.start) / self.steps
            self.profiler.stop()
            self.kernels = summarize(self.profiler, self.device, self.steps)
            self.profiler = None


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Benchmark:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.budget = TimeBudget(args.time_budget)
        self.rows: dict[str, Row] = {}
        # The fastest synthetic variant so far: its step (model, optimizer, graphs) and its samples/s.
        self.fast_path: tuple[TrainingStep, float] | None = None
        # The rows still to run, in order.
        self.pending: list[str] = []
        self.work_dir = tempfile.TemporaryDirectory(prefix="rwsan-bench-")
        rng = np.random.default_rng(0)
        config = self.model_config()
        self.items = synthetic_items(config, args.pool_batches * args.batch_size, rng)
        self.pools = {
            (bucketed, grouped): self.synthetic_pool(bucketed, grouped)
            for bucketed, grouped in ((False, False), (True, False), (True, True), (False, True))
        }
        self._dataset = None

    def model_config(self) -> RWSANConfig:
        return RWSANConfig(**TINY_SIZES) if self.args.tiny else RWSANConfig()

    def build_model(self, attn_implementation: str) -> RWSANForVQA:
        return build_model(self.model_config(), attn_implementation, self.device)

    def collator(self, bucketed: bool, packed: bool = False) -> VQACollator:
        return VQACollator(
            self.model_config().num_labels,
            max_regions=MAX_REGIONS,
            max_question_length=self.model_config().max_question_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of if bucketed else None,
            pack_regions=packed,
        )

    def synthetic_pool(self, bucketed: bool, grouped: bool) -> list[dict[str, torch.Tensor]]:
        batches = collated_batches(self.items, self.args.batch_size, self.collator(bucketed), grouped, seed=0)
        return [model_inputs(batch, self.device) for batch in batches]

    def synchronize(self):
        synchronize(self.device)

    # -- running rows

    def run(self, keys: list[str], after_row: Callable[[], object] = lambda: None):
        """Runs the rows `keys` in `RUN_ORDER`, calling `after_row` after each."""
        self.pending = [key for key in RUN_ORDER if key in keys]
        while self.pending:
            key = self.pending.pop(0)
            if key in TRAINER_ROWS:
                # The Trainer builds its own model; the memory of the fast path would count in its row.
                self.release_compiled_state()
            self.run_row(key)
            after_row()
        self.release_compiled_state()

    def fast_path_needed(self) -> bool:
        return any(key in self.pending for key in FAST_PATH_REUSERS)

    def run_row(self, key: str):
        title = VARIANTS[key].title if key in VARIANTS else key
        section = "data pipeline" if key.startswith("loader") else "train_vqa" if key in TRAINER_ROWS else "synthetic"
        needed = self.seconds_needed(key)
        skip_reason = self.skip_reason(key)
        if skip_reason is None and self.budget.left() < needed:
            skip_reason = f"skipped: {self.budget.left():.0f} s of --time_budget left, it needs about {needed:.0f} s"
        print(f"\n== {key}: {skip_reason or 'running'}", flush=True)
        if skip_reason is not None:
            self.rows[key] = Row(key, title, section, note=skip_reason)
            return
        measure = getattr(self, f"measure_{key}", None) or (lambda: self.measure_variant(key))
        peak = PeakMemory(self.device)
        try:
            if section != "synthetic":
                # Generated and prepared once a run, before any row's peak memory is taken.
                self.dataset()
            with peak:
                row = measure()
            row.peak_memory_bytes = peak.bytes
        except Exception as error:  # one failing row must not stop the others
            traceback.print_exc()
            row = Row(key, title, section, error=f"{type(error).__name__}: {error}"[:500])
            if key in TRAINER_ROWS or compiles(key):
                # Nothing reuses the graphs (and CUDA graph memory pools) of a failed compiled row.
                torch._dynamo.reset()
        self.release_memory()
        row.section = section
        self.rows[key] = row
        print(format_row(row, self.rows), flush=True)

    def seconds_needed(self, key: str) -> float:
        compiling = compiles(key) or (key in FASTEST_TRAINER_ROWS and self.device.type == "cuda")
        return self.args.compile_seconds if compiling else self.args.seconds_per_row

    def skip_reason(self, key: str) -> str | None:
        variant = VARIANTS.get(key)
        needs_cuda = key in CUDA_ONLY_TRAINER_ROWS or (variant is not None and variant.needs_cuda)
        if needs_cuda and self.device.type != "cuda":
            return "skipped: needs a CUDA device"
        if compiles(key) and self.device.type == "cpu" and not self.args.compile_on_cpu:
            return "skipped: compiling takes minutes on a CPU (--compile_on_cpu runs it)"
        if key in FAST_PATH_REUSERS and self.fast_path is None:
            return "skipped: no fast variant ran"
        twins = {"loader_in_process": "loader_packed", "trainer_in_process": "trainer"}
        if key in twins and self.args.num_workers == 0:
            return f"skipped: {twins[key]} loads in the main process too (--num_workers 0)"
        return None

    # -- synthetic rows

    def measure_variant(self, key: str) -> Row:
        variant = VARIANTS[key]
        step = TrainingStep(self.build_model(variant.attn_implementation), variant, self.device)
        pool = self.pools[(variant.bucketed, False)]
        # A bucketed (compiled or graphed) variant meets every padded shape before timing: the data rows bring the
        # rarer ones too.
        warmup = [resized_batch(pool[0], *shape) for shape in self.bucket_shapes()] if variant.bucketed else []
        row = self.measure(key, variant.title, step, pool_rounds(pool), warmup, len(pool))
        faster = self.fast_path is None or row.samples_per_second > self.fast_path[1]
        if key in FAST_PATH_CANDIDATES and faster and self.fast_path_needed():
            self.fast_path = (step, row.samples_per_second)
        return row

    def measure_grouped(self) -> Row:
        step, _ = self.fast_path
        pool = self.pools[(step.variant.bucketed, True)]
        title = f"{step.variant.title} + region-grouped batches"
        # The shapes of the grouped batches are among those the fast path has warmed up on.
        return self.measure("grouped", title, step, pool_rounds(pool), [], len(pool))

    def bucket_shapes(self) -> list[tuple[int, int]]:
        return bucket_shapes(self.model_config().max_question_length, self.args.pad_to_multiple_of)

    def measure(
        self,
        key: str,
        title: str,
        step: TrainingStep,
        batches: Callable[[], Iterator[dict[str, torch.Tensor]]],
        warmup_batches: list[dict[str, torch.Tensor]],
        round_length: int = 1,
    ) -> Row:
        """Warms up on every batch of `warmup_batches` (each padded shape) and on `batches()`, then times as many
        steps of a second `batches()` as fit in --seconds_per_row (at most --steps), a whole number of rounds of
        `round_length` batches, at least one unless --steps is fewer (so that every variant times the same batches
        of a pool)."""
        start = time.perf_counter()
        for batch in warmup_batches:
            for _ in range(self.args.warmup_steps):
                step(batch)
        warmup_stream = batches()
        for _ in range(self.args.warmup_steps):
            self.synchronize()
            step_start = time.perf_counter()
            step(next(warmup_stream))
        self.synchronize()
        # The last warm-up step tells how many timed steps fit in --seconds_per_row.
        step_seconds = time.perf_counter() - step_start
        warmup_seconds = time.perf_counter() - start
        print(f"   warm-up (compilation included) {warmup_seconds:.1f} s", flush=True)
        num_steps = timed_step_count(step_seconds, self.args.seconds_per_row, self.args.steps, round_length)

        graphs = compiled_graph_count()
        shapes = []
        timed_stream = batches()
        start = time.perf_counter()
        for _ in range(num_steps):
            batch = next(timed_stream)
            shapes.append(padded_shape(batch))
            loss = step(batch)
        self.synchronize()
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss of {title} became {loss.item()}")
        note = "recompiled while timed" if compiled_graph_count() != graphs else ""
        return self.timed_row(key, title, shapes, elapsed, warmup_seconds, note)

    def timed_row(
        self, key: str, title: str, shapes: list[tuple[int, int]], elapsed: float, warmup_seconds: float, note: str
    ) -> Row:
        """The row of `len(shapes)` timed batches of --batch_size, padded to `shapes` (question length, regions)."""
        return Row(
            key,
            title,
            "",
            samples_per_second=len(shapes) * self.args.batch_size / elapsed,
            warmup_seconds=warmup_seconds,
            timed_steps=len(shapes),
            note=note,
            **mean_padded_shape(shapes),
        )

    def release_compiled_state(self):
        """Drops the fast path kept for the rows reusing it, and every compiled graph (CUDA graph pools included)."""
        self.fast_path = None
        torch._dynamo.reset()
        self.release_memory()

    def release_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif GLIBC is not None:
            # Hands freed heap memory back to the system, so that the next row's resident set starts low again.
            GLIBC.malloc_trim(0)

    # -- real data pipeline

    def dataset(self):
        if self._dataset is None:
            root = self.args.dataset_dir or Path(self.work_dir.name)
            prepared = root / "prepared"
            config = self.model_config()
            start = time.perf_counter()
            settings = {"num_images": self.args.num_images, "tiny": self.args.tiny}
            writer = functools.partial(write_raw_vqa, config=config, num_images=self.args.num_images)
            generate_once(root / "raw", settings, writer, prepared)
            if not prepared.is_dir():
                prepare_vqa(
                    root / "raw",
                    prepared,
                    num_proc=min(8, os.cpu_count() or 1),
                    feature_size=config.image_feature_size,
                )
                print(
                    f"   generated and prepared the data set in {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
            dataset = load_vqa_dataset(prepared, "train")
            if len(dataset) < self.args.batch_size:
                # The DataLoader (drop_last) would give no batch, and the rows would wait for one forever.
                raise ValueError(
                    f"{prepared} has {len(dataset)} training questions, fewer than one batch of --batch_size "
                    f"{self.args.batch_size}; give a smaller --batch_size or more --num_images"
                )
            if dataset.num_answers != config.num_labels:
                raise ValueError(
                    f"{prepared} has {dataset.num_answers} answers but the model {config.num_labels}; "
                    "give another --dataset_dir (this one was made with or without --tiny)"
                )
            self._dataset = dataset
        return self._dataset

    def data_loader(self, dataset, packed: bool, workers: int, bucketed: bool = True) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            collate_fn=self.collator(bucketed=bucketed, packed=packed),
            generator=torch.Generator().manual_seed(0),
        )

    def measure_loader(self, key: str = "loader", packed: bool = False, workers: int | None = None) -> Row:
        workers = self.args.num_workers if workers is None else workers
        dataset = self.dataset()
        batches = endless(self.data_loader(dataset, packed, workers))
        start = time.perf_counter()
        next(batches)
        warmup_seconds = time.perf_counter() - start
        num_batches = self.args.loader_batches
        shapes = []
        start = time.perf_counter()
        for _ in range(num_batches):
            batch = next(batches)
            shapes.append(padded_shape(batch))
        elapsed = time.perf_counter() - start
        what = "packed regions" if packed else f"pad_to_multiple_of {self.args.pad_to_multiple_of}"
        title = f"DataLoader alone ({workers} workers, {what})"
        return self.timed_row(key, title, shapes, elapsed, warmup_seconds, f"{len(dataset)} questions")

    def measure_loader_packed(self) -> Row:
        return self.measure_loader("loader_packed", packed=True)

    def measure_loader_in_process(self) -> Row:
        return self.measure_loader("loader_in_process", packed=True, workers=0)

    def measure_loader_training(self) -> Row:
        step, _ = self.fast_path
        # Padded as the variant's own batches, so that the row differs from it by the loading alone.
        loader = self.data_loader(
            self.dataset(), packed=True, workers=self.args.num_workers, bucketed=step.variant.bucketed
        )
        # One stream of batches for the warm-up and the timed steps alike.
        stream = (unpack_image_features(model_inputs(batch, self.device)) for batch in endless(loader))
        title = f"{step.variant.title}, fed by the DataLoader"
        return self.measure("loader_training", title, step, lambda: stream, [])

    def measure_trainer(self) -> Row:
        """`VQATrainer` as train_vqa.py runs it with the fast-path options (bf16, fused AdamW, bucketed padding,
        DataLoader workers with pinned memory), on CUDA with its fastest: `--compile_blocks --cuda_graphs
        --group_by_regions --pack_regions`."""
        return self.measure_trainer_with("trainer", **self.fastest_trainer_options())

    def measure_trainer_in_process(self) -> Row:
        """The same, loading in the main process."""
        return self.measure_trainer_with("trainer_in_process", **self.fastest_trainer_options(), workers=0)

    def measure_trainer_blocking(self) -> Row:
        """The same, with each batch copied to the GPU only after the steps queued before it are done."""
        return self.measure_trainer_with("trainer_blocking", **self.fastest_trainer_options(), blocking_copies=True)

    def measure_trainer_encoders(self) -> Row:
        """The same with the encoders compiled instead of the blocks (CUDA only)."""
        options = {**self.fastest_trainer_options(), "compiled": "encoders"}
        return self.measure_trainer_with("trainer_encoders", **options)

    def fastest_trainer_options(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "compiled": "blocks" if cuda else None,
            "cuda_graphs": cuda,
            "group_by_regions": cuda,
            "pack_regions": cuda,
        }

    def measure_trainer_graphs(self) -> Row:
        """The same with `--cuda_graphs` alone (CUDA only)."""
        return self.measure_trainer_with("trainer_graphs", cuda_graphs=True)

    def measure_trainer_with(
        self,
        key: str,
        compiled: str | None = None,
        cuda_graphs: bool = False,
        group_by_regions: bool = False,
        pack_regions: bool = False,
        workers: int | None = None,
        blocking_copies: bool = False,
    ) -> Row:
        cuda = self.device.type == "cuda"
        workers = self.args.num_workers if workers is None else workers
        dataset = self.dataset()
        warmup_steps = self.args.warmup_steps * len(self.bucket_shapes()) if cuda else self.args.warmup_steps
        mega_batch = trainer_mega_batch(len(dataset), self.args.batch_size)
        if group_by_regions:
            # Batches come sorted by regions within mega-batches: one whole mega-batch meets every padded shape.
            warmup_steps = max(warmup_steps, mega_batch)
        timed_end = warmup_steps + self.args.trainer_steps
        profiled_after = profile_start(timed_end, self.args.profile_steps, mega_batch if group_by_regions else None)
        training_args = self.trainer_arguments(
            key,
            workers,
            max_steps=profiled_after + self.args.profile_steps,
            compile_blocks=compiled == "blocks",
            cuda_graphs=cuda_graphs,
            group_by_regions=group_by_regions,
            dataloader_drop_last=True,
            # None: VQATrainingArguments' default, copies that do not wait where batches are pinned.
            accelerator_config={"non_blocking": False} if blocking_copies else None,
        )
        model = self.build_model(self.args.attn_implementation)
        if compiled == "encoders":
            compile_encoders(model, dynamic=True)
        trainer = ShapeRecordingTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=self.collator(bucketed=True, packed=pack_regions),
        )
        # The timer before the profiler: at a step both act on, the timed window must end before profiling starts.
        timer = SteadyStateTimer(
            warmup_steps,
            self.args.trainer_steps,
            self.synchronize,
            self.args.batch_size,
            key,
            recordings=functools.partial(cuda_graph_recordings, trainer),
            padded_shapes=trainer.padded_shapes,
            host_seconds=trainer.host_clock.seconds,
        )
        profiler = StepProfiler(profiled_after, self.args.profile_steps, self.device, self.synchronize)
        trainer.add_callback(timer)
        trainer.add_callback(profiler)
        try:
            trainer.train()
        finally:
            # Workers left to the garbage collector would each wait 5 s before being killed (about 45 s of device
            # time with 8 workers and the pinning thread, inferred), also where the row fails.
            trainer.stop_dataloader_workers()
        notes = list(timer.notes)
        if trainer.batch_copy is not None:
            notes.append("batches copied on a side stream")
        flags = {
            "--attn_implementation eager": self.args.attn_implementation == "eager",
            "--compile_blocks": compiled == "blocks",
            "compiled encoders (bench only)": compiled == "encoders",
            "--cuda_graphs": cuda_graphs,
            "--group_by_regions": group_by_regions,
            "--pack_regions": pack_regions,
        }
        row = Row(
            key,
            trainer_title(workers, blocking_copies, training_args.bf16, flags),
            "",
            samples_per_second=timer.samples_per_second,
            warmup_seconds=timer.steady_start - timer.train_start,
            timed_steps=self.args.trainer_steps,
            note=", ".join(notes),
            recording_seconds_left_out=timer.seconds_left_out,
            host_milliseconds_per_step=timer.host_milliseconds or None,
            kernel_profile=profiler.kernels,
            **mean_padded_shape(timer.timed_shapes),
        )
        if profiler.kernels is not None:
            steps = f"steps {profiled_after + 1}-{profiled_after + profiler.steps}"
            print_kernel_profile(
                profiler.kernels, f"{key}, {profiler.steps} steps ({steps})", self.device, profiler.wall_seconds
            )
        del trainer
        self.release_compiled_state()
        return row

    def measure_evaluate(self) -> Row:
        return self.measure_evaluation("evaluate", cuda_graphs=False)

    def measure_evaluate_graphs(self) -> Row:
        return self.measure_evaluation("evaluate_graphs", cuda_graphs=True)

    def measure_evaluation(self, key: str, cuda_graphs: bool) -> Row:
        """Two `VQATrainer.evaluate` passes over the first --eval_questions questions, the second timed (the first
        records the graphs); packed regions on CUDA, with or without graphs."""
        dataset = self.dataset()
        questions = Subset(dataset, range(min(len(dataset), self.args.eval_questions)))
        arguments = self.trainer_arguments(key, self.args.num_workers, cuda_graphs=cuda_graphs)
        trainer = VQATrainer(
            model=self.build_model(self.args.attn_implementation),
            args=arguments,
            eval_dataset=questions,
            data_collator=self.collator(bucketed=True, packed=self.device.type == "cuda"),
            # The answers are kept and moved to the host, as for the metric, which itself is left out.
            compute_metrics=lambda prediction: {},
            preprocess_logits_for_metrics=answer_indices,
        )
        try:
            start = time.perf_counter()
            trainer.evaluate()
            warmup_seconds = time.perf_counter() - start
            start = time.perf_counter()
            trainer.evaluate()
            self.synchronize()
            elapsed = time.perf_counter() - start
        finally:
            trainer.stop_dataloader_workers()  # as after a Trainer row
        options = [precision_name(arguments.bf16)]
        options += ["--attn_implementation eager"] * (self.args.attn_implementation == "eager")
        options += ["--pack_regions"] * (self.device.type == "cuda") + ["--cuda_graphs"] * cuda_graphs
        row = Row(
            key,
            f"VQATrainer.evaluate ({', '.join(options)}, batch {arguments.per_device_eval_batch_size}, "
            f"{self.args.num_workers} workers)",
            "",
            samples_per_second=len(questions) / elapsed,
            warmup_seconds=warmup_seconds,
            timed_steps=-(-len(questions) // arguments.per_device_eval_batch_size),
            note=f"{len(questions)} questions",
        )
        del trainer
        self.release_compiled_state()
        return row

    def trainer_arguments(self, key: str, workers: int, **options) -> VQATrainingArguments:
        """The fast-path arguments of train_vqa.py (bf16, fused AdamW, pinned memory on CUDA) and `options`."""
        cuda = self.device.type == "cuda"
        return VQATrainingArguments(
            output_dir=str(Path(self.work_dir.name) / key),
            per_device_train_batch_size=self.args.batch_size,
            bf16=bf16_supported(self.device),
            optim="adamw_torch_fused",
            dataloader_num_workers=workers,
            dataloader_pin_memory=cuda,
            dataloader_persistent_workers=workers > 0,
            eval_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=not cuda,
            seed=0,
            **options,
        )


def precision_name(bf16: bool) -> str:
    """What a Trainer row computes in: bf16 where the device has it (`bf16_supported`), else fp32."""
    return "bf16" if bf16 else "fp32"


def trainer_title(workers: int, blocking_copies: bool, bf16: bool, flags: dict[str, bool]) -> str:
    """A Trainer row's title; what tells the Trainer rows apart comes first, as the table cuts titles to
    TITLE_WIDTH."""
    loading = f"{workers} workers" + (", blocking copies" if blocking_copies else "")
    options = [precision_name(bf16)] + [flag for flag, given in flags.items() if given] + ["adamw_torch_fused"]
    return f"train_vqa Trainer ({loading}; {', '.join(options)})"


def cuda_graph_recordings(trainer: VQATrainer) -> tuple[int, float]:
    """The CUDA graphs of training steps the trainer has recorded so far (--cuda_graphs), those recorded again too,
    and the seconds they took."""
    if trainer.graphed_passes is None:
        return 0, 0.0
    passes = trainer.graphed_passes[1]
    return passes.recordings, passes.recording_seconds


def trainer_mega_batch(num_questions: int, batch_size: int) -> int:
    """Batches in a mega-batch of the Trainer's length-grouped sampler on a set of `num_questions` (transformers'
    `get_length_grouped_indices`: 50, or fewer so that the set makes 4 of them); 50 at the paper's 3,129 answers."""
    return max(1, min(num_questions // (batch_size * 4), TRAINER_MEGA_BATCHES))


def profile_start(timed_end: int, profile_steps: int, mega_batch: int | None) -> int:
    """The step after which a Trainer row's profiled steps begin: the last timed one, or, where batches are grouped by
    regions in mega-batches of `mega_batch` batches (each sorted largest first), the one that centres them in the
    next mega-batch, where batches are of middling size; right after the timed steps they would be the largest."""
    if mega_batch is None or not profile_steps:
        return timed_end
    next_mega_batch = -(-timed_end // mega_batch) * mega_batch
    return max(timed_end, next_mega_batch + (mega_batch - profile_steps) // 2)


def timed_step_count(step_seconds: float, seconds: float, max_steps: int, round_length: int) -> int:
    """How many steps of `step_seconds` to time: as many as fit in `seconds`, at most `max_steps`, in whole rounds of
    `round_length` batches, at least one unless `max_steps` is fewer. Rows that timed different batches of a pool
    would compare different work (region counts differ by batch), so a slow row may take longer than `seconds`."""
    num_steps = max(1, min(max_steps, int(seconds / step_seconds)))
    if round_length > max_steps:
        return num_steps
    return max(round_length, num_steps - num_steps % round_length)


def pool_rounds(pool: list[dict[str, torch.Tensor]]) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
    """The pool's batches over and over, from the first, each time it is called."""
    return lambda: itertools.cycle(pool)


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------------- output


def ratio(row: Row, rows: dict[str, Row], baseline: str) -> str:
    """The row's training rate over `baseline`'s, or "-" (rows that do not train: loading, evaluation)."""
    reference = rows.get(baseline)
    if (
        row.key in NOT_TRAINING_ROWS
        or row.samples_per_second is None
        or not (reference and reference.samples_per_second)
    ):
        return "-"
    return f"{row.samples_per_second / reference.samples_per_second:.2f}x"


def format_memory(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def format_row(row: Row, rows: dict[str, Row]) -> str:
    rate = "-" if row.samples_per_second is None else f"{row.samples_per_second:,.1f}"
    warmup = "-" if row.warmup_seconds is None else f"{row.warmup_seconds:.1f}"
    shape = (
        "-"
        if row.mean_padded_regions is None
        else f"{row.mean_padded_question_length:.1f} x {row.mean_padded_regions:.1f}"
    )
    remark = (row.error or row.note)[:160]
    return (
        f"{row.title[:TITLE_WIDTH]:{TITLE_WIDTH}s} {rate:>10s} {ratio(row, rows, 'original'):>9s} "
        f"{ratio(row, rows, 'fp32_eager'):>8s} "
        f"{format_memory(row.peak_memory_bytes):>10s} {warmup:>8s} {shape:>12s}  {remark}"
    )


def print_table(rows: dict[str, Row], header: str):
    print(f"\n{header}")
    print(
        f"{'variant':{TITLE_WIDTH}s} {'samples/s':>10s} {'/original':>9s} {'/fp32':>8s} {'peak mem':>10s} "
        f"{'warm-up':>8s} {'padded TxR':>12s}  note"
    )
    section = None
    for key in ROWS:
        if key in rows:
            if rows[key].section != section:
                section = rows[key].section
                print(f"-- {section}")
            print(format_row(rows[key], rows))


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def inductor_options(parser: argparse.ArgumentParser, given: list[str]) -> dict[str, Any]:
    """--inductor_option NAME=VALUE texts as {name: value}: each name one of `torch._inductor.config`'s, each value a
    Python literal of its setting's type (a misspelt name would otherwise leave the row as it was, unnoticed)."""
    settings = torch._inductor.config.get_config_copy()
    options = {}
    for text in given:
        name, equals, value_text = text.partition("=")
        if not equals:
            parser.error(f"--inductor_option {text!r}: give NAME=VALUE")
        if name not in settings:
            parser.error(f"--inductor_option {text!r}: torch._inductor.config has no setting {name!r}")
        try:
            value = ast.literal_eval(value_text)
        except (ValueError, SyntaxError):
            value = value_text
        default = settings[name]
        if (
            default is not None
            and type(value) is not type(default)
            and not (isinstance(default, float) and type(value) is int)
        ):
            parser.error(
                f"--inductor_option {text!r}: {name} takes a {type(default).__name__} (it is {default!r}), "
                f"got {value!r}"
            )
        options[name] = value
    return options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="Small sizes for a CPU run under 5 minutes.")
    parser.add_argument("--tiny", action="store_true", help="A tiny model and data set: a smoke test, no figures.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated rows to run, of {', '.join(ROWS)}.")
    parser.add_argument("--batch_size", type=int, help=f"Default {PAPER_BATCH_SIZE} (the paper's); 32 with --quick.")
    parser.add_argument("--steps", type=int, help="Most timed steps per row (default 200; 6 with --quick).")
    parser.add_argument("--seconds_per_row", type=float, help="Timed seconds per row (default 5; 40 with --quick).")
    parser.add_argument("--warmup_steps", type=int, help="Untimed steps per padded shape (default 3; 1 with --quick).")
    parser.add_argument("--time_budget", type=float, default=270.0, help="Seconds for the rows (default 270).")
    parser.add_argument(
        "--compile_seconds",
        type=float,
        default=90.0,
        help="Budget a compiled row needs to start (default 90).",
    )
    parser.add_argument(
        "--pad_to_multiple_of",
        type=int,
        default=20,
        help="VQACollator rounding of padded lengths (default 20).",
    )
    parser.add_argument("--pool_batches", type=int, help="Synthetic batches per pool (default 16; 4 with --quick).")
    parser.add_argument("--num_workers", type=int, help="DataLoader workers (default 8 on CUDA, 0 on a CPU).")
    parser.add_argument("--dataset_dir", type=Path, help="Keep the generated data set here and reuse it.")
    parser.add_argument("--num_images", type=int, help="Images of the generated set (default 600; 100 with --quick).")
    parser.add_argument("--loader_batches", type=int, help="Batches timed for the DataLoader (default 300; 10 quick).")
    parser.add_argument("--trainer_steps", type=int, help="Timed Trainer steps (default 200; 3 with --quick).")
    parser.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        help="Trainer steps profiled after the timed ones, their kernels printed and kept in the JSON (default 0).",
    )
    parser.add_argument(
        "--eval_questions", type=int, help="Questions of the evaluation rows (default 12,800; 256 with --quick)."
    )
    parser.add_argument(
        "--inductor_option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="An inductor setting for every compiled row, e.g. combo_kernels=True (torch._inductor.config; repeat "
        "the option for several).",
    )
    parser.add_argument(
        "--attn_implementation",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="The attention of the Trainer and evaluation rows, as train_vqa.py's --attn_implementation (default "
        "sdpa); the other rows' is in their names.",
    )
    parser.add_argument("--compile_on_cpu", action="store_true", help="Also run the compiled row on a CPU.")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's).")
    args = parser.parse_args(argv)

    quick = args.quick or args.tiny
    defaults = {
        "batch_size": 32 if args.quick else PAPER_BATCH_SIZE,
        "steps": 6 if quick else 200,
        "seconds_per_row": 40.0 if quick else 5.0,
        "warmup_steps": 1 if quick else 3,
        "pool_batches": 4 if quick else 16,
        "num_images": 100 if quick else 600,
        "loader_batches": 10 if quick else 300,
        "trainer_steps": 3 if quick else 200,
        "eval_questions": 256 if quick else 12_800,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    # Checked now: the file is written after the first row, which may take minutes.
    if args.json is not None and (problem := file_writing_problem(args.json, "bench.json")):
        parser.error(f"--json: {problem}")
    require_at_least(
        parser,
        args,
        1,
        "batch_size",
        "steps",
        "warmup_steps",
        "pool_batches",
        "num_images",
        "loader_batches",
        "trainer_steps",
        "eval_questions",
        "threads",
    )
    require_at_least(parser, args, 0, "profile_steps", "num_workers")
    args.device = checked_device(parser, args.device)
    args.inductor_options = inductor_options(parser, args.inductor_option)
    if not 1 <= args.pad_to_multiple_of <= MAX_REGIONS:
        parser.error(f"--pad_to_multiple_of must be in [1, {MAX_REGIONS}], got {args.pad_to_multiple_of}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    if args.num_workers is None:
        # On a CPU the training threads need every core: a worker process there slows training more than loading
        # in the main process does (a few milliseconds per batch).
        args.num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0

    start = time.perf_counter()
    benchmark = Benchmark(args, device)
    config = benchmark.model_config()
    # What the table's header says of the model and the synthetic items, kept in the JSON too.
    workload = {
        "parameters": RWSANForVQA(config).num_parameters(),
        "answers": config.num_labels,
        "mean_regions": float(np.mean([len(item["image_features"]) for item in benchmark.items])),
        "mean_question_words": float(np.mean([len(item["input_ids"]) for item in benchmark.items])),
    }
    header = (
        f"{device_description(device)}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"batch {args.batch_size}; {'tiny' if args.tiny else 'paper'} configuration "
        f"({workload['parameters']:,} parameters, {workload['answers']} answers); regions {MIN_REGIONS}-"
        f"{MAX_REGIONS} (mean {workload['mean_regions']:.1f}), question words mean "
        f"{workload['mean_question_words']:.1f}"
    )
    if args.inductor_options:
        header += f"; inductor settings {args.inductor_options}"
    print(header, flush=True)

    def results(finished: bool) -> dict:
        """The run's results so far, written to --json: after each row too, so that a run cut off by a time limit
        (a device session's) keeps the rows it measured."""
        measured = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "device": device_description(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "workload": workload,
            "arguments": {
                name: str(value) if isinstance(value, (Path, torch.device)) else value
                for name, value in vars(args).items()
            },
            "rows": [asdict(benchmark.rows[key]) for key in ROWS if key in benchmark.rows],
            "finished": finished,
            "total_seconds": time.perf_counter() - start,
        }
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(measured, indent=2, default=str) + "\n")
        return measured

    with torch._inductor.config.patch(args.inductor_options):
        benchmark.run(args.rows.split(","), after_row=lambda: results(finished=False))
    print_table(benchmark.rows, header)
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)
    final = results(finished=True)
    if args.json is not None:
        print(f"wrote {args.json}")
    benchmark.work_dir.cleanup()
    return final


if __name__ == "__main__":
    main()
