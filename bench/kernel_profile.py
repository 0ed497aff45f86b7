"""What the device runs during a few training steps, summed by kernel name: for bench/profile_step.py's synthetic step
and bench/train_throughput.py's Trainer rows (--profile_steps).

On CUDA the events are the kernels and copies the device ran, graph replays included. On a CPU they are the
operators (each with its own time, without the operators it calls) and the kernels inductor generated; the count
of those kernels and of the operators called from outside any operator (views included) stands in for the
kernels a GPU would launch.
"""

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# In the names of the C++ kernels inductor generates for the CPU (recorded with `cpp.enable_kernel_profile`).
INDUCTOR_CPU_KERNEL = "cpp_fused_"
TABLE_ROWS = 30
HOST_CALL_ROWS = 10
# What `torch.cuda.synchronize` calls: the profiling code ends each profile with it.
CLOSING_SYNCHRONIZE = "cudaDeviceSynchronize"


@dataclass
class KernelProfile:
    """Per step: how many launches, their summed time, and every kernel name as (name, count, ms), the busiest
    first (the printed table shows the first `TABLE_ROWS`). On CUDA also `timeline`, each kernel and copy of the
    profiled steps in the order the device ran them, as (name, start, duration) in microseconds from the first one's
    start: the gaps between them are the device's idle time, and the order says which part of a step ran what. And
    `host_calls`, the host's calls of the CUDA runtime and driver as (name, count, ms) per step, the longest first:
    a call that waits for the device (a synchronisation, a blocking copy) stands out by its time."""

    steps: int
    launches_per_step: float
    milliseconds_per_step: float
    by_name: list[tuple[str, float, float]]
    timeline: list[tuple[str, float, float]]
    host_calls: list[tuple[str, float, float]] = field(default_factory=list)


def profiler_for(device: torch.device) -> profile:
    return profile(activities=[ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU])


def device_timeline(profiler: profile) -> list[tuple[str, float, float]]:
    """(name, start, duration) of each CUDA kernel and copy in start order, in microseconds from the first start."""
    kernels = sorted(
        (event for event in profiler.events() if event.device_type == DeviceType.CUDA),
        key=lambda event: event.time_range.start,
    )
    origin = kernels[0].time_range.start if kernels else 0
    return [(event.name, event.time_range.start - origin, event.time_range.elapsed_us()) for event in kernels]


def host_cuda_calls(profiler: profile) -> list[tuple[str, float]]:
    """(name, microseconds) of each call of the CUDA runtime (`cuda...`) or driver (`cu...`) the host made, but the
    profile's last `cudaDeviceSynchronize`: the profiling code's own (`torch.cuda.synchronize`), which waits for the
    device's work before the profiler stops, so that the wall time covers it. Left in, it would read as a wait of
    the training loop's."""
    calls = sorted(
        (
            event
            for event in profiler.events()
            if event.device_type == DeviceType.CPU and re.match(r"cu[A-Z]|cuda[A-Z]", event.name)
        ),
        key=lambda event: event.time_range.start,
    )
    closing = max((index for index, event in enumerate(calls) if event.name == CLOSING_SYNCHRONIZE), default=None)
    return [(event.name, event.time_range.elapsed_us()) for index, event in enumerate(calls) if index != closing]


def per_step(events: list[tuple[str, float]], steps: int) -> list[tuple[str, float, float]]:
    """(name, count, ms) per step of each name in `events` (name, microseconds), the longest first."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, microseconds in events:
        by_name[name].append(microseconds)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    return [(name, len(times) / steps, sum(times) / steps / 1e3) for name, times in ranked]


def cpu_work_events(profiler: profile) -> tuple[list[tuple[str, float]], int]:
    """(name, microseconds) of each operator (its own time) and each inductor kernel, and the number of launches:
    the inductor kernels and the operators not called by another operator."""

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
    if device.type == "cuda":
        timeline = device_timeline(profiler)
        events, launches = [(name, microseconds) for name, _, microseconds in timeline], len(timeline)
        host_calls = per_step(host_cuda_calls(profiler), steps)
    else:
        timeline, host_calls = [], []
        events, launches = cpu_work_events(profiler)
    return KernelProfile(
        steps=steps,
        launches_per_step=launches / steps,
        milliseconds_per_step=sum(microseconds for _, microseconds in events) / steps / 1e3,
        by_name=per_step(events, steps),
        timeline=timeline,
        host_calls=host_calls,
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
    if kernels.timeline:
        _, last_start, last_duration = kernels.timeline[-1]
        span = (last_start + last_duration) / 1e3 / kernels.steps
        print(
            f"from the first kernel's start to the last one's end: {span:.2f} ms a step, of which the device ran "
            f"kernels for {kernels.milliseconds_per_step / span:.0%}"
        )
    print(f"{'name':90s} {'count':>6s} {'ms':>8s} {'share':>6s}")
    for name, count, milliseconds in kernels.by_name[:TABLE_ROWS]:
        share = milliseconds / kernels.milliseconds_per_step
        print(f"{name[:90]:90s} {count:6.0f} {milliseconds:8.3f} {share:6.1%}")
    if kernels.host_calls:
        print(f"the host's CUDA calls a step, the longest first (a step's wall {wall_seconds * 1e3:.2f} ms):")
        for name, count, milliseconds in kernels.host_calls[:HOST_CALL_ROWS]:
            # A call made less than once a step (once in the profile, say) shows as such.
            print(f"{name[:90]:90s} {count:6.2f} {milliseconds:8.3f}")
