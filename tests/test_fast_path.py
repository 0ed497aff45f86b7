"""The fast training path (bf16 autocast + SDPA, bucketed padding, torch.compile) computes what the original's fp32
eager path computes, and bench/train_throughput.py runs from end to end."""

import copy
import functools
import importlib.util
import json
import multiprocessing
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BF16_TOLERANCE
from torch._dynamo.utils import counters

from rwsan import RWSANConfig, RWSANForVQA
from rwsan.data import VQACollator
from rwsan.modeling_rwsan import RWSANAttentionFlattening, RWSANLayerNorm

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench_module("train_throughput")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models spend their time in per-operator overhead, which a second thread only adds to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What `compile_blocks` compiles, once for every padded shape: a graph for each of the two blocks, one for the layer
# norms of the (batch, length, hidden) states between the blocks' applications, one for the fused vector's norm, one
# for the two attention flattenings.
COMPILED_BLOCKS_GRAPHS = 5


def tiny_model(attn_implementation: str = "sdpa") -> RWSANForVQA:
    torch.manual_seed(0)
    model = RWSANForVQA(RWSANConfig(**bench.TINY_SIZES)).eval()
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.fixture(scope="module")
def items() -> list[dict[str, np.ndarray]]:
    """Eight samples with VQA-like question lengths and region counts, as `VQADataset` returns them."""
    return bench.synthetic_items(RWSANConfig(**bench.TINY_SIZES), 8, np.random.default_rng(0))


def collate(items, pad_to_multiple_of=None) -> dict[str, torch.Tensor]:
    batch = VQACollator(bench.TINY_SIZES["num_labels"], pad_to_multiple_of=pad_to_multiple_of)(items)
    del batch["labels"]
    return batch


