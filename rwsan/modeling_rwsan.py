"""PyTorch RWSAN: Residual Weight-Sharing Attention Network with Low-Rank Attention for visual question answering.

Qin, Hu & Zhuang, IEEE Transactions on Multimedia 2022. The network is the one of the paper's code
(`BrightQin/RWSAN`, `model/model.py`), parameter for parameter; `rwsan.convert_original_checkpoint` maps its
weights onto this file. This file is self-contained (torch, transformers and its configuration only) so that it can
travel beside saved weights and load with `trust_remote_code=True` where the `rwsan` package is not installed.

Shapes: B = batch, T = question tokens, R = image regions, H = hidden size, A = number of answers.
"""

import functools
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _has_any_global_hook
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_rwsan import RWSANConfig

# The original fills masked attention scores with -5e4 rather than -inf or the dtype's minimum: it is finite in
# float16, so padded positions get exactly zero weight under fp16/bf16 autocast without overflowing to -inf.
MASKED_SCORE = -5e4
# Compilations TorchDynamo may keep for the blocks' shared forward wrapper (see `compile_blocks`).
BLOCK_RECOMPILE_LIMIT = 64
# cuDNN's and the memory-efficient SDPA kernels take 16-bit queries and keys whose head size is a multiple of 8;
# others (the paper's question self-attention has 4) go to SDPA's math path, several kernels forward and backward.
FUSED_ATTENTION_HEAD_MULTIPLE = 8


@dataclass
class RWSANModelOutput(ModelOutput):
    """
    Output of [`RWSANModel`].

    Args:
        pooler_output (`torch.FloatTensor` of shape `(B, flat_output_size)`): the fused question-image vector
            (attention-flattened question + attention-flattened image, layer-normalised).
        question_last_hidden_state (`torch.FloatTensor` of shape `(B, T, H)`): question tokens after the encoder.
        image_last_hidden_state (`torch.FloatTensor` of shape `(B, R, H)`): image regions after the encoder.
        question_hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states=True`): the LSTM output, then
            the question states after each application of SRWSA, each `(B, T, H)`.
        image_hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states=True`): the projected region
            features, then the image states after each application of SGRWSA, each `(B, R, H)`.
        question_attentions (`tuple(torch.FloatTensor)`, with `output_attentions=True`): every question
            self-attention map, `(B, heads, T, T)`, in the order they were computed.
        image_attentions (`tuple(torch.FloatTensor)`, with `output_attentions=True`): every image self-attention
            map, `(B, heads, R, R)`.
        guided_attentions (`tuple(torch.FloatTensor)`, with `output_attentions=True`): every question-guided
            attention map (image regions attending to question tokens), `(B, heads, R, T)`.
        question_flattening_weights (`torch.FloatTensor` of shape `(B, T)`, with `output_attentions=True`): the
            attention-flattening weights over question tokens (they sum to 1 over real tokens).
        image_flattening_weights (`torch.FloatTensor` of shape `(B, R)`, with `output_attentions=True`): the
            attention-flattening weights over image regions.
    """

    pooler_output: torch.FloatTensor | None = None
    question_last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None
    question_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    question_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    guided_attentions: tuple[torch.FloatTensor, ...] | None = None
    question_flattening_weights: torch.FloatTensor | None = None
    image_flattening_weights: torch.FloatTensor | None = None


@dataclass
class RWSANForVQAOutput(ModelOutput):
    """
    Output of [`RWSANForVQA`]: the loss and logits first, as transformers' `Trainer` and other generic code expect of
    tuple outputs, then every field of [`RWSANModelOutput`], described there.

    Args:
        loss (`torch.FloatTensor` of shape `()`, when `labels` are given): binary cross-entropy with logits against
            the soft answer scores, summed over answers and averaged over the batch.
        logits (`torch.FloatTensor` of shape `(B, A)`): one score per answer (apply a sigmoid for probabilities).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    question_last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None
    question_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    question_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_attentions: tuple[torch.FloatTensor, ...] | None = None
    guided_attentions: tuple[torch.FloatTensor, ...] | None = None
    question_flattening_weights: torch.FloatTensor | None = None
    image_flattening_weights: torch.FloatTensor | None = None


class RWSANLayerNorm(nn.Module):
    """The original's layer norm: `weight * (x - mean) / (std + eps) + bias`, with the unbiased standard deviation.

    It differs from `nn.LayerNorm` (biased variance, eps inside the square root); weights trained with one do not
    reproduce with the other, so it is kept as it is.

    Every norm of the model normalises a sum of two terms (a residual sum, or the fused pooled vectors), so it
    takes both: `norm(hidden_states, residual)` is the norm of `hidden_states + residual`. Compiled
    (`compile_blocks`), the addition then runs inside the norm's kernels, forward and backward, rather than as
    kernels of its own; there inductor keeps a sum of two bf16 terms in float32 rather than rounding it to bf16
    first. Forward hooks on a norm see the two terms.
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            hidden_states = hidden_states + residual
        centered = hidden_states - hidden_states.mean(-1, keepdim=True)
        # The unbiased standard deviation as the norm of the centred values: one reduction forward and backward,
        # about twice as fast in training as `Tensor.std` (which computes the mean again) on the CPU.
        scale = math.sqrt(hidden_states.shape[-1] - 1)
        cuda_autocast = hidden_states.is_cuda and torch.is_autocast_enabled("cuda")
        if hidden_states.dtype == torch.float16 and not cuda_autocast:
            # The norm is `scale` times the deviation: in float16 it would overflow for deviations `Tensor.std`
            # still gives. CUDA autocast takes the norm in float32 by itself, and is left to do so (CPU autocast
            # does not).
            std = (torch.linalg.vector_norm(centered, dim=-1, keepdim=True, dtype=torch.float32) / scale).half()
        else:
            std = torch.linalg.vector_norm(centered, dim=-1, keepdim=True) / scale
        return torch.addcmul(self.bias, centered / (std + self.eps), self.weight)


class RWSANFeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> linear."""

    def __init__(self, input_size: int, intermediate_size: int, output_size: int, dropout: float):
        super().__init__()
        self.intermediate = nn.Linear(input_size, intermediate_size)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(intermediate_size, output_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(F.relu(self.intermediate(hidden_states))))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as the original computes it; returns the context `(B, L_q, heads, head_size)` and the map."""
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling + attention_mask
    attention = F.softmax(scores, dim=-1)
    context = torch.matmul(F.dropout(attention, dropout, module.training), value)
    return context.transpose(1, 2), attention


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether calling `module(x)` is `F.linear(x, module.weight, module.bias)` and nothing else: an `nn.Linear`
    itself, with a bias, with its class's forward (accelerate's offloading and device hooks replace it on the
    instance), no hooks of its own or global ones, and plain parameters that hold their values (not tensor
    subclasses such as sharded or quantised weights, nor offloaded to the meta device; plain tensors are the views
    of `RWSANWeightSharingEncoder.block_for_pass`)."""
    hooks = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    return (
        type(module) is nn.Linear
        and "forward" not in module.__dict__
        and not hooks
        and not _has_any_global_hook()
        and all(
            type(parameter) in (nn.Parameter, torch.Tensor) and not parameter.is_meta
            for parameter in (module.weight, module.bias)
        )
    )


class RWSANLowRankAttention(nn.Module):
    """Multi-head attention whose queries and keys have a small per-head size (`rank`), values the full head size.

    The scores are scaled by `1 / sqrt(rank)`. With `rank` far below the head size, computing the score matrix costs
    a fraction of standard attention; that is the paper's low-rank attention.
    """

    def __init__(self, config: RWSANConfig, rank: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.rank = rank
        self.head_size = config.hidden_size // config.num_attention_heads
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, rank * self.num_heads)
        self.query = nn.Linear(config.hidden_size, rank * self.num_heads)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout
        self.is_causal = False
        # Kept by reference so that `model.set_attn_implementation(...)` takes effect without rebuilding.
        self.config = config

    def _split_heads(self, states: torch.Tensor, head_size: int, padded_head_size: int | None = None) -> torch.Tensor:
        """`(B, L, heads * head_size)` -> `(B, heads, L, head_size)`, each head padded with zeros to
        `padded_head_size` where given (before the transposition, so that heads stay side by side in memory, the
        layout cuDNN's attention takes)."""
        batch_size, length, _ = states.shape
        heads = states.view(batch_size, length, self.num_heads, head_size)
        if padded_head_size is not None and padded_head_size != head_size:
            heads = F.pad(heads, (0, padded_head_size - head_size))
        return heads.transpose(1, 2)

    def _project(self, states: torch.Tensor, layers: tuple[nn.Linear, ...]) -> torch.Tensor:
        """`states` through each of `layers`, the outputs side by side `(B, L, sum of out_features)`.

        Layers that read the same input (all three in self-attention, the value and key in guided attention) run as
        one matrix product over their stacked weights: the key and query layers are narrow (`rank * heads`
        outputs), and on a GPU small products and their backward passes cost mostly their launches. Layers that
        are anything more than a plain `nn.Linear` (adapters, hooks, offloaded or quantised weights: see
        `_is_plain_linear`) are called one by one, as they are.
        """
        if not all(_is_plain_linear(layer) for layer in layers):
            return torch.cat([layer(states) for layer in layers], dim=-1)
        weight = torch.cat([layer.weight for layer in layers])
        bias = torch.cat([layer.bias for layer in layers])
        return F.linear(states, weight, bias)

    def project_values_and_keys(self, key_value_states: torch.Tensor) -> torch.Tensor:
        """The values and keys of the sequence attended to, side by side: `(B, L_k, H + rank * heads)`, for
        `forward`'s `values_and_keys`."""
        return self._project(key_value_states, (self.value, self.key))

    def forward(
        self,
        query_states: torch.Tensor,
        key_bias: torch.Tensor,
        output_attentions: bool = False,
        values_and_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            query_states: `(B, L_q, H)`, the sequence that attends.
            key_bias: `(B, 1, 1, L_k)`, 0 for real keys and `MASKED_SCORE` for padding, in the compute dtype.
            output_attentions: also return the attention map `(B, heads, L_q, L_k)` (computed eagerly). Otherwise
                the kernel is `config._attn_implementation` ("sdpa" by default), through transformers'
                attention interface.
            values_and_keys: `project_values_and_keys` of the sequence attended to; None for self-attention
                (`query_states` attends to itself).
        """
        batch_size, query_length, hidden_size = query_states.shape
        key_size = self.rank * self.num_heads
        if values_and_keys is None:
            projections = self._project(query_states, (self.value, self.key, self.query))
            values_and_keys, query = projections.split([hidden_size + key_size, key_size], dim=-1)
        else:
            query = self.query(query_states)
        value, key = values_and_keys.split([hidden_size, key_size], dim=-1)

        attention_interface = eager_attention_forward
        query_key_size = self.rank
        if not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            if self.config._attn_implementation == "sdpa":
                # Zeros appended to every query and key leave each score as it is (the scaling is passed below).
                query_key_size = -(-self.rank // FUSED_ATTENTION_HEAD_MULTIPLE) * FUSED_ATTENTION_HEAD_MULTIPLE
        value = self._split_heads(value, self.head_size)
        key = self._split_heads(key, self.rank, query_key_size)
        query = self._split_heads(query, self.rank, query_key_size)
        context, attention = attention_interface(
            self,
            query,
            key,
            value,
            key_bias,
            dropout=self.dropout if self.training else 0.0,
            scaling=1 / math.sqrt(self.rank),
            is_causal=False,
        )
        context = context.reshape(batch_size, query_length, hidden_size)
        return self.output(context), (attention if output_attentions else None)


class RWSANSelfAttentionBlock(GradientCheckpointingLayer):
    """Post-norm self-attention + feed-forward block over the question (`SA` in the original)."""

    def __init__(self, config: RWSANConfig):
        super().__init__()
        self.attention = RWSANLowRankAttention(config, config.text_self_attention_rank)
        self.attention_dropout = nn.Dropout(config.dropout)
        self.attention_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.feed_forward = RWSANFeedForward(
            config.hidden_size, config.intermediate_size, config.hidden_size, config.dropout
        )
        self.feed_forward_dropout = nn.Dropout(config.dropout)
        self.feed_forward_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(
        self, question_states: torch.Tensor, question_bias: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`question_states` `(B, T, H)` and `question_bias` `(B, 1, 1, T)` (see `RWSANLowRankAttention.forward`)
        -> the new states `(B, T, H)` and, with `output_attentions`, the attention map `(B, heads, T, T)`."""
        attended, attention = self.attention(question_states, question_bias, output_attentions)
        question_states = self.attention_norm(question_states, self.attention_dropout(attended))
        question_states = self.feed_forward_norm(
            question_states, self.feed_forward_dropout(self.feed_forward(question_states))
        )
        return question_states, attention


class RWSANGuidedAttentionBlock(GradientCheckpointingLayer):
    """Post-norm image self-attention, question-guided attention and feed-forward block (`SGA` in the original)."""

    def __init__(self, config: RWSANConfig):
        super().__init__()
        self.self_attention = RWSANLowRankAttention(config, config.image_self_attention_rank)
        self.self_attention_dropout = nn.Dropout(config.dropout)
        self.self_attention_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.guided_attention = RWSANLowRankAttention(config, config.guided_attention_rank)
        self.guided_attention_dropout = nn.Dropout(config.dropout)
        self.guided_attention_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.feed_forward = RWSANFeedForward(
            config.hidden_size, config.intermediate_size, config.hidden_size, config.dropout
        )
        self.feed_forward_dropout = nn.Dropout(config.dropout)
        self.feed_forward_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(
        self,
        image_states: torch.Tensor,
        question_values_and_keys: torch.Tensor,
        image_bias: torch.Tensor,
        question_bias: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`image_states` `(B, R, H)`; `question_values_and_keys` `(B, T, H + rank * heads)`, the guided attention's
        `project_values_and_keys` of the question states; `image_bias` `(B, 1, 1, R)` and `question_bias`
        `(B, 1, 1, T)` (see `RWSANLowRankAttention.forward`) -> the new states `(B, R, H)` and, with
        `output_attentions`, the self-attention map `(B, heads, R, R)` and the guided one `(B, heads, R, T)`."""
        attended, self_attention = self.self_attention(image_states, image_bias, output_attentions)
        image_states = self.self_attention_norm(image_states, self.self_attention_dropout(attended))
        attended, guided_attention = self.guided_attention(
            image_states, question_bias, output_attentions, question_values_and_keys
        )
        image_states = self.guided_attention_norm(image_states, self.guided_attention_dropout(attended))
        image_states = self.feed_forward_norm(image_states, self.feed_forward_dropout(self.feed_forward(image_states)))
        return image_states, self_attention, guided_attention


def _autocast_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype autocast computes a `dtype` tensor in on `device_type`: its own where it is active, except for
    float64, which it leaves as it is; `dtype` where it is not active."""
    if torch.is_autocast_enabled(device_type) and dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return dtype


def _weight_layout(block: nn.Module) -> tuple[tuple[str, tuple[int, ...], bool], ...]:
    """The block's parameter names and shapes, in `named_parameters()` order, each with whether it is a linear
    layer's (which autocast casts to its lower precision)."""
    linear = {
        f"{module_name}.{name}"
        for module_name, module in block.named_modules()
        if isinstance(module, nn.Linear)
        for name, _ in module.named_parameters(recurse=False)
    }
    return tuple((name, tuple(parameter.shape), name in linear) for name, parameter in block.named_parameters())


def _linear_and_other(items: list, layout: tuple) -> tuple[list, list]:
    """`items`, one per parameter of a block's `_weight_layout`, parted into its linear layers' and the others',
    each in layout order."""
    linear = [item for item, (*_, is_linear) in zip(items, layout, strict=True) if is_linear]
    other = [item for item, (*_, is_linear) in zip(items, layout, strict=True) if not is_linear]
    return linear, other


class RWSANWeightSharingEncoder(nn.Module):
    """Base of the two encoders, each applying its one `block` several times a forward pass."""

    def __init__(self):
        super().__init__()
        # Set by `compile_block_with_weights`, for `block_for_pass`: the function, the block it applies (weakly: a
        # module attribute would be registered as a submodule) and that block's parameter names and shapes.
        self.compiled_block_with_weights = None
        self.compiled_block = None
        self.block_weight_layout = ()

    def __getstate__(self):
        # Copies and pickles leave the compiled application out, as `nn.Module` leaves out that of `compile`: it
        # holds this encoder's block, not the copy's.
        return {**super().__getstate__(), "compiled_block_with_weights": None, "compiled_block": None}

    def compile_block_with_weights(self, **compile_kwargs):
        """Compiles `(linear_weights, other_weights, *inputs) -> block(*inputs)` with the block's parameters
        replaced by views of two tensors, the concatenations (in `named_parameters()` order) of its linear layers'
        parameters and of the others', for `block_for_pass`."""
        block = self.block
        layout = _weight_layout(block)
        groups = _linear_and_other([(name, shape) for name, shape, _ in layout], layout)

        def apply(linear_weights: torch.Tensor, other_weights: torch.Tensor, *inputs):
            views = {}
            for weights, group in zip((linear_weights, other_weights), groups):
                pieces = weights.split([math.prod(shape) for _, shape in group])
                views.update({name: piece.view(shape) for (name, shape), piece in zip(group, pieces)})
            return torch.func.functional_call(block, views, inputs)

        self.block_weight_layout = layout
        self.compiled_block = weakref.ref(block)
        self.compiled_block_with_weights = torch.compile(apply, **compile_kwargs)

    def block_for_pass(self) -> Callable | None:
        """What applies the block during one forward pass: None for the block itself or, in training once
        `compile_block_with_weights` has run, its compiled application to all its weights cut from two tensors
        (the linear layers' and the others'), concatenated here once a pass. (Not the block: passed to the
        encoder, a module would be moved by the device hooks of accelerate's `device_map`, which cannot move
        offloaded weights.)

        Every application then adds one gradient to each tensor, where each weight would receive one of its own:
        the autograd engine sums one gradient per application instead of one per weight and application (about
        350 small kernels a training step at the paper's configuration), and inductor writes each application's
        gradients as two tensors. Under autocast the linear layers' tensor is cast to autocast's precision here,
        once a pass, as autocast's cache casts the eager model's plain linear weights once a pass: the
        applications would otherwise cast their views of it again, each one. The applications' gradients of the
        cast tensor are then summed in that precision, as the eager model sums those of its cached weights; the
        self-attention's value, key and query weights, which the eager model stacks (and so casts again in each
        application, summing their gradients in float32), are summed in that precision here too. The result is
        the same up to its rounding. A block replaced or changed since (other parameters, frozen ones, gradient
        checkpointing, which would recompute with the block's own weights) is applied as it is. The guided
        attention's value and key weights, which `RWSANResidualGuidedAttention.project_question` reads outside the
        block, are in the linear layers' tensor too, so that it holds those layers' weights in one layout; the
        block's applications give them zero gradients."""
        if self.compiled_block_with_weights is None or not (self.training and torch.is_grad_enabled()):
            return None
        parameters = list(self.block.parameters())
        flattenable = (
            self.compiled_block() is self.block
            and not self.block.gradient_checkpointing
            and _weight_layout(self.block) == self.block_weight_layout
            and all(type(parameter) is nn.Parameter and parameter.requires_grad for parameter in parameters)
            and len({(parameter.dtype, parameter.device) for parameter in parameters}) == 1
        )
        if not flattenable:
            return None
        linear_weights, other_weights = (
            torch.cat(pieces) if pieces else parameters[0].new_empty(0)
            for pieces in _linear_and_other(
                [parameter.reshape(-1) for parameter in parameters], self.block_weight_layout
            )
        )
        linear_weights = linear_weights.to(_autocast_dtype(linear_weights.dtype, linear_weights.device.type))
        return functools.partial(self.compiled_block_with_weights, linear_weights, other_weights)


class RWSANResidualSelfAttention(RWSANWeightSharingEncoder):
    """SRWSA: one self-attention block applied three times, each time on its output added to the block's input.

    x1 = SA(x); x2 = SA(LN(x1 + x)); x3 = SA(LN(x2 + x)).
    """

    def __init__(self, config: RWSANConfig):
        super().__init__()
        self.block = RWSANSelfAttentionBlock(config)
        self.second_input_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.third_input_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(
        self,
        question_states: torch.Tensor,
        question_bias: torch.Tensor,
        output_attentions: bool = False,
        block: Callable | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`block`: what applies `self.block` (None: itself), from `block_for_pass`."""
        block = self.block if block is None else block
        first, first_attention = block(question_states, question_bias, output_attentions)
        second, second_attention = block(
            self.second_input_norm(first, question_states), question_bias, output_attentions
        )
        third, third_attention = block(self.third_input_norm(second, question_states), question_bias, output_attentions)
        return third, (first_attention, second_attention, third_attention)


class RWSANResidualGuidedAttention(RWSANWeightSharingEncoder):
    """SGRWSA: one guided-attention block applied three times, with the paper's asymmetric residuals.

    y1 = SGA(x, y); y2 = SGA(x, LN(y1 + y)); y3 = SGA(x, y2); output LN(y3 + y).
    """

    def __init__(self, config: RWSANConfig):
        super().__init__()
        self.block = RWSANGuidedAttentionBlock(config)
        self.second_input_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.output_norm = RWSANLayerNorm(config.hidden_size, config.layer_norm_eps)

    def project_question(self, question_states: torch.Tensor) -> torch.Tensor:
        """The values and keys the block's guided attention reads from the question states, `(B, T, H + rank *
        heads)`: the same in every application, so projected once a forward pass. Hooks and adapters on those two
        layers run once a pass too (an adapter's dropout draws one mask for all applications)."""
        return self.block.guided_attention.project_values_and_keys(question_states)

    def forward(
        self,
        image_states: torch.Tensor,
        question_values_and_keys: torch.Tensor,
        image_bias: torch.Tensor,
        question_bias: torch.Tensor,
        output_attentions: bool = False,
        block: Callable | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """`question_values_and_keys` from `project_question`; `block`: what applies `self.block` (None: itself),
        from `block_for_pass`."""
        block = self.block if block is None else block
        args = (question_values_and_keys, image_bias, question_bias, output_attentions)
        first, first_self, first_guided = block(image_states, *args)
        second, second_self, second_guided = block(self.second_input_norm(first, image_states), *args)
        third, third_self, third_guided = block(second, *args)
        output = self.output_norm(third, image_states)
        return output, (first_self, second_self, third_self), (first_guided, second_guided, third_guided)


class RWSANAttentionFlattening(nn.Module):
    """Pools a sequence to one vector: an MLP scores each position, a masked softmax weighs them, a linear maps."""

    def __init__(self, config: RWSANConfig):
        super().__init__()
        self.score = RWSANFeedForward(config.hidden_size, config.flat_mlp_size, 1, config.dropout)
        self.output = nn.Linear(config.hidden_size, config.flat_output_size)

    def forward(self, states: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`states` `(B, L, H)`, `padding` `(B, L)` True at padding -> `(B, flat_output_size)`, weights `(B, L)`."""
        scores = self.score(states).squeeze(-1).masked_fill(padding, MASKED_SCORE)
        weights = F.softmax(scores, dim=-1)
        pooled = torch.matmul(weights.unsqueeze(1), states).squeeze(1)
        return self.output(pooled), weights


def _pipeline_code_is_in(entry, folder) -> bool:
    """Whether the file of a `custom_pipelines` entry (`{"impl": "module.Class", ...}`) is in `folder`; entries of
    another form are kept as they are."""
    implementation = entry.get("impl") if isinstance(entry, dict) else None
    if not isinstance(implementation, str) or "." not in implementation:
        return True
    return os.path.isfile(os.path.join(folder, implementation.split(".")[0] + ".py"))


class RWSANPreTrainedModel(PreTrainedModel):
    config: RWSANConfig
    config_class = RWSANConfig
    base_model_prefix = "rwsan"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["RWSANSelfAttentionBlock", "RWSANGuidedAttentionBlock"]

    def __init__(self, config: RWSANConfig, *inputs, **kwargs):
        # `from_pretrained(folder, **kwargs)` sets its keyword arguments on the config after the config's own checks.
        config.check()
        super().__init__(config, *inputs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; where it writes this file beside the weights (the class is registered
        for an auto class), the config's `auto_map` names both [`RWSANModel`] for `AutoModel` and [`RWSANForVQA`]
        for `AutoModelForVisualQuestionAnswering`, so that `from_pretrained(folder, trust_remote_code=True)` of
        either loads as it does with `rwsan` installed: the encoder of a VQA folder, or an encoder's folder with a
        new classifier. (A class registers for one auto class only.)

        The saved config names only the custom pipelines whose code is in `save_directory`: a model loaded from a
        pipeline's folder carries its `custom_pipelines`, and a plain save of it (a training checkpoint, say) would
        send `pipeline(model=folder, trust_remote_code=True)` looking for a file that is not there. The pipeline's
        own save writes its file first."""
        if self._auto_class is not None:
            module_name = __name__.rsplit(".", 1)[-1]
            auto_map = getattr(self.config, "auto_map", None) or {}
            self.config.auto_map = {
                **auto_map,
                "AutoModel": f"{module_name}.RWSANModel",
                "AutoModelForVisualQuestionAnswering": f"{module_name}.RWSANForVQA",
            }
        custom_pipelines = getattr(self.config, "custom_pipelines", None)
        if not isinstance(custom_pipelines, dict):
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.config.custom_pipelines = {
            task: entry for task, entry in custom_pipelines.items() if _pipeline_code_is_in(entry, save_directory)
        }
        if not self.config.custom_pipelines:
            del self.config.custom_pipelines
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.custom_pipelines = custom_pipelines

    def compile_blocks(self, **compile_kwargs) -> "RWSANPreTrainedModel":
        """Compiles the weight-shared attention blocks in place: `torch.compile(**compile_kwargs)` on each (regional
        compilation), and on each layer norm outside them; returns the model.

        The two blocks do nearly all of the computation, each applied several times a forward pass with the same shapes
        (9 times at the paper's configuration), so the compiler traces two small graphs rather than one with every
        application unrolled, and compiles for less time than `torch.compile(model)`. In training, each block is
        compiled with its weights as two inputs (its linear layers', cast once a pass under autocast, and the
        others'), so that their gradients are summed once per application (see
        `RWSANWeightSharingEncoder.block_for_pass`). The layer norms outside the blocks, applied 13 times a forward
        pass at the paper's configuration, and the two attention flattenings are compiled too: eagerly each is a
        string of small operators, forward and backward (a flattening's are about 50 kernels on a GPU, each a few
        microseconds). The rest (embedding, LSTM, projection, classifier) stays eager. Parameter names and saved
        weights do not change. Pass `dynamic=True` when batches come in several padded shapes, so that one
        compilation serves them all. Modes that record CUDA graphs (`reduce-overhead`) break inference: one
        application's output, the next one's input, is overwritten (pytorch/pytorch#152887).

        Both blocks run through one function of transformers (`GradientCheckpointingLayer`'s forward wrapper),
        whose compilations TorchDynamo counts together: training, evaluation and autocast variants of the two
        blocks can pass its default limit of 8, after which the blocks would silently run eagerly. The limit
        (`torch._dynamo.config.recompile_limit`, process-wide) is raised to at least 64.
        """
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
        encoders = [m for m in self.modules() if isinstance(m, RWSANWeightSharingEncoder)]
        inside_blocks = {id(module) for encoder in encoders for module in encoder.block.modules()}
        norms = [m for m in self.modules() if isinstance(m, RWSANLayerNorm) and id(m) not in inside_blocks]
        flattenings = [m for m in self.modules() if isinstance(m, RWSANAttentionFlattening)]
        for module in [encoder.block for encoder in encoders] + norms + flattenings:
            module.compile(**compile_kwargs)
        for encoder in encoders:
            encoder.compile_block_with_weights(**compile_kwargs)
        return self

    def _init_weights(self, module: nn.Module):
        """PyTorch's default initialisation of each layer, which the original code relies on.

        The paper trains from these (the original builds plain `nn.Linear`, `nn.Embedding` and `nn.LSTM` and never
        re-initialises them), so training from scratch follows its recipe rather than transformers' usual
        normal(0, 0.02). `transformers.initialization` functions leave loaded weights alone.
        """
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight)
        elif isinstance(module, nn.LSTM):
            bound = 1 / math.sqrt(module.hidden_size)
            for parameter in module.parameters():
                init.uniform_(parameter, -bound, bound)
        elif isinstance(module, RWSANLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class RWSANModel(RWSANPreTrainedModel):
    """The RWSAN encoder and fusion, without the answer classifier.

    Question: embedding -> one-layer LSTM over all positions (padding included, as the original) -> SRWSA, applied
    `num_srwsa_repeats` times with the same weights. Image: linear projection of the region features -> SGRWSA,
    applied `num_sgrwsa_repeats` times with the same weights, guided by the final question states. Each modality is
    pooled by attention flattening; the sum is layer-normalised.
    """

    def __init__(self, config: RWSANConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.word_embedding_size)
        self.question_lstm = nn.LSTM(config.word_embedding_size, config.hidden_size, num_layers=1, batch_first=True)
        self.image_projection = nn.Linear(config.image_feature_size, config.hidden_size)
        self.question_encoder = RWSANResidualSelfAttention(config)
        self.image_encoder = RWSANResidualGuidedAttention(config)
        self.question_flattening = RWSANAttentionFlattening(config)
        self.image_flattening = RWSANAttentionFlattening(config)
        self.fusion_norm = RWSANLayerNorm(config.flat_output_size, config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RWSANModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, T)`): question token ids (int64 or int32); 0 is padding.
            image_features (`torch.FloatTensor` of shape `(B, R, image_feature_size)`): region features; rows of
                zeros are padding. Any float dtype; they are cast to the model's.
            attention_mask (`torch.Tensor` of shape `(B, T)`, *optional*): 1 for real tokens, 0 for padding.
                Derived from `input_ids != config.pad_token_id` when not given, as the original does. Padding
                must follow the words, as the processor pads: the LSTM reads every position from the first, so
                padding in front changes the answer whatever the mask says. A question
                without any real token departs from the original: there every attention score over it is set to
                -5e4, so attention over it is uniform, while here -5e4 is added to the scores, which still shape
                the weights (logits differ by a few thousandths); VQA questions always have a word.
            image_attention_mask (`torch.Tensor` of shape `(B, R)`, *optional*): 1 for real regions, 0 for padding.
                Derived from the non-zero rows of `image_features` when not given, as the original does.
            output_attentions (`bool`, *optional*): return every attention map and the flattening weights
                (computed with the eager attention path).
            output_hidden_states (`bool`, *optional*): return the encoders' input states, then their states after
                each application of SRWSA (`num_srwsa_repeats`) and SGRWSA (`num_sgrwsa_repeats`): `1 + repeats`
                each, where each application runs its shared block three times.

        Inputs that are not tensors raise a `TypeError`; mis-shaped ones (masks that would broadcast, batches of
        different sizes, features of another size or integer features) a `ValueError`; values are not checked,
        which would make the GPU wait.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _check_input_shapes(self.config, input_ids, image_features, attention_mask, image_attention_mask)

        # The model's float dtype, not the projection's weight's: quantized layers hold integers, or no `weight` tensor.
        image_features = image_features.to(self.dtype)
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        if image_attention_mask is None:
            image_attention_mask = image_features.abs().sum(-1) != 0
        question_padding = attention_mask == 0
        image_padding = image_attention_mask == 0

        question_states, _ = self.question_lstm(self.word_embeddings(input_ids))
        image_states = self.image_projection(image_features)
        # Both are views of other tensors, the blocks' later inputs are not; a compiled block (`compile_blocks`)
        # would compile a second graph for its first application. Two small copies spare that compilation, and
        # lay the LSTM's output (time-major in memory) out batch-major, as every later operation reads it.
        question_states = question_states.clone(memory_format=torch.contiguous_format)
        image_states = image_states.clone()
        # Biases in the dtype the attention computes in, broadcast over heads and queries.
        compute_dtype = _autocast_dtype(image_states.dtype, image_states.device.type)
        question_bias = _padding_to_bias(question_padding, compute_dtype)
        image_bias = _padding_to_bias(image_padding, compute_dtype)

        question_hidden_states = (question_states,) if output_hidden_states else None
        image_hidden_states = (image_states,) if output_hidden_states else None
        question_attentions = () if output_attentions else None
        image_attentions = () if output_attentions else None
        guided_attentions = () if output_attentions else None

        apply_question_block = self.question_encoder.block_for_pass()
        apply_image_block = self.image_encoder.block_for_pass()
        for _ in range(self.config.num_srwsa_repeats):
            question_states, attentions = self.question_encoder(
                question_states, question_bias, output_attentions, apply_question_block
            )
            if output_hidden_states:
                question_hidden_states += (question_states,)
            if output_attentions:
                question_attentions += attentions
        question_values_and_keys = self.image_encoder.project_question(question_states)
        for _ in range(self.config.num_sgrwsa_repeats):
            image_states, self_attentions, cross_attentions = self.image_encoder(
                image_states, question_values_and_keys, image_bias, question_bias, output_attentions, apply_image_block
            )
            if output_hidden_states:
                image_hidden_states += (image_states,)
            if output_attentions:
                image_attentions += self_attentions
                guided_attentions += cross_attentions

        pooled_question, question_weights = self.question_flattening(question_states, question_padding)
        pooled_image, image_weights = self.image_flattening(image_states, image_padding)
        pooled = self.fusion_norm(pooled_question, pooled_image)

        output = RWSANModelOutput(
            pooler_output=pooled,
            question_last_hidden_state=question_states,
            image_last_hidden_state=image_states,
            question_hidden_states=question_hidden_states,
            image_hidden_states=image_hidden_states,
            question_attentions=question_attentions,
            image_attentions=image_attentions,
            guided_attentions=guided_attentions,
            question_flattening_weights=question_weights if output_attentions else None,
            image_flattening_weights=image_weights if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


def _check_input_shapes(
    config: RWSANConfig,
    input_ids: torch.Tensor,
    image_features: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_attention_mask: torch.Tensor | None,
) -> None:
    inputs = {
        "input_ids": input_ids,
        "image_features": image_features,
        "attention_mask": attention_mask,
        "image_attention_mask": image_attention_mask,
    }
    for name, value in inputs.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(value).__name__} (the processor returns tensors with "
                "return_tensors='pt')"
            )
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            "input_ids must be a (batch_size, question_length) tensor of int64 or int32 token ids, got shape "
            f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}"
        )
    if image_features.ndim != 3 or image_features.shape[-1] != config.image_feature_size:
        raise ValueError(
            f"image_features must have shape (batch_size, num_regions, {config.image_feature_size}), got "
            f"{tuple(image_features.shape)}"
        )
    if not image_features.is_floating_point():
        # Integer values would be cast unseen: features of an image's pixels, say, rather than its regions'.
        raise ValueError(f"image_features must be floating-point, got dtype {image_features.dtype}")
    if input_ids.shape[0] != image_features.shape[0]:
        raise ValueError(
            f"input_ids has {input_ids.shape[0]} questions but image_features has {image_features.shape[0]} images"
        )
    if 0 in input_ids.shape or image_features.shape[1] == 0:
        # The LSTM and the attention have nothing to run over; padding to one masked position is the way.
        raise ValueError(
            "the model needs at least one question, one token position and one region position (masked ones "
            f"count), got input_ids {tuple(input_ids.shape)} and image_features {tuple(image_features.shape)}"
        )
    if attention_mask is None and config.pad_token_id is None:
        raise ValueError("attention_mask is needed: config.pad_token_id is None, so input_ids cannot tell padding")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids, {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    if image_attention_mask is not None and image_attention_mask.shape != image_features.shape[:2]:
        raise ValueError(
            f"image_attention_mask must have the shape (batch_size, num_regions) of image_features, "
            f"{tuple(image_features.shape[:2])}, got {tuple(image_attention_mask.shape)}"
        )


def _padding_to_bias(padding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, L)` bool, True at padding -> additive attention bias `(B, 1, 1, L)`."""
    bias = torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(padding, MASKED_SCORE)
    return bias[:, None, None, :]


class RWSANForVQA(RWSANPreTrainedModel):
    """RWSAN with its answer classifier: a linear layer over the fused vector, one logit per answer."""

    def __init__(self, config: RWSANConfig):
        super().__init__(config)
        self.rwsan = RWSANModel(config)
        self.classifier = nn.Linear(config.flat_output_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.rwsan.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.rwsan.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.FloatTensor,
        attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        labels: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RWSANForVQAOutput | tuple:
        r"""
        Args are those of [`RWSANModel.forward`], plus:
            labels (`torch.FloatTensor` of shape `(B, A)`, *optional*): soft answer scores in [0, 1] (0.3, 0.6, 0.9,
                1.0 for answers given by 1, 2, 3, 4+ annotators). The loss is binary cross-entropy with logits, summed
                over answers and averaged over the batch, computed in float32.

        Example:

        ```python
        >>> import torch
        >>> from rwsan import RWSANConfig, RWSANForVQA
        >>> model = RWSANForVQA(RWSANConfig(vocab_size=100, num_labels=10)).eval()
        >>> input_ids = torch.tensor([[5, 8, 2, 0]])
        >>> image_features = torch.randn(1, 36, 2048)
        >>> model(input_ids=input_ids, image_features=image_features).logits.shape
        torch.Size([1, 10])
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.rwsan(
            input_ids=input_ids,
            image_features=image_features,
            attention_mask=attention_mask,
            image_attention_mask=image_attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels must have the shape (batch_size, num_labels) of the logits, {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape)}"
                )
            loss = (
                F.binary_cross_entropy_with_logits(
                    logits.float(), labels.to(logits.device, torch.float32), reduction="sum"
                )
                / logits.shape[0]
            )
        output = RWSANForVQAOutput(loss=loss, logits=logits, **outputs)
        return output if return_dict else output.to_tuple()

    def training_flops(self, batch_size: int, question_length: int, num_regions: int) -> int:
        """Floating-point operations of the matrix products of one training step (forward and backward) on a batch
        padded to `question_length` tokens and `num_regions` regions: what `torch.utils.flop_counter` counts, plus
        the LSTM's, which runs as one fused operator that the counter does not see.

        The backward pass costs twice the forward, except for the image projection, whose input (the region
        features) needs no gradient. At the paper configuration a sample padded to 16 tokens and 100 regions costs
        20.0 GFLOP, padded to 16 tokens and 36 regions 8.8.
        """
        config = self.config
        tokens, regions, hidden = question_length, num_regions, config.hidden_size
        heads, head_size = config.num_attention_heads, config.hidden_size // config.num_attention_heads

        def linear(positions: int, inputs: int, outputs: int) -> int:
            return 2 * positions * inputs * outputs

        def values_and_keys(positions: int, rank: int) -> int:
            return linear(positions, hidden, hidden) + linear(positions, hidden, rank * heads)

        def attention(queries: int, keys: int, rank: int) -> int:
            """The query and output projections (to `rank` per head and full size) and both products."""
            projections = linear(queries, hidden, rank * heads) + linear(queries, hidden, hidden)
            return projections + 2 * heads * queries * keys * (rank + head_size)

        def self_attention(positions: int, rank: int) -> int:
            return attention(positions, positions, rank) + values_and_keys(positions, rank)

        def feed_forward(positions: int) -> int:
            return 2 * linear(positions, hidden, config.intermediate_size)

        def flattening(positions: int) -> int:
            score = linear(positions, hidden, config.flat_mlp_size) + linear(positions, config.flat_mlp_size, 1)
            return score + 2 * positions * hidden + linear(1, hidden, config.flat_output_size)

        lstm = linear(tokens, config.word_embedding_size + hidden, 4 * hidden)
        question_block = self_attention(tokens, config.text_self_attention_rank) + feed_forward(tokens)
        image_block = (
            self_attention(regions, config.image_self_attention_rank)
            + attention(regions, tokens, config.guided_attention_rank)
            + feed_forward(regions)
        )
        # Each encoder pass applies its block three times.
        blocks = 3 * (config.num_srwsa_repeats * question_block + config.num_sgrwsa_repeats * image_block)
        # The guided attention's values and keys of the question, projected once for all applications.
        blocks += values_and_keys(tokens, config.guided_attention_rank)
        forward = lstm + blocks + flattening(tokens) + flattening(regions)
        forward += linear(1, config.flat_output_size, config.num_labels)
        image_projection = linear(regions, config.image_feature_size, hidden)
        # The forward pass once and the backward pass, twice the forward.
        return batch_size * (3 * forward + 2 * image_projection)


__all__ = ["RWSANPreTrainedModel", "RWSANModel", "RWSANForVQA", "RWSANModelOutput", "RWSANForVQAOutput"]
