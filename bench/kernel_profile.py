"""What the device runs during a few training steps, summed by kernel name: for bench/profile_step.py's synthetic step
and bench/train_throughput.py's Trainer rows (--profile_steps).

On CUDA the events are the kernels and copies the device ran, graph replays included. On a CPU they are the
operators (each with its own time, without the operators it calls) and the kernels inductor generated; the count
of those kernels and of the operators called from outside any operator (views included) stands in for the
kernels a GPU would launch.
"""

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# In the names of the C++ kernels inductor generates for the CPU (recorded with `cpp.enable_kernel_profile`).
INDUCTOR_CPU_KERNEL = "cpp_fused_"
TABLE_ROWS = 30


@dataclass
class KernelProfile:
    """Per step: how many launches, their summed time, and the busiest kernel names as (name, count, ms)."""

    steps: int
    launches_per_step: float
    milliseconds_per_step: float
    by_name: list[tuple[str, float, float]]


def profiler_for(device: torch.device) -> profile:
    return profile(activities=[ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU])


def work_events(profiler: profile, device: torch.device) -> tuple[list[tuple[str, float]], int]:
    """(name, microseconds) of each kernel (CUDA), or of each operator (its own time) and each inductor kernel
    (CPU); and the number of launches: the kernels (CUDA), or the inductor kernels and the operators not called by
    another operator (CPU)."""
    if device.type == "cuda":
        kernels = [
            (event.name, event.time_range.elapsed_us())
            for event in profiler.events()
            if event.device_type == DeviceType.CUDA
        ]
        return kernels, len(kernels)

    def is_operator(event) -> bool:
        return event is not None and event.name.startswith("aten::")

    events = [
        event
        for event in profiler.events()
        if event.device_type == DeviceType.CPU and (is_operator(event) or INDUCTOR_CPU_KERNEL in event.name)
    ]
    launches = sum(not is_operator(event.cpu_parent) for event in events)
    return [(event.name, event.self_cpu_time_total) for event in events], launches


def summarize(profiler: profile, device: torch.device, steps: int) -> KernelProfile:
    """The events of `steps` profiled steps, per step, the busiest first."""
    events, launches = work_events(profiler, device)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, microseconds in events:
        by_name[name].append(microseconds)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    return KernelProfile(
        steps=steps,
        launches_per_step=launches / steps,
        milliseconds_per_step=sum(microseconds for _, microseconds in events) / steps / 1e3,
        by_name=[(name, len(times) / steps, sum(times) / steps / 1e3) for name, times in ranked[:TABLE_ROWS]],
    )


def print_kernel_profile(kernels: KernelProfile, title: str, device: torch.device, wall_seconds: float):
    """The summary as a table, its total set against the step's wall time: near 100% the step is bound by the
    device's work, far below it by launching that work."""
    what = "kernels and copies" if device.type == "cuda" else "outermost operators and compiled kernels"
    print(
        f"\n{title}: wall {wall_seconds * 1e3:.2f} ms a step; {kernels.launches_per_step:.0f} {what} a step, "
        f"{kernels.milliseconds_per_step:.2f} ms of their time "
        f"({kernels.milliseconds_per_step / 1e3 / wall_seconds:.0%} of the wall)"
    )
    print(f"{'name':90s} {'count':>6s} {'ms':>8s} {'share':>6s}")
    for name, count, milliseconds in kernels.by_name:
        share = milliseconds / kernels.milliseconds_per_step
        print(f"{name[:90]:90s} {count:6.0f} {milliseconds:8.3f} {share:6.1%}")
