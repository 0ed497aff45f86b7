"""The benchmark scripts other than train_throughput.py (tested with the fast path): small runs end to end, and
their refusals of counts that would fail after minutes of work."""

import json
import re

import pytest
import torch
from test_fast_path import load_bench_module

data_loading = load_bench_module("data_loading")
model_speed = load_bench_module("model_speed")
pipeline_latency = load_bench_module("pipeline_latency")
profile_step = load_bench_module("profile_step")
train_throughput = load_bench_module("train_throughput")
raw_vqa_files = load_bench_module("raw_vqa_files")

# 30 images of 3 questions: one batch of 64 per epoch, and answers frequent enough for a vocabulary.
SMALL_LOADING = ["--num_images", "30", "--feature_size", "16", "--num_proc", "1", "--batches", "2"]
SMALL_LOADING += ["--original_batches", "1"]


def test_data_loading_times_both_loaders_and_reuses_only_its_own_data(tmp_path, capsys):
    rates = data_loading.main([*SMALL_LOADING, "--dataset_dir", str(tmp_path)])
    assert rates["ours"] > 0 and rates["original"] > 0
    assert "generated 30 raw images" in capsys.readouterr().out
    # The same options reuse the kept data; others would time it as their own, and are refused.
    data_loading.main([*SMALL_LOADING, "--dataset_dir", str(tmp_path)])
    assert "generated" not in capsys.readouterr().out
    other_size = [*SMALL_LOADING, "--dataset_dir", str(tmp_path), "--num_images", "40"]
    message = f"error: {tmp_path} holds data generated with {{'num_images': 30, 'feature_size': 16}}, not"
    with pytest.raises(SystemExit, match=message):
        data_loading.main(other_size)


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        (data_loading, ["--num_images", "21"], "--num_images must be at least 22: 3 questions an image must make one"),
        (data_loading, ["--original_batches", "0"], "--original_batches must be at least 1, got 0"),
        (model_speed, ["--steps", "0"], "--steps must be at least 1, got 0"),
        (model_speed, ["--warmup", "-1"], "--warmup must be at least 0, got -1"),
        (pipeline_latency, ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (train_throughput, ["--threads", "0"], "--threads must be at least 1, got 0"),
        (train_throughput, ["--num_workers", "-1"], "--num_workers must be at least 0, got -1"),
        (
            train_throughput,
            ["--inductor_option", "combo_kernel=True"],
            "--inductor_option 'combo_kernel=True': torch._inductor.config has no setting 'combo_kernel'",
        ),
        (
            train_throughput,
            ["--inductor_option", "combo_kernels=1"],
            "--inductor_option 'combo_kernels=1': combo_kernels takes a bool (it is False), got 1",
        ),
        (
            train_throughput,
            ["--inductor_option", "combo_kernels"],
            "--inductor_option 'combo_kernels': give NAME=VALUE",
        ),
        (profile_step, ["--batch_sizes", "4,x"], "--batch_sizes must be integers separated by commas, got '4,x'"),
        (profile_step, ["--batch_sizes", "2,0"], "--batch_sizes must be at least 1, got 0"),
        pytest.param(
            pipeline_latency,
            ["--device", "cuda"],
            "--device cuda, but torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device"),
        ),
    ],
    ids=[
        "too few images",
        "no original batch",
        "no step",
        "negative warm-up",
        "no repeat",
        "no thread",
        "negative workers",
        "misspelt inductor setting",
        "inductor setting of another type",
        "inductor setting without a value",
        "batch size not a number",
        "no batch",
        "no CUDA",
    ],
)
def test_counts_that_would_fail_late_are_refused_at_once(script, arguments, message, capsys):
    with pytest.raises(SystemExit):
        script.main(arguments)
    assert message in capsys.readouterr().err


def test_model_speed_times_both_attention_paths(capsys):
    results = model_speed.main(
        ["--batch_size", "1", "--regions", "2", "--tokens", "2", "--steps", "2", "--warmup", "0"]
    )
    assert results.keys() == {"sdpa", "eager"} and min(results.values()) > 0
    assert "median of 2 forward+backward steps" in capsys.readouterr().out


def test_pipeline_latency_reports_the_regions_the_model_saw(capsys):
    report = pipeline_latency.main(["--regions", "150", "--repeats", "1", "--warmup", "0"])
    assert report["regions"] == 100  # the processor keeps max_regions
    assert json.loads(capsys.readouterr().out) == report
    assert report["pipeline_p50_ms"] > 0 and report["forward_p50_ms"] > 0


