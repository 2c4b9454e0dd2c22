"""Neuron-level models (NLMs): a private little MLP per neuron over its pre-activation history.

Each of the ``D`` neurons owns its weights. One layer maps a ``[B, D, in]`` history to
``[B, D, out]`` with weights ``w1[in, out, D]`` and bias ``b1[1, D, out]``, then divides by a
learned temperature ``T``. The deep variant stacks two layers with GLUs; the shallow one uses a
single layer into a GLU. Parameter names follow the reference so checkpoints load as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, in] -> [B, D, out]
        x = self.layernorm(self.dropout(x))
        out = torch.einsum("bdi,iod->bdo", x, self.w1) + self.b1
        return out / self.T


class SqueezeLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(-1)


class NeuronLevelModels(nn.Sequential):
    """History ``[B, D, M]`` of pre-activations -> post-activations ``[B, D]``.

    Wrapped in one extra ``Sequential`` level to keep the reference's parameter names
    (``trace_processor.0.0.w1`` ...).
    """

    def __init__(self, d_model: int, memory_length: int, deep: bool, hidden_dims: int,
                 do_layernorm: bool, dropout: float):
        if deep:
            layers = [
                PerNeuronLinear(memory_length, 2 * hidden_dims, d_model, do_layernorm, dropout),
                nn.GLU(),
                PerNeuronLinear(hidden_dims, 2, d_model, do_layernorm, dropout),
                nn.GLU(),
                SqueezeLast(),
            ]
        else:
            layers = [PerNeuronLinear(memory_length, 2, d_model, do_layernorm, dropout), nn.GLU(), SqueezeLast()]
        super().__init__(nn.Sequential(*layers))
