"""Neuron-level models (NLMs): a private little MLP per neuron over its pre-activation history.

Each of the ``D`` neurons owns its weights. One layer maps a neuron's ``in`` history values to
``out`` values with its slice of ``w1[in, out, D]`` and ``b1[1, D, out]``, then divides by a
learned temperature ``T``. The deep variant stacks two such layers with GLUs; the shallow one
uses a single layer into a GLU. Parameter names and layouts follow the reference so checkpoints
load as they are.

The computation is neuron-major with the batch last: histories are ``[D, M, B]`` and the
weights are permuted once per forward to ``[D, out, in]``, so each layer is one contiguous
batched matmul ``W_d @ x_d`` whose result has a batch-wide row per output, and the GLUs split
rows, which are contiguous blocks. The reference's einsum over ``[B, D, M]`` makes CPU bmm loop
over neurons; with the batch as rows instead (``x_d @ W_d``) the second layer's products have
two columns, a shape BLAS handles poorly (that orientation costs about 20 % more over both
layers, forward and backward, on CPU; 2026-11). The temperature is folded into the per-forward
weights and biases (``(Wx + b) / T = (W/T)x + b/T``), which saves a division and its backward at
every tick.

The NLM weight gradients are left to autograd tick by tick, unlike the layers of
``tick_grads.py``: each neuron's weight is tiny (``[out, in]``) and its per-tick factors
(``[out, B]``, ``[in, B]``) are about as large as their product, so concatenating the factors over
ticks costs more than the per-tick batched matmuls it would save.

``recomputed_nlms`` (config ``recompute_nlms``) runs a tick's NLMs without keeping their history
or hidden activations for backward and runs them again there, the history rebuilt from the
pre-activation columns that are kept anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F


class PerNeuronLinear(nn.Module):
    """``D`` independent linear maps, one per neuron (the reference calls it ``SuperLinear``)."""

    def __init__(
        self,
        in_dims: int,
        out_dims: int,
        n_neurons: int,
        do_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.layernorm = nn.LayerNorm(in_dims) if do_norm else nn.Identity()
        bound = 1.0 / math.sqrt(in_dims + out_dims)
        self.w1 = nn.Parameter(torch.empty(in_dims, out_dims, n_neurons).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.zeros(1, n_neurons, out_dims))
        self.T = nn.Parameter(torch.ones(1))

    def neuron_major_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``w1 / T`` as ``[D, out, in]``, contiguous; ``b1 / T`` as ``[D, out, 1]``)."""
        return (self.w1 / self.T).permute(2, 1, 0).contiguous(), (self.b1 / self.T).permute(1, 2, 0)

    def forward(
        self, x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[D, in, B] -> [D, out, B]; ``weight`` is ``neuron_major_weight()`` computed ahead."""
        x = self.dropout(x)
        if not isinstance(self.layernorm, nn.Identity):
            x = self.layernorm(x.transpose(1, 2)).transpose(1, 2)
        weight, bias = self.neuron_major_weight() if weight is None else weight
        return torch.baddbmm(bias, weight, x)


class NeuronLevelModels(nn.Module):
    """History ``[D, M, B]`` of pre-activations -> post-activations ``[B, D]``.

    The layers sit in a ``Sequential`` named ``0`` with the GLUs between them, which keeps the
    reference's parameter names (``trace_processor.0.0.w1``, ``trace_processor.0.2.w1``).
    """

    def __init__(
        self,
        d_model: int,
        memory_length: int,
        deep: bool,
        hidden_dims: int,
        do_layernorm: bool,
        dropout: float,
    ):
        super().__init__()
        if deep:
            layers = [
                PerNeuronLinear(memory_length, 2 * hidden_dims, d_model, do_layernorm, dropout),
                nn.GLU(),
                PerNeuronLinear(hidden_dims, 2, d_model, do_layernorm, dropout),
                nn.GLU(),
            ]
        else:
            layers = [PerNeuronLinear(memory_length, 2, d_model, do_layernorm, dropout), nn.GLU()]
        self.add_module("0", nn.Sequential(*layers))

    @property
    def uses_dropout(self) -> bool:
        return any(not isinstance(m.dropout, nn.Identity) for m in self.linears)

    def direct_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters ``forward`` reads itself when given ``weights``: the layernorms'."""
        return {
            f"0.{i}.layernorm.{name}": p
            for i, linear in enumerate(self._modules["0"])
            if isinstance(linear, PerNeuronLinear) and isinstance(linear.layernorm, nn.LayerNorm)
            for name, p in (("weight", linear.layernorm.weight), ("bias", linear.layernorm.bias))
        }

    @property
    def linears(self) -> list[PerNeuronLinear]:
        return [m for m in self._modules["0"] if isinstance(m, PerNeuronLinear)]

    def neuron_major_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(linear.neuron_major_weight() for linear in self.linears)

    def forward(self, trace: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        weights = self.neuron_major_weights() if weights is None else weights
        out = trace
        for linear, weight in zip(self.linears, weights):
            out = F.glu(linear(out, weight), dim=1)
        return out.squeeze(1).t()


class _RecomputedNLMs(Function):
    """The NLMs of one tick, keeping for backward only the history's columns, not the history.

    The history ``[D, M, B]`` and the hidden activations are what fill memory; the columns (one
    ``[D, B]`` per tick, shared by the ``M`` ticks whose histories hold it) rebuild the history in
    backward, where the NLMs run again with the same RNG and autocast state as in forward.
    ``tensors`` are the layers' ``(weight, bias)`` pairs flattened, then the parameters the NLMs
    read directly (``direct`` names them: their layernorms').
    """

    @staticmethod
    def forward(ctx, nlms, columns, direct, trace, *tensors):
        device = trace.device
        ctx.nlms, ctx.n_columns, ctx.direct = nlms, len(columns), direct
        ctx.autocast = (
            device.type,
            torch.get_autocast_dtype(device.type),
            torch.is_autocast_enabled(device.type),
        )
        ctx.rng = _rng_state(device) if nlms.training and nlms.uses_dropout else None
        # layernorms and autocast go through autograd again in backward; otherwise it is written out
        ctx.by_hand = not direct and not ctx.autocast[2]
        ctx.save_for_backward(*columns, *tensors)
        with torch.no_grad():
            return nlms(trace, _pairs(tensors[: len(tensors) - len(direct)]))

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n, direct = ctx.n_columns, ctx.direct
        trace = torch.stack(saved[:n], dim=1)
        device = trace.device
        dropout_rng = ctx.rng is not None
        with torch.random.fork_rng(
            [device] if dropout_rng and device.type != "cpu" else [],
            enabled=dropout_rng,
            device_type=device.type,
        ):
            if dropout_rng:
                _set_rng_state(device, ctx.rng)
            if ctx.by_hand:
                dropouts = [linear.dropout for linear in ctx.nlms.linears] if dropout_rng else None
                grad_trace, weight_grads = _nlm_backward(trace, _pairs(saved[n:]), grad, dropouts)
                return (None, None, None, grad_trace, *(g for pair in weight_grads for g in pair))
            trace.requires_grad_()
            tensors = [t.detach().requires_grad_(t.requires_grad) for t in saved[n:]]
            weights, direct_values = (
                _pairs(tensors[: len(tensors) - len(direct)]),
                tensors[len(tensors) - len(direct) :],
            )
            with (
                torch.enable_grad(),
                torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1], enabled=ctx.autocast[2]),
            ):
                out = (
                    torch.func.functional_call(
                        ctx.nlms, dict(zip(direct, direct_values)), (trace, weights)
                    )
                    if direct
                    else ctx.nlms(trace, weights)
                )
        # backward(inputs=...) rather than autograd.grad: module hooks (e.g. FlopCounterMode's) refuse leaves in .grad
        torch.autograd.backward(out, grad, inputs=[trace] + [t for t in tensors if t.requires_grad])
        return (None, None, None, trace.grad, *(t.grad for t in tensors))


