"""Where the time of one training step of the fast path goes, and how its speed grows with the batch size.

    python bench/profile_step.py           # a GPU: about a minute
    python bench/profile_step.py --tiny    # a smoke test on any device

The step is `bench/train_throughput.py`'s fast path (bf16 autocast, SDPA, fused Adam; on CUDA the forward and
backward passes recorded as a CUDA graph) on batches padded to the largest bucketed shape (16 words, 100 regions):

1. the device kernels of one step, grouped by name, with their count and time per step; their total set against the
   step's wall time says whether the step is bound by the work or by launching it. On a CPU: every operator, with
   its own time, and the kernels inductor generated; the count of those kernels and of the operators called from
   outside any operator (views included) stands in for the kernels a GPU would run;
2. samples/s of the step at several batch sizes (--batch_sizes), and of the attention implementations at the first.

With --compile blocks the two weight-shared blocks are compiled (`model.compile_blocks`, inductor) in every step;
with --compile encoders the two encoders that apply them (train_throughput.py's `encoders_graphed_passes`).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.arguments import checked_device, require_at_least  # noqa: E402
from bench.kernel_profile import print_kernel_profile, profiler_for, summarize  # noqa: E402
from bench.train_throughput import (  # noqa: E402
    GRAPH_WARMUP_PASSES,
    MAX_REGIONS,
    TINY_SIZES,
    TrainingStep,
    Variant,
    build_model,
    model_inputs,
    resized_batch,
    synthetic_items,
)
from rwsan import RWSANConfig  # noqa: E402
from rwsan.data import VQACollator  # noqa: E402
from rwsan.training import synchronize  # noqa: E402

PROFILED_STEPS = 3


def build_step(
    config: RWSANConfig, attn_implementation: str, device: torch.device, compile_scope: str | None
) -> TrainingStep:
    """The fast path's step; `compile_scope` "blocks" or "encoders" compiles those modules."""
    graphed = device.type == "cuda"
    title = f"bf16 + {attn_implementation} attention"
    compiled = {}
    if compile_scope is not None:
        title += f" + compiled {compile_scope}"
        compiled = {"compile_mode": "default", "compile_scope": compile_scope}
    title += " + CUDA-graphed passes" * graphed
    variant = Variant(
        title, attn_implementation, torch.bfloat16, fused_optimizer=True, graphed_passes=graphed, **compiled
    )
    return TrainingStep(build_model(config, attn_implementation, device), variant, device)


def full_batch(config: RWSANConfig, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of VQA-like items padded to the largest shape a bucketed batch has."""
    items = synthetic_items(config, batch_size, np.random.default_rng(0))
    collator = VQACollator(config.num_labels, max_regions=MAX_REGIONS, max_question_length=config.max_question_length)
    return model_inputs(resized_batch(collator(items), config.max_question_length, MAX_REGIONS), device)


def seconds_per_step(step: TrainingStep, batch: dict[str, torch.Tensor], steps: int) -> float:
    for _ in range(GRAPH_WARMUP_PASSES + 2):
        step(batch)
    synchronize(step.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    synchronize(step.device)
    return (time.perf_counter() - start) / steps


def print_profile(step: TrainingStep, batch: dict[str, torch.Tensor], wall_seconds: float):
    with profiler_for(step.device) as profiler:
        for _ in range(PROFILED_STEPS):
            step(batch)
        synchronize(step.device)
    title = f"{step.variant.title}, batch {len(batch['input_ids'])}"
    print_kernel_profile(summarize(profiler, step.device, PROFILED_STEPS), title, step.device, wall_seconds)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--tiny", action="store_true", help="A tiny model: a smoke test, no figures.")
    parser.add_argument("--batch_sizes", default="64,128,256", help="Comma-separated batch sizes (default 64,128,256).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per figure (default 20).")
    parser.add_argument(
        "--compile",
        choices=("blocks", "encoders"),
        help="Compile the shared blocks or the encoders applying them (minutes, once per batch size).",
    )
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "steps")
    try:
        args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch_sizes must be integers separated by commas, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch_sizes must be at least 1, got {min(args.batch_sizes)}")
    device = checked_device(parser, args.device)
    # Inductor's C++ kernels are seen by the profiler only when they record themselves; the setting is the
    # process's, so it is undone afterwards.
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": device.type == "cpu"}):
        report(args, device)


def report(args: argparse.Namespace, device: torch.device):
    config = RWSANConfig(**TINY_SIZES) if args.tiny else RWSANConfig()
    batch_sizes = args.batch_sizes

    step = build_step(config, "sdpa", device, args.compile)
    batch = full_batch(config, batch_sizes[0], device)
    print_profile(step, batch, seconds_per_step(step, batch, args.steps))

    print(f"\n{'step':40s} {'batch':>6s} {'ms/step':>9s} {'samples/s':>10s}")
    figures = [("sdpa", size) for size in batch_sizes] + [("eager", batch_sizes[0])]
    for attn_implementation, batch_size in figures:
        step = build_step(config, attn_implementation, device, args.compile)
        seconds = seconds_per_step(step, full_batch(config, batch_size, device), args.steps)
        rate = batch_size / seconds
        print(f"{step.variant.title:40s} {batch_size:6d} {seconds * 1e3:9.2f} {rate:10,.0f}", flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
