"""Observation encoders of the RL agents: classic-control vectors and MiniGrid symbolic views.

* ``ClassicControlBackbone``: an observation vector through two (linear, GLU, LayerNorm) blocks
  to ``d_input`` features.
* ``MiniGridBackbone``: each cell of the agent's 7 x 7 view is (object, colour, state) indices;
  their embeddings and one of the cell's position are concatenated and projected, per cell, by
  two such blocks to ``d_input`` features, giving ``[B, 7, 7, d_input]``.

Module names follow the reference's so that its checkpoints load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .rl_config import MINIGRID_VIEW

MINIGRID_OBJECTS, MINIGRID_COLOURS, MINIGRID_STATES = 11, 6, 3
MINIGRID_EMBEDDING = 8


def glu_block(d_in: int, d_out: int) -> list[nn.Module]:
    return [nn.Linear(d_in, 2 * d_out), nn.GLU(), nn.LayerNorm(d_out)]


class ClassicControlBackbone(nn.Module):
    def __init__(self, obs_dim: int, d_input: int):
        super().__init__()
        self.input_projector = nn.Sequential(
            nn.Flatten(), *glu_block(obs_dim, d_input), *glu_block(d_input, d_input)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_projector(x)


class MiniGridBackbone(nn.Module):
    def __init__(self, d_input: int, grid_size: int = MINIGRID_VIEW):
        super().__init__()
        e = MINIGRID_EMBEDDING
        self.object_embedding = nn.Embedding(MINIGRID_OBJECTS, e)
        self.color_embedding = nn.Embedding(MINIGRID_COLOURS, e)
        self.state_embedding = nn.Embedding(MINIGRID_STATES, e)
        self.position_embedding = nn.Embedding(grid_size * grid_size, e)
        self.project_to_d_projection = nn.Sequential(
            *glu_block(4 * e, d_input), *glu_block(d_input, d_input)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` cell indices (any dtype) -> ``[B, H, W, d_input]``."""
        x = x.long()
        b, h, w, _ = x.shape
        cells = torch.arange(h * w, device=x.device).view(1, h, w).expand(b, -1, -1)
        embedded = torch.cat(
            (
                self.object_embedding(x[..., 0]),
                self.color_embedding(x[..., 1]),
                self.state_embedding(x[..., 2]),
                self.position_embedding(cells),
            ),
            dim=-1,
        )
        return self.project_to_d_projection(embedded)


def build_rl_backbone(backbone_type: str, obs_dim: int, d_input: int) -> nn.Module:
    if backbone_type == "navigation-backbone":
        return MiniGridBackbone(d_input)
    return ClassicControlBackbone(obs_dim, d_input)
