"""Positional embeddings added to backbone features before they become attention keys/values.

All map a feature map ``[B, C, H, W]`` (or sequence ``[B, C, L]`` for the 1-d variant) to an
embedding that broadcasts against it. Parameter names follow the reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _grid_coordinates(h: int, w: int, device, dtype) -> torch.Tensor:
    """[H, W, 2] coordinates (x, y), each scaled to [0, 1]."""
    xs = torch.arange(w, device=device, dtype=dtype) / max(w - 1, 1)
    ys = torch.arange(h, device=device, dtype=dtype) / max(h - 1, 1)
    return torch.stack((xs.expand(h, w), ys.unsqueeze(1).expand(h, w)), dim=-1)


class LearnableFourierEmbedding(nn.Module):
    """Learnable Fourier features of 2-d coordinates (Li et al. 2021, arXiv:2106.02795, Algorithm 1)."""

    def __init__(
        self, d_model: int, gamma: float = 1 / 2.5, fourier_dims: int = 256, hidden_dims: int = 128
    ):
        super().__init__()
        self.fourier_dims = fourier_dims
        self.Wr = nn.Linear(2, fourier_dims // 2, bias=False)
        nn.init.normal_(self.Wr.weight, mean=0.0, std=gamma**-2)
        self.mlp = nn.Sequential(
            nn.Linear(fourier_dims, hidden_dims),
            nn.GLU(),
            nn.Linear(hidden_dims // 2, d_model),
            nn.LayerNorm(d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        angles = self.Wr(_grid_coordinates(h, w, x.device, x.dtype))
        features = torch.cat((torch.cos(angles), torch.sin(angles)), dim=-1) / math.sqrt(
            self.fourier_dims
        )
        return self.mlp(features).permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)


class MultiLearnableFourierEmbedding(nn.Module):
    """Softmax-weighted mix of learnable Fourier embeddings initialised at several scales."""

    def __init__(self, d_model: int, gamma_range: tuple[float, float] = (1.0, 0.1), n: int = 10):
        super().__init__()
        self.embedders = nn.ModuleList(
            LearnableFourierEmbedding(d_model, float(g))
            for g in np.linspace(gamma_range[0], gamma_range[1], n)
        )
        self.combination = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.combination, dim=-1)
        stacked = torch.stack([embed(x) for embed in self.embedders])
        return (stacked * weights.view(-1, 1, 1, 1, 1)).sum(0)


def _rotations(n: int, start: torch.Tensor) -> torch.Tensor:
    """``start`` rotated by n angles evenly spaced over [0, 180] degrees: [n, 2]."""
    theta = torch.deg2rad(torch.linspace(0, 180, n, device=start.device))
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack((cos * start[0] - sin * start[1], sin * start[0] + cos * start[1]), dim=-1)


class RotationalEmbedding2D(nn.Module):
    """Rotations along the width, paired over a W x W grid, projected to ``d_model`` (square maps)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.start_vector = nn.Parameter(torch.tensor([0.0, 1.0]))
        self.projection = nn.Sequential(nn.Linear(4, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h != w:
            raise ValueError(
                f"custom-rotational positional embedding needs square feature maps, got {h}x{w}"
            )
        rotated = _rotations(w, self.start_vector)  # [W, 2]
        grid = torch.cat(
            (rotated.unsqueeze(1).expand(w, w, 2), rotated.unsqueeze(0).expand(w, w, 2)), dim=-1
        )
        grid = grid.to(self.projection[0].weight.dtype)  # the table is built in fp32
        return self.projection(grid).permute(2, 0, 1).unsqueeze(0)  # [1, d, W, W]


class RotationalEmbedding1D(nn.Module):
    """Rotations along a sequence ``[B, C, L]``, projected to ``d_model``: [B, d, L]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.projection = nn.Linear(2, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = torch.tensor([0.0, 1.0], device=x.device)
        table = _rotations(x.size(2), start).to(self.projection.weight.dtype)  # built in fp32
        embedding = self.projection(table)  # [L, d]
        return embedding.t().unsqueeze(0).expand(x.size(0), -1, -1)


def build_positional_embedding(kind: str, d_backbone: int | None) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "learnable-fourier":
        return LearnableFourierEmbedding(d_backbone)
    if kind == "multi-learnable-fourier":
        return MultiLearnableFourierEmbedding(d_backbone)
    if kind == "custom-rotational":
        return RotationalEmbedding2D(d_backbone)
    if kind == "custom-rotational-1d":
        return RotationalEmbedding1D(d_backbone)
    raise ValueError(f"unknown positional_embedding_type {kind!r}")
