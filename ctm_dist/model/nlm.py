"""Neuron-level models (NLMs): a private little MLP per neuron over its pre-activation history.

Each of the ``D`` neurons owns its weights. One layer maps a neuron's ``in`` history values to
``out`` values with its slice of ``w1[in, out, D]`` and ``b1[1, D, out]``, then divides by a
learned temperature ``T``. The deep variant stacks two such layers with GLUs; the shallow one
uses a single layer into a GLU. Parameter names and layouts follow the reference so checkpoints
load as they are.

For speed the computation is neuron-major: histories are ``[D, B, M]`` and the weights are
permuted once per forward to ``[D, in, out]``, so each layer is one contiguous batched matmul
(the reference's einsum over ``[B, D, M]`` makes CPU bmm loop over neurons). The temperature is
folded into those per-forward weights and biases (``(xW + b) / T = x(W/T) + b/T``), which saves
a division and its backward over ``[D, B, out]`` at every tick. (Summing the per-neuron weight
gradients over ticks, as ``tick_grads.py`` does for the other layers, measured slower here: the
factors' concatenation costs more than the per-tick batched matmuls it saves.)
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
        """(``w1 / T`` as ``[D, in, out]``, contiguous; ``b1 / T`` as ``[D, 1, out]``)."""
        return (self.w1 / self.T).permute(2, 0, 1).contiguous(), (self.b1 / self.T).transpose(0, 1)

    def forward(self, x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """[D, B, in] -> [D, B, out]; ``weight`` is ``neuron_major_weight()`` computed ahead."""
        x = self.layernorm(self.dropout(x))
        weight, bias = self.neuron_major_weight() if weight is None else weight
        return torch.baddbmm(bias, x, weight)


class NeuronLevelModels(nn.Module):
    """History ``[D, B, M]`` of pre-activations -> post-activations ``[B, D]``.

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
            out = F.glu(linear(out, weight), dim=-1)
        return out.squeeze(-1).t()
