"""Synapses: the recurrent model that mixes [attention output, post-activations] into new pre-activations.

Depth 1 is dropout -> linear -> GLU -> LayerNorm. Deeper synapses are a U-Net over widths
``linspace(d_model, 16, depth)``: a first projection, ``depth - 1`` down blocks, then up blocks
with layer-normed skip connections back to ``d_model``. Module names follow the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .tick_grads import TickLinear

UNET_MIN_WIDTH = 16


def _block(dropout: float, width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout), TickLinear(width_in, width_out), nn.LayerNorm(width_out), nn.SiLU()
    )


class SynapseUNet(nn.Module):
    def __init__(
        self,
        in_dims: int,
        d_model: int,
        depth: int,
        dropout: float = 0.0,
        min_width: int = UNET_MIN_WIDTH,
    ):
        super().__init__()
        widths = [int(w) for w in np.linspace(d_model, min_width, depth)]
        self.first_projection = nn.Sequential(
            TickLinear(in_dims, widths[0]), nn.LayerNorm(widths[0]), nn.SiLU()
        )
        self.down_projections = nn.ModuleList(
            _block(dropout, widths[i], widths[i + 1]) for i in range(depth - 1)
        )
        self.up_projections = nn.ModuleList(
            _block(dropout, widths[i + 1], widths[i]) for i in range(depth - 1)
        )
        self.skip_lns = nn.ModuleList(nn.LayerNorm(widths[i]) for i in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = [self.first_projection(x)]
        for down in self.down_projections:
            levels.append(down(levels[-1]))
        out = levels[-1]
        for level in reversed(range(len(self.up_projections))):
            out = self.skip_lns[level](self.up_projections[level](out) + levels[level])
        return out


def build_synapses(in_dims: int, d_model: int, depth: int, dropout: float) -> nn.Module:
    if depth == 1:
        return nn.Sequential(
            nn.Dropout(dropout), TickLinear(in_dims, 2 * d_model), nn.GLU(), nn.LayerNorm(d_model)
        )
    return SynapseUNet(in_dims, d_model, depth, dropout)