def test_generated_data_is_whole_or_made_again(tmp_path):
    """A run stopped while generating leaves only raw.partial; the next one writes the data whole."""

    def stopped(folder):
        (folder / "coco_extract").mkdir(parents=True)
        raise KeyboardInterrupt

    def write(folder):
        (folder / "vqa").mkdir(parents=True)

    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        raw_vqa_files.generate_once(raw, {"num_images": 3}, stopped, prepared)
    assert not raw.exists()
    assert raw_vqa_files.generate_once(raw, {"num_images": 3}, write, prepared)
    assert sorted(path.name for path in raw.iterdir()) == ["settings.json", "vqa"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]
    assert not raw_vqa_files.generate_once(raw, {"num_images": 3}, stopped, prepared)


def test_data_prepared_from_earlier_raw_data_is_not_taken_for_new(tmp_path):
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    prepared.mkdir()  # from raw data of other settings, since removed
    assert raw_vqa_files.generate_once(raw, {"num_images": 3}, lambda folder: folder.mkdir(), prepared)
    assert not prepared.exists()
    (raw / "settings.json").unlink()  # data kept from before settings were recorded
    with pytest.raises(SystemExit, match="holds data whose settings were not recorded .*: remove it, or give another"):
        raw_vqa_files.generate_once(raw, {"num_images": 3}, lambda folder: folder.mkdir(), prepared)


def test_cuda_kernel_profile_keeps_every_kernel_in_device_order(capsys):
    """The GPU's kernels of the profiled steps, from a stand-in profiler: every name is kept (the table prints 30),
    and the timeline holds each kernel in the order the device started them, the host's events left out."""
    kernel_profile = load_bench_module("kernel_profile")

    class Event:
        def __init__(self, name, device_type, start, end):
            self.name, self.device_type = name, device_type
            self.time_range = torch.autograd.profiler_util.Interval(start, end)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernels = [Event(f"kernel_{index}", cuda, 1000 + 10 * index, 1004 + 10 * index) for index in range(40)]
    events = [kernels[1], Event("aten::mm", cpu, 990, 2000), kernels[0], *kernels[2:]]
    # The host's calls of the CUDA runtime and driver: a wait stands out by its time.
    events += [Event("cudaLaunchKernel", cpu, 995 + 10 * index, 998 + 10 * index) for index in range(40)]
    events += [Event("cudaStreamSynchronize", cpu, 1400, 1800), Event("cuLaunchKernelEx", cpu, 990, 992)]
    events += [Event("custom_op", cpu, 990, 1990)]
    # The profiling code's closing wait for the device is not the loop's; a synchronisation before it is.
    events += [Event("cudaDeviceSynchronize", cpu, 1410, 3410), Event("cudaDeviceSynchronize", cpu, 1300, 1302)]

    class Profiler:
        def events(self):
            return events

    summary = kernel_profile.summarize(Profiler(), torch.device("cuda"), steps=2)
    assert summary.launches_per_step == 20 and summary.milliseconds_per_step == pytest.approx(0.08)
    assert len(summary.by_name) == 40 and summary.by_name[0][1:] == (0.5, pytest.approx(0.002))
    assert summary.timeline[:2] == [("kernel_0", 0, 4), ("kernel_1", 10, 4)] and len(summary.timeline) == 40
    assert summary.host_calls == [
        ("cudaStreamSynchronize", 0.5, pytest.approx(0.2)),
        ("cudaLaunchKernel", 20, pytest.approx(0.06)),
        ("cuLaunchKernelEx", 0.5, pytest.approx(0.001)),
        ("cudaDeviceSynchronize", 0.5, pytest.approx(0.001)),
    ]
    kernel_profile.print_kernel_profile(summary, "stand-in", torch.device("cuda"), wall_seconds=0.001)
    printed = capsys.readouterr().out
    assert "kernel_29" in printed and "kernel_30" not in printed
    # 40 kernels of 4 us over 394 us, two steps: the device ran kernels for 41% of the span.
    assert "0.20 ms a step, of which the device ran kernels for 41%" in printed
    assert "the host's CUDA calls a step, the longest first (a step's wall 1.00 ms):\ncudaStreamSynchronize " in printed
    assert re.search(r"\ncudaStreamSynchronize +0\.50 +0\.200\n", printed)