def test_layer_norm_is_the_original_formula_forward_and_backward():
    torch.manual_seed(0)
    norm = RWSANLayerNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    hidden_states = (torch.randn(5, 8, dtype=torch.float64) * 3 + 1).requires_grad_()
    with torch.no_grad():
        hidden_states[0] = 2.5  # a constant row: zero standard deviation
    upstream = torch.randn(5, 8, dtype=torch.float64)

    output = norm(hidden_states)
    (gradient,) = torch.autograd.grad(output, hidden_states, upstream)
    mean, std = hidden_states.mean(-1, keepdim=True), hidden_states.std(-1, keepdim=True)
    expected = norm.weight * (hidden_states - mean) / (std + 1e-6) + norm.bias
    (expected_gradient,) = torch.autograd.grad(expected, hidden_states, upstream)

    torch.testing.assert_close(output, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(output[0], norm.bias, atol=1e-12, rtol=0)


def test_layer_norm_of_a_residual_sum_is_the_norm_of_the_sum():
    torch.manual_seed(0)
    norm = RWSANLayerNorm(8, eps=1e-6).double()
    hidden_states, residual = (torch.randn(5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    upstream = torch.randn(5, 8, dtype=torch.float64)
    output = norm(hidden_states, residual)
    gradients = torch.autograd.grad(output, (hidden_states, residual), upstream)
    total = (hidden_states + residual).detach().requires_grad_()
    expected = norm(total)
    (expected_gradient,) = torch.autograd.grad(expected, total, upstream)
    assert torch.equal(output, expected)
    for gradient in gradients:
        assert torch.equal(gradient, expected_gradient)


def test_bf16_sdpa_logits_match_fp32_eager_logits(items):
    batch = collate(items)
    with torch.no_grad():
        reference = tiny_model("eager")(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = tiny_model("sdpa")(**batch).logits
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference, **BF16_TOLERANCE)


def test_bucketed_padding_gives_the_logits_of_the_unpadded_batch(items):
    unpadded, bucketed = collate(items), collate(items, pad_to_multiple_of=20)
    assert unpadded["image_features"].shape[1] == max(len(item["image_features"]) for item in items) < 100
    assert unpadded["input_ids"].shape[1] < 16
    assert bucketed["input_ids"].shape[1] == 16 and bucketed["image_features"].shape[1] == 100
    model = tiny_model()
    with torch.no_grad():
        torch.testing.assert_close(model(**bucketed).logits, model(**unpadded).logits, atol=1e-5, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(**bucketed).logits.float()
            reference = model(**unpadded).logits.float()
    torch.testing.assert_close(fast, reference, **BF16_TOLERANCE)


def test_compiled_model_matches_eager_and_one_compilation_serves_every_bucket(items):
    # The "eager" backend runs the graphs TorchDynamo captures (with their guards and dynamic shapes) as they are, in
    # seconds; inductor's code generation is tested on CUDA below.
    torch._dynamo.reset()
    model = tiny_model()
    compiled = torch.compile(model, backend="eager", dynamic=True)
    first, second = collate(items, pad_to_multiple_of=20), collate(items)
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]
    assert first["image_features"].shape[1] != second["image_features"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(compiled(**first).logits, model(**first).logits, atol=1e-5, rtol=0)
        graphs = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(compiled(**second).logits, model(**second).logits, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs, "the second padded shape was compiled again"
    torch._dynamo.reset()


def test_compiled_blocks_match_eager_with_a_few_graphs_for_every_shape(items):
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    model = tiny_model()
    compiled = tiny_model().compile_blocks(backend="eager", dynamic=True)
    first, second = collate(items, pad_to_multiple_of=20), collate(items)
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]
    assert first["image_features"].shape[1] != second["image_features"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(compiled(**first).logits, model(**first).logits, atol=1e-5, rtol=0)
        # The 18 applications of the two shared blocks, the 13 of the layer norms outside them and the two
        # flattenings share 5 graphs.
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        assert graphs == COMPILED_BLOCKS_GRAPHS
        torch.testing.assert_close(compiled(**second).logits, model(**second).logits, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] - graphs_before == graphs, "a second padded shape was compiled again"
    for name, module in compiled.named_modules():
        # The norms inside the blocks are compiled as part of them.
        separately_compiled = module._compiled_call_impl is not None
        expected = (
            (isinstance(module, RWSANLayerNorm) and ".block." not in name)
            or name.endswith(".block")
            or isinstance(module, RWSANAttentionFlattening)
        )
        assert separately_compiled == expected, name
    torch._dynamo.reset()


def test_compile_blocks_raises_the_recompile_limit_its_blocks_share():
    """Both blocks' compilations count against one function's limit (transformers' checkpointing wrapper), which
    their training, evaluation and autocast variants pass at the default 8; past it they would run eagerly without a
    word. compile_blocks raises the limit to 64 and leaves a higher one as it is."""
    # `patch` restores the limit on leaving (pytest's monkeypatch would delete the setting).
    for limit, expected in ((8, 64), (100, 100)):
        with torch._dynamo.config.patch(recompile_limit=limit):
            tiny_model().compile_blocks(backend="eager")
            assert torch._dynamo.config.recompile_limit == expected
    torch._dynamo.reset()


def additions_outside_compiled_code(model, batch) -> list[list[int]]:
    """The shapes of the additions a forward pass runs outside compiled code (TorchDynamo's regions)."""
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler,
    ):
        model(**batch)
    shapes = []
    for event in profiler.events():
        region = event.cpu_parent
        while region is not None and not region.name.startswith("Torch-Compiled Region"):
            region = region.cpu_parent
        if event.name == "aten::add" and region is None:
            shapes.append(event.input_shapes[0])
    return shapes


def test_compiled_norms_add_their_residuals(items):
    """Each norm outside the blocks normalises a sum; compiled, it adds inside its compiled region (where inductor
    fuses the addition into the norm's kernels), so that no addition of states runs outside compiled code (13 a
    forward pass at the paper's configuration)."""
    torch._dynamo.reset()
    model = tiny_model()
    batch = collate(items, pad_to_multiple_of=20)
    batch_size, question_length = batch["input_ids"].shape
    num_regions, hidden = batch["image_features"].shape[1], model.config.hidden_size
    residual_shapes = {
        (batch_size, question_length, hidden),
        (batch_size, num_regions, hidden),
        (batch_size, model.config.flat_output_size),
    }

    def residual_additions() -> int:
        return sum(tuple(shape) in residual_shapes for shape in additions_outside_compiled_code(model, batch))

    # Eagerly: two sums in each application of the question's block, three in the image's, two around each
    # encoder's three applications, one of the pooled vectors.
    config = model.config
    eager = (3 * 2 + 2) * config.num_srwsa_repeats + (3 * 3 + 2) * config.num_sgrwsa_repeats + 1
    assert residual_additions() == eager
    model.compile_blocks(backend="eager", dynamic=True)
    with torch.no_grad():
        model(**batch)  # tracing
    assert residual_additions() == 0
    torch._dynamo.reset()


def gradient_step(
    model, batch, counted: str = "aten::add_", autocast_dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of one training pass (its forward under CPU autocast to `autocast_dtype` where given), and how
    many `counted` operators it ran (by default `add_`, the autograd engine's sums)."""
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
    count = sum(event.name == counted for event in profiler.events())
    return {name: parameter.grad for name, parameter in model.named_parameters()}, count


def test_compiled_blocks_sum_their_gradients_once_per_application(items):
    """Training with compiled blocks, each application adds one gradient for all the block's weights: the engine's
    additions of each weight (one per application) become those of one tensor per block, with the eager model's
    gradients."""
    torch._dynamo.reset()
    config = RWSANConfig(**bench.TINY_SIZES, dropout=0.0)
    torch.manual_seed(0)
    eager = RWSANForVQA(config).train()
    compiled = RWSANForVQA(config).train()
    compiled.load_state_dict(eager.state_dict())
    # One batch shape: static shapes trace in half the time of the dynamic ones the Trainer compiles.
    compiled.compile_blocks(backend="eager", dynamic=False)
    batch = collate(items, pad_to_multiple_of=20)
    batch["labels"] = torch.zeros(len(items), config.num_labels).index_fill_(1, torch.tensor([3]), 0.9)
    gradient_step(compiled, batch)  # tracing
    eager_gradients, eager_additions = gradient_step(eager, batch)
    compiled_gradients, compiled_additions = gradient_step(compiled, batch)
    torch.testing.assert_close(compiled_gradients, eager_gradients, atol=1e-6, rtol=1e-5)
    encoders = (compiled.rwsan.question_encoder, compiled.rwsan.image_encoder)
    block_weights = sum(len(list(encoder.block.parameters())) for encoder in encoders)
    # Those of the guided attention's value and key layers read the question once a pass, not in each application.
    applied_weights = block_weights - 4
    applications = 3 * config.num_srwsa_repeats
    # Eagerly each applied weight takes applications - 1 sums (the first out of place, `add`, the others `add_`);
    # compiled, each block's two tensors of weights (its linear layers' and the others') take them instead.
    assert eager_additions - compiled_additions >= (applications - 2) * applied_weights - (applications - 1) * 4
    torch._dynamo.reset()


def test_compiled_blocks_cast_their_linear_weights_once_a_pass_under_autocast(items):
    """Autocast casts each weight of the eager model once a pass (its cache of casts of parameters); compiled blocks
    would cast their views of the concatenated weights in every application (a kernel or two each on a GPU), and
    cast the concatenation once instead. The gradients stay the eager model's, to bf16 rounding."""
    torch._dynamo.reset()
    config = RWSANConfig(**bench.TINY_SIZES, dropout=0.0)
    torch.manual_seed(0)
    eager = RWSANForVQA(config).train()
    compiled = copy.deepcopy(eager).compile_blocks(backend="eager", dynamic=False)  # one batch shape, as above
    batch = collate(items, pad_to_multiple_of=20)
    batch["labels"] = torch.zeros(len(items), config.num_labels).index_fill_(1, torch.tensor([3]), 0.9)
    autocast_step = functools.partial(
        gradient_step, batch=batch, counted="aten::_to_copy", autocast_dtype=torch.bfloat16
    )
    autocast_step(compiled)  # tracing
    eager_gradients, eager_casts = autocast_step(eager)
    compiled_gradients, compiled_casts = autocast_step(compiled)
    # The eager model casts each plain linear weight once a pass (autocast's cache) and its stacked projections'
    # weights in each application; the compiled blocks cast one concatenation a block; the activations' casts are
    # the same: fewer in all (734 against 834 here, forward and backward; each application's casts of its views
    # made 1,090).
    assert compiled_casts < eager_casts
    torch.testing.assert_close(compiled_gradients, eager_gradients, **BF16_TOLERANCE)
    # Only the linear layers' tensor is cast: the layer norms compute with their float32 weights.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for encoder in (compiled.rwsan.question_encoder, compiled.rwsan.image_encoder):
            assert [weights.dtype for weights in encoder.block_for_pass().args] == [torch.bfloat16, torch.float32]
    torch._dynamo.reset()


def test_blocks_read_their_weights_as_one_tensor_only_where_that_is_safe():
    model = tiny_model().train()
    encoder = model.rwsan.question_encoder
    assert encoder.block_for_pass() is None, "not compiled"
    encoder.compile_block_with_weights(backend="eager")
    assert encoder.block_for_pass() is not None
    copied = copy.deepcopy(model).rwsan.question_encoder
    assert copied.block_for_pass() is None, "the compiled application is the original's"
    assert pickle.loads(pickle.dumps(model)).rwsan.question_encoder.compiled_block_with_weights is None
    with torch.no_grad():
        assert encoder.block_for_pass() is None
    encoder.block.attention.value.weight.requires_grad_(False)
    assert encoder.block_for_pass() is None, "a frozen weight"
    encoder.block.attention.value.weight.requires_grad_(True)
    model.activation_checkpointing_enable()
    assert encoder.block_for_pass() is None, "recomputation would read the block's own weights"
    model.activation_checkpointing_disable()
    encoder.block.attention.value = torch.nn.Linear(*encoder.block.attention.value.weight.T.shape)
    assert encoder.block_for_pass() is not None, "the same names and shapes"
    encoder.block.extra = torch.nn.Linear(2, 2)
    assert encoder.block_for_pass() is None, "another parameter than when compiled"
    del encoder.block.extra
    encoder.block = type(encoder.block)(model.config)
    assert encoder.block_for_pass() is None, "a new block"
    model.eval()
    assert encoder.block_for_pass() is None


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="inductor needs about 3 minutes to compile the tiny model's training graphs on a 2-core CPU; "
    "the test above covers the captured graphs",
)
def test_inductor_training_step_matches_eager_on_cuda(items):
    batch = {key: value.cuda() for key, value in collate(items, pad_to_multiple_of=20).items()}
    labels = torch.zeros(len(items), bench.TINY_SIZES["num_labels"], device="cuda")
    labels[:, 3] = 0.9
    gradients = []
    for compile_model in (False, True):
        model = RWSANForVQA(RWSANConfig(**bench.TINY_SIZES, dropout=0.0)).cuda().train()
        model.load_state_dict(tiny_model().state_dict())
        forward = torch.compile(model, dynamic=True) if compile_model else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward(**batch, labels=labels).loss.backward()
        gradients.append(model.classifier.weight.grad.float())
    torch.testing.assert_close(gradients[1], gradients[0], **BF16_TOLERANCE)


def three_batches_of_two_shapes(items, collator) -> list[dict[str, torch.Tensor]]:
    """60 regions, 100, then 60 again with other samples: the third batch must replace the first's inputs in the
    first graph (its keys come in another order, as batches from another collator may)."""
    by_regions = sorted(items, key=lambda item: len(item["image_features"]))
    third = collator(by_regions[3:5])
    batches = [collator(by_regions[2:4]), collator(by_regions[-2:]), dict(reversed(third.items()))]
    assert [batch["image_features"].shape[1] for batch in batches] == [60, 100, 60]
    return batches


def train_on(batches, graphed_passes: bool, device: str, autocast_dtype=None, compile_blocks=None):
    """Losses and final weights of the tiny model (no dropout) trained by a bench `TrainingStep` on `batches`;
    `compile_blocks`: the keyword arguments of `compile_blocks`, to train with compiled blocks."""
    config = RWSANConfig(**bench.TINY_SIZES, dropout=0.0)
    torch.manual_seed(0)
    model = RWSANForVQA(config).to(device).train()
    if compile_blocks is not None:
        model.compile_blocks(**compile_blocks)
    variant = bench.Variant("", "sdpa", autocast_dtype, fused_optimizer=True, graphed_passes=graphed_passes)
    step = bench.TrainingStep(model, variant, torch.device(device))
    losses = [step({key: value.to(device) for key, value in batch.items()}).item() for batch in batches]
    graphs = len(step.passes.graphs) if graphed_passes else 0
    return torch.tensor(losses), {name: value.detach().clone() for name, value in model.state_dict().items()}, graphs


def assert_graphed_steps_like_eager_steps(items, device: str, tolerance, autocast_dtype=None, compile_blocks=None):
    """Three batches of two shapes trained with graphed passes (two graphs) and eagerly: same losses and weights.
    `compile_blocks` (keyword arguments of `compile_blocks`) compiles the graphed model's blocks."""
    batches = three_batches_of_two_shapes(items, VQACollator(bench.TINY_SIZES["num_labels"], pad_to_multiple_of=20))
    graphed_losses, graphed_weights, graphs = train_on(batches, True, device, autocast_dtype, compile_blocks)
    eager_losses, eager_weights, _ = train_on(batches, False, device, autocast_dtype)
    assert graphs == 2
    torch.testing.assert_close(graphed_losses, eager_losses, **tolerance)
    torch.testing.assert_close(graphed_weights, eager_weights, **tolerance)


def test_graphed_passes_step_like_eager_steps_with_recording_emulated(items, emulated_cuda_graphs):
    assert_graphed_steps_like_eager_steps(items, "cpu", {"atol": 1e-6, "rtol": 1e-5})


def test_compiled_blocks_in_graphed_passes_step_like_eager_steps_with_recording_emulated(items, emulated_cuda_graphs):
    """--compile_blocks with --cuda_graphs: the compiled blocks run in the warm-up and recorded passes."""
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = {"backend": "eager", "dynamic": True}
    assert_graphed_steps_like_eager_steps(items, "cpu", {"atol": 1e-6, "rtol": 1e-5}, compile_blocks=compiled)
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    assert graphs == COMPILED_BLOCKS_GRAPHS, "the blocks were not compiled, or compiled again"
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and inductor's GPU code need a CUDA device")
def test_inductor_blocks_in_graphed_passes_step_like_eager_steps_on_cuda(items):
    """The recording of inductor's kernels (the fastest path): same losses and weights as eager steps."""
    torch._dynamo.reset()
    compiled = {"dynamic": True}
    assert_graphed_steps_like_eager_steps(items, "cuda", BF16_TOLERANCE, torch.bfloat16, compile_blocks=compiled)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize(
    "autocast_dtype, tolerance",
    [(None, {"atol": 2e-6, "rtol": 1e-5}), (torch.bfloat16, BF16_TOLERANCE)],
    ids=["fp32", "bf16"],
)
def test_graphed_passes_step_like_eager_steps_on_cuda(items, autocast_dtype, tolerance):
    """The real recording: batches of two shapes (the third replaces the first's inputs), same losses and weights
    as eager steps (the eager warm-up passes before each recording change no weight)."""
    assert_graphed_steps_like_eager_steps(items, "cuda", tolerance, autocast_dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused attention kernels need a CUDA device")
def test_every_attention_of_the_paper_runs_a_fused_kernel_on_cuda():
    """In bf16 training at the paper's attention sizes (queries and keys of 4, 16 and 64 a head), no attention falls
    back to SDPA's math path: with the math backend ruled out, a missing fused kernel would raise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    config = RWSANConfig(vocab_size=50, num_labels=10)
    model = RWSANForVQA(config).cuda().train()
    input_ids = torch.randint(1, 50, (8, 14), device="cuda")
    image_features = torch.randn(8, 36, config.image_feature_size, device="cuda")
    fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(fused), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids, image_features, labels=torch.rand(8, 10, device="cuda")).loss
        loss.backward()
    assert torch.isfinite(loss) and model.rwsan.question_encoder.block.attention.query.weight.grad.abs().sum() > 0


def test_synthetic_sizes_are_vqa_like():
    rng = np.random.default_rng(0)
    regions = bench.sample_region_counts(rng, 10_000)
    words = bench.sample_question_lengths(rng, 10_000, max_length=16)
    assert regions.min() == 10 and regions.max() == 100 and 36 <= regions.mean() <= 50
    assert words.max() <= 16 and np.mean((words >= 5) & (words <= 10)) > 0.75


def test_bucket_shapes_are_those_the_collator_pads_to():
    assert bench.bucket_shapes(16, 20) == [(16, 20), (16, 40), (16, 60), (16, 80), (16, 100)]
    shapes = bench.bucket_shapes(16, 8)
    assert {length for length, _ in shapes} == {8, 16}
    assert {regions for _, regions in shapes} == {*range(16, 100, 8), 100}
    # The collator pads to one of them, whatever the lengths.
    collator = VQACollator(12, max_regions=100, max_question_length=16, pad_to_multiple_of=8)
    for words, regions in ((16, 100), (9, 97), (1, 10)):
        item = {"input_ids": np.ones(words, np.int64), "image_features": np.ones((regions, 4), np.float16)}
        batch = collator([item])
        assert (batch["input_ids"].shape[1], batch["image_features"].shape[1]) in shapes


def workers_at_each_release(monkeypatch) -> list:
    """The DataLoader workers (started from now on) alive whenever the bench frees memory: they should have stopped
    before the garbage collector frees what a row built, as it kills workers only after waiting 5 s each."""
    earlier, workers_left = set(multiprocessing.active_children()), []
    release_memory = bench.Benchmark.release_memory
    monkeypatch.setattr(
        bench.Benchmark,
        "release_memory",
        lambda self: workers_left.extend(set(multiprocessing.active_children()) - earlier) or release_memory(self),
    )
    return workers_left


def test_benchmark_runs_every_cpu_row_and_writes_json(tmp_path, monkeypatch):
    rows = "fp32_eager,bf16_sdpa,grouped,loader,loader_packed,loader_in_process,loader_training,trainer"
    rows += ",trainer_in_process,evaluate"
    workers_left = workers_at_each_release(monkeypatch)
    # One round of the four pool batches per row, so that the rows time the same samples. A worker process, for the
    # rows that load with workers to differ from those that load in the main process (the CPU default is none).
    sizes = ["--batch_size", "16", "--pool_batches", "4", "--steps", "4", "--loader_batches", "2"]
    sizes += ["--trainer_steps", "1", "--profile_steps", "2", "--eval_questions", "40", "--num_workers", "1"]
    bench.main(["--tiny", *sizes, "--rows", rows, "--json", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())
    measured = {row["key"]: row for row in results["rows"]}
    assert list(measured) == rows.split(",") and results["finished"]
    assert workers_left == []
    # The header's figures of the model and the items are kept too.
    assert results["workload"]["answers"] == 12 and results["workload"]["parameters"] > 0
    assert 10 <= results["workload"]["mean_regions"] <= 100 and 3 <= results["workload"]["mean_question_words"] <= 16
    for row in measured.values():
        assert row["error"] is None and row["samples_per_second"] > 0, row
    assert "(1 workers" in measured["trainer"]["title"] and "(0 workers" in measured["trainer_in_process"]["title"]
    # The Trainer rows profile two more steps: every step runs the model's products, with their gradients.
    for key in ("trainer", "trainer_in_process"):
        kernels = measured[key]["kernel_profile"]
        assert kernels["steps"] == 2 and kernels["launches_per_step"] > 1000 and kernels["milliseconds_per_step"] > 0
        counts = {name: count for name, count, _ in kernels["by_name"]}
        assert counts["aten::addmm"] > 0 and counts["aten::mm"] > counts["aten::addmm"]
        # Each part of a step on the host was timed, and none holds another: the rest of the loop is what is left.
        host = measured[key]["host_milliseconds_per_step"]
        names = ["waiting for batches", "copies and padding", "training_step", "optimizer step"]
        names += ["schedule and zero_grad", "the rest", "the device's backlog"]
        assert list(host) == names
        assert min(host[name] for name in names[:-1]) > 0 and host["the device's backlog"] >= 0, host
        # Padded as the collator pads (--pad_to_multiple_of 20, questions cut at 16).
        assert measured[key]["mean_padded_question_length"] == 16
        assert measured[key]["mean_padded_regions"] in (20, 40, 60, 80, 100)
    assert measured["fp32_eager"]["kernel_profile"] is None
    # Grouping by regions pads far less: the mean padded region count drops well below the batch maximum's.
    assert measured["grouped"]["mean_padded_regions"] < 0.8 * measured["bf16_sdpa"]["mean_padded_regions"]
    assert measured["loader"]["mean_padded_question_length"] == 16
    # Fed by the DataLoader, the fast path (bf16 SDPA on a CPU, padded to the longest) pads its batches as its own
    # row does, not to the multiples the loader rows pad to.
    assert measured["loader_training"]["mean_padded_question_length"] < 16


def test_a_failing_trainer_row_stops_its_workers_too(tmp_path, monkeypatch):
    workers_left = workers_at_each_release(monkeypatch)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bench.ShapeRecordingTrainer, "training_step", out_of_memory)
    sizes = ["--batch_size", "8", "--num_images", "20", "--trainer_steps", "1", "--num_workers", "1"]
    bench.main(["--tiny", *sizes, "--rows", "trainer", "--json", str(tmp_path / "r.json")])
    [row] = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["error"] == "RuntimeError: out of memory (simulated)"
    assert workers_left == []


def test_rows_of_a_data_set_smaller_than_one_batch_fail_by_name_rather_than_wait_forever(tmp_path):
    """The DataLoader drops the last, incomplete batch: it gave none, and the loader rows waited for one."""
    sizes = ["--batch_size", "128", "--num_images", "20", "--num_workers", "0"]
    bench.main(["--tiny", *sizes, "--rows", "loader,trainer", "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [row["key"] for row in rows] == ["loader", "trainer"]
    for row in rows:
        assert re.fullmatch(
            r"ValueError: .*prepared has \d+ training questions, fewer than one batch of --batch_size 128; give a "
            r"smaller --batch_size or more --num_images",
            row["error"],
        ), row["error"]


def test_a_json_path_that_cannot_be_written_is_refused_before_any_row_runs(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for path, message in (
        (tmp_path, f"--json: {tmp_path} is a folder; name the file to write, e.g. {tmp_path / 'bench.json'}"),
        (
            tmp_path / "a_file" / "r.json",
            f"--json: cannot write {tmp_path / 'a_file' / 'r.json'}: {tmp_path / 'a_file'} is a file, not a folder",
        ),
    ):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", "--rows", "fp32_eager", "--json", str(path)])
        assert message in capsys.readouterr().err


def test_the_trainer_rows_name_the_precision_and_attention_they_run_in(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bf16_supported", lambda device: False)  # a CPU without bf16
    attentions = []
    build_model = bench.build_model
    monkeypatch.setattr(bench, "build_model", lambda *args: attentions.append(args[1]) or build_model(*args))
    sizes = ["--batch_size", "8", "--num_images", "20", "--trainer_steps", "1", "--eval_questions", "16"]
    sizes += ["--num_workers", "0", "--attn_implementation", "eager"]
    bench.main(["--tiny", *sizes, "--rows", "trainer,evaluate", "--json", str(tmp_path / "r.json")])
    titles = [row["title"] for row in json.loads((tmp_path / "r.json").read_text())["rows"]]
    assert titles[0].startswith("train_vqa Trainer (0 workers; fp32, --attn_implementation eager, ")
    assert titles[1].startswith("VQATrainer.evaluate (fp32, --attn_implementation eager, ")
    assert not any("bf16" in title for title in titles)
    assert attentions == ["eager", "eager"]


def test_profiled_steps_of_grouped_batches_are_of_middling_size():
    # Steps 251-253 would be the three largest batches of a mega-batch of 50 sorted largest first.
    assert bench.trainer_mega_batch(31_290, 64) == 50  # the generated set at the paper's 3,129 answers
    assert bench.trainer_mega_batch(3000, 64) == 11 and bench.trainer_mega_batch(100, 64) == 1
    assert bench.profile_start(250, 3, mega_batch=50) == 273
    assert bench.profile_start(260, 3, mega_batch=50) == 323
    assert bench.profile_start(250, 3, mega_batch=None) == bench.profile_start(250, 0, mega_batch=50) == 250


def test_the_host_clock_leaves_a_part_timed_inside_another_out_of_it(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 4.0, 4.0, 4.25, 4.5, 4.5, 5.0])
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    host = bench.HostClock()
    with host.timing(bench.TRAINING_STEP):  # 0 to 4 s, of which the copies took 0.5 s
        with host.timing(bench.COPIES_AND_PADDING):  # 1 to 1.5 s
            pass
    host.on_pre_optimizer_step(None, None, None)  # 4 s
    host.on_optimizer_step(None, None, None)  # 4.25 s
    host.on_step_end(None, None, None)  # 4.5 s
    with host.timing(bench.WAITING_FOR_BATCHES):  # 4.5 to 5 s
        pass
    assert host.seconds == {
        "waiting for batches": 0.5,
        "copies and padding": 0.5,
        "training_step": 3.5,
        "optimizer step": 0.25,
        "schedule and zero_grad": 0.25,
    }


@pytest.mark.parametrize("recorded_while_timed", [0, 1, 2])
def test_the_trainer_timer_leaves_graphs_recorded_while_timed_out_of_the_rate(
    capsys, monkeypatch, recorded_while_timed
):
    clock = iter([0.0, 10.0, 13.7, 14.0])  # train begins; timed steps 3-5 begin, end on the host and on the device
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # the bench's clock alone
    recorded = [5, 2.0]  # graphs, and the seconds their recordings took
    host_seconds = {bench.WAITING_FOR_BATCHES: 0.0, bench.TRAINING_STEP: 0.0, bench.OPTIMIZER_STEP: 0.0}
    shapes = []
    timer = bench.SteadyStateTimer(
        2,
        3,
        lambda: None,
        batch_size=4,
        name="trainer",
        recordings=lambda: tuple(recorded),
        padded_shapes=shapes,
        host_seconds=host_seconds,
    )
    timer.on_train_begin(None, None, None)
    for step in range(1, 6):
        shapes.append((16, 20 * step))  # the Trainer prepares a step's batch before the step ends
        host_seconds[bench.WAITING_FOR_BATCHES] += 0.1
        host_seconds[bench.TRAINING_STEP] += 0.2
        host_seconds[bench.OPTIMIZER_STEP] += 0.3
        if step == 4:  # new shapes met inside the timed steps, recorded within the training step
            recorded[0] += recorded_while_timed
            recorded[1] += 0.75 * recorded_while_timed
            host_seconds[bench.TRAINING_STEP] += 0.75 * recorded_while_timed
        timer.on_step_end(None, SimpleNamespace(global_step=step), None)
    left_out = 0.75 * recorded_while_timed
    assert timer.timed_shapes == [(16, 60), (16, 80), (16, 100)]
    # 12 samples in 4 s, less the recordings'.
    assert timer.samples_per_second == pytest.approx(12 / (4.0 - left_out))
    assert timer.seconds_left_out == pytest.approx(left_out)
    notes = {
        0: [],
        1: ["recorded 1 CUDA graph while timed (0.75 s, left out of the rate)"],
        2: ["recorded 2 CUDA graphs while timed (1.50 s, left out of the rate)"],
    }
    assert timer.notes == notes[recorded_while_timed]
    # The host's parts of a timed step, the recordings left out of the training step; the rest of the host's 3.7 s,
    # and the 0.3 s the device took after the host's last step.
    rest = (3.7 - left_out - 0.3 - 0.6 - 0.9) / 3 * 1e3
    parts = {"waiting for batches": 100.0, "training_step": 200.0, "optimizer step": 300.0, "the rest": rest}
    assert timer.host_milliseconds == pytest.approx({**parts, "the device's backlog": 100.0})
    # The rate and the host's parts are in the log as soon as the timed steps end.
    step = (4.0 - left_out) / 3 * 1e3
    assert capsys.readouterr().out == (
        f"trainer: {12 / (4.0 - left_out):,.1f} samples/s over steps 3-5\n"
        f"trainer: the host's ms a step: waiting for batches 100.00, training_step 200.00, optimizer step 300.00, "
        f"the rest {rest:.2f}, the device's backlog 100.00 (a step {step:.2f})\n"
    )


def test_without_workers_the_rows_loading_in_the_main_process_are_not_repeated(tmp_path):
    sizes = ["--batch_size", "8", "--num_images", "20", "--loader_batches", "2", "--num_workers", "0"]
    bench.main(["--tiny", *sizes, "--rows", "loader_in_process,trainer_in_process", "--json", str(tmp_path / "r.json")])
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [row["note"] for row in rows] == [
        "skipped: loader_packed loads in the main process too (--num_workers 0)",
        "skipped: trainer loads in the main process too (--num_workers 0)",
    ]


def test_the_table_tells_the_trainer_rows_apart_and_rates_only_training_rows():
    fastest = {"--compile_blocks": True, "--cuda_graphs": True, "--group_by_regions": True, "--pack_regions": True}
    encoders = {**fastest, "--compile_blocks": False, "compiled encoders (bench only)": True}
    titles = [
        bench.trainer_title(8, False, True, fastest),
        bench.trainer_title(0, False, True, fastest),
        bench.trainer_title(8, True, True, fastest),
        bench.trainer_title(8, False, True, encoders),
    ]
    assert len({title[: bench.TITLE_WIDTH] for title in titles}) == len(titles), titles
    rows = {
        "fp32_eager": bench.Row("fp32_eager", "fp32", "", samples_per_second=10.0),
        "bf16_sdpa": bench.Row("bf16_sdpa", "bf16", "", samples_per_second=25.0),
        "loader": bench.Row("loader", "loader", "", samples_per_second=5000.0),
        "evaluate": bench.Row("evaluate", "evaluate", "", samples_per_second=40.0),
    }
    assert bench.ratio(rows["bf16_sdpa"], rows, "fp32_eager") == "2.50x"
    assert bench.ratio(rows["loader"], rows, "fp32_eager") == "-"
    assert bench.ratio(rows["evaluate"], rows, "fp32_eager") == "-"
    assert bench.ratio(rows["bf16_sdpa"], rows, "original") == "-"


@pytest.mark.parametrize(
    ("step_seconds", "max_steps", "expected"),
    [
        (1.1, 200, 36),  # 36 fit: whole rounds of 4
        (0.1, 6, 4),  # --steps 6: one round
        (12.0, 200, 4),  # 3 fit: one whole round all the same, over the time
        (12.0, 3, 3),  # a round is more than --steps allows
    ],
)
def test_rows_time_whole_rounds_of_the_batch_pool(step_seconds, max_steps, expected):
    """Rows that timed different batches of the pool would compare different work."""
    assert bench.timed_step_count(step_seconds, 40.0, max_steps, round_length=4) == expected


def test_benchmark_json_keeps_the_rows_measured_before_the_run_is_cut_off(tmp_path, monkeypatch):
    # As a device session's time limit ends a run: the rows measured so far are what it has to show.
    def cut_off(self):
        raise SystemExit("time is up")

    monkeypatch.setattr(bench.Benchmark, "measure_loader", cut_off)
    path = tmp_path / "results.json"
    sizes = ["--batch_size", "8", "--pool_batches", "2", "--steps", "2"]
    with pytest.raises(SystemExit, match="time is up"):
        bench.main(["--tiny", *sizes, "--rows", "fp32_eager,loader", "--json", str(path)])
    results = json.loads(path.read_text())
    assert not results["finished"]
    [row] = results["rows"]
    assert row["key"] == "fp32_eager" and row["samples_per_second"] > 0


def test_inductor_options_are_in_force_while_the_rows_run_and_recorded(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(
        bench.Benchmark,
        "run",
        lambda self, rows, after_row: seen.append(
            (torch._inductor.config.combo_kernels, torch._inductor.config.max_fusion_size)
        ),
    )
    options = ["--inductor_option", "combo_kernels=True", "--inductor_option", "max_fusion_size=32"]
    results = bench.main(["--tiny", "--rows", "fp32_eager", "--json", str(tmp_path / "r.json"), *options])
    assert seen == [(True, 32)]
    assert (torch._inductor.config.combo_kernels, torch._inductor.config.max_fusion_size) == (False, 64)
    assert results["arguments"]["inductor_options"] == {"combo_kernels": True, "max_fusion_size": 32}
    assert "inductor settings {'combo_kernels': True, 'max_fusion_size': 32}" in capsys.readouterr().out


@pytest.mark.parametrize("steps", [0, 2])
def test_trainer_rows_leave_no_profiler_running(steps):
    """Without --profile_steps nothing is profiled; with it, the profiler stops after its steps. A profiler left
    running would slow every later row."""
    profiler = bench.StepProfiler(after_step=3, steps=steps, device=torch.device("cpu"), synchronize=lambda: None)
    for step in range(1, 3 + steps + 1):
        profiler.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert not torch.autograd.profiler._is_profiler_enabled
    assert (profiler.kernels is not None) == (steps > 0)


def test_step_profile_names_the_work_and_times_each_batch_size(capsys):
    profile_step = load_bench_module("profile_step")
    profile_step.main(["--tiny", "--device", "cpu", "--steps", "1", "--batch_sizes", "2,4"])
    output = capsys.readouterr().out
    operators, milliseconds = re.search(
        r"wall [\d.]+ ms a step; (\d+) outermost operators and compiled kernels a step, ([\d.]+) ms", output
    ).groups()
    assert int(operators) > 100 and float(milliseconds) > 0
    assert re.search(r"^aten::addmm\s+\d+", output, re.MULTILINE), "the matrix products are missing from the table"
    rates = re.findall(r"^bf16 \+ (sdpa|eager) attention\s+(\d+)\s+[\d.]+\s+[\d,]+$", output, re.MULTILINE)
    assert rates == [("sdpa", "2"), ("sdpa", "4"), ("eager", "2")]