def _nlm_backward(
    trace: torch.Tensor, weights: tuple, grad: torch.Tensor, dropouts: list[nn.Module] | None = None
) -> tuple[torch.Tensor, list]:
    """Gradients of ``NeuronLevelModels.forward(trace, weights)`` (no layernorm) w.r.t. the trace and each
    layer's (weight, bias), from ``grad`` of its ``[B, D]`` output; runs the layers again.

    With ``dropouts`` (the layers' dropout modules, the RNG state being the forward's) the masks are
    drawn again: dropout scales its input by noise whose draw depends only on the shape, so applying
    it to ones gives the forward's noise."""
    inputs, noises, pre_glus = [], [], []
    x = trace
    for i, (weight, bias) in enumerate(weights):
        noise = dropouts[i](torch.ones_like(x)) if dropouts is not None else None
        x = x * noise if noise is not None else x
        inputs.append(x)
        noises.append(noise)
        pre_glus.append(torch.baddbmm(bias, weight, x))
        x = F.glu(pre_glus[-1], dim=1)
    grad_x = grad.t().unsqueeze(1)
    weight_grads = []
    for (weight, bias), x, noise, pre_glu in zip(
        reversed(weights), reversed(inputs), reversed(noises), reversed(pre_glus)
    ):
        grad_pre = torch.ops.aten.glu_backward(grad_x, pre_glu, 1)
        weight_grads.append((torch.bmm(grad_pre, x.transpose(1, 2)), grad_pre.sum(2, keepdim=True)))
        grad_x = torch.bmm(weight.transpose(1, 2), grad_pre)
        grad_x = grad_x * noise if noise is not None else grad_x
    return grad_x, weight_grads[::-1]


def _pairs(flat):
    return tuple(zip(flat[0::2], flat[1::2]))


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def recomputed_nlms(
    nlms: NeuronLevelModels, trace: torch.Tensor, columns: tuple[torch.Tensor, ...], weights: tuple
) -> torch.Tensor:
    """``nlms(trace, weights)``, run again in backward instead of keeping its activations.

    ``columns``: the ``M`` columns ``[D, B]`` of ``trace``, oldest first, each contiguous."""
    direct = nlms.direct_parameters()
    return _RecomputedNLMs.apply(
        nlms,
        columns,
        tuple(direct),
        trace,
        *(t for pair in weights for t in pair),
        *direct.values(),
    )
