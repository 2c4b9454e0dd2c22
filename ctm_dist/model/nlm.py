"""Neuron-level models (NLMs): a private little MLP per neuron over its pre-activation history.

Each of the ``D`` neurons owns its weights. One layer maps a neuron's ``in`` history values to
``out`` values with its slice of ``w1[in, out, D]`` and ``b1[1, D, out]``, then divides by a
learned temperature ``T``. The deep variant stacks two such layers with GLUs; the shallow one
uses a single layer into a GLU. Parameter names and layouts follow the reference so checkpoints
load as they are.

For speed the computation is neuron-major with the batch last: histories are ``[D, M, B]`` and
the weights are permuted once per forward to ``[D, out, in]``, so each layer is one contiguous
batched matmul ``W_d @ x_d`` whose result has a batch-wide row per output (the reference's einsum
over ``[B, D, M]`` makes CPU bmm loop over neurons; ``x_d @ W_d`` with the batch as rows measured
about 20 % slower than this orientation over both layers, forward and backward, as the second
layer's two-column products are poorly shaped for BLAS). The GLUs split rows, which are contiguous
blocks. The temperature is folded into the per-forward weights and biases
(``(Wx + b) / T = (W/T)x + b/T``), which saves a division and its backward at every tick.
(Summing the per-neuron weight gradients over ticks, as ``tick_grads.py`` does for the other
layers, measured slower here: the factors' concatenation costs more than the per-tick batched
matmuls it saves; adding each tick's product into one buffer in place measured no faster.)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

class PerNeuronLinear(nn.Module):
    """``D`` independent linear maps, one per neuron (the reference calls it ``SuperLinear``)."""

    def __init__(self, in_dims: int, out_dims: int, n_neurons: int, do_norm: bool = False, dropout: float = 0.0):
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

    def forward(self, x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
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

    def __init__(self, d_model: int, memory_length: int, deep: bool, hidden_dims: int,
                 do_layernorm: bool, dropout: float):
        super().__init__()
        if deep:
            layers = [PerNeuronLinear(memory_length, 2 * hidden_dims, d_model, do_layernorm, dropout), nn.GLU(),
                      PerNeuronLinear(hidden_dims, 2, d_model, do_layernorm, dropout), nn.GLU()]
        else:
            layers = [PerNeuronLinear(memory_length, 2, d_model, do_layernorm, dropout), nn.GLU()]
        self.add_module("0", nn.Sequential(*layers))

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
