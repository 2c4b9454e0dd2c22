"""The LSTM baseline of the CTM paper: an LSTM that attends to its input once per tick.

It has the CTM's interface (``forward(x)`` -> predictions ``[B, out_dims, T]``, certainties
``[B, 2, T]`` and ``None`` in place of the synchronisation) and the same input path (backbone,
positional embedding, key/value projection). Each tick the last layer's hidden state forms the
attention query, the attention output is the LSTM's one-step input, and the new hidden state is
projected to the tick's prediction. The ``state_dict`` keys are those of the reference's
``LSTMBaseline`` (``models/lstm.py``), so its checkpoints load strictly.

``LSTMConfig`` holds the reference constructor's arguments plus ``in_channels`` (built eagerly,
as for the CTM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .config_base import (
    ConfigDict,
    check_heads,
    check_input_path,
    check_positive_ints,
    check_prediction_reshaper,
    preset_config,
    requirement,
)
from .ctm import FeatureInput


@dataclass
class LSTMConfig(ConfigDict):
    iterations: int = 75
    d_model: int = 669
    d_input: int = 512
    heads: int = 8
    backbone_type: str = "parity_backbone"
    num_layers: int = 1
    positional_embedding_type: str = "custom-rotational-1d"
    out_dims: int = 128
    prediction_reshaper: list[int] = field(default_factory=lambda: [64, 2])
    dropout: float = 0.0
    # ours
    in_channels: int = 3

    kind = "lstm"

    def __post_init__(self) -> None:
        self.prediction_reshaper = [int(v) for v in self.prediction_reshaper]
        self.validate()

    def validate(self) -> None:
        need = requirement("LSTMConfig")
        check_positive_ints(
            need, self, ("iterations", "d_model", "d_input", "heads", "num_layers", "out_dims")
        )
        check_heads(need, self)
        check_input_path(need, self)
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        check_prediction_reshaper(need, self)


class LSTMTracking(NamedTuple):
    """Per-tick internals (``forward(x, track=True)``), detached, ticks first."""

    hidden_states: torch.Tensor  # [T, B, d_model] (the last layer's)
    attention: torch.Tensor  # [T, B, heads, 1, L]


class LSTMBaseline(FeatureInput):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d_model, d_input = cfg.d_model, cfg.d_input
        self.build_input(cfg)
        self.lstm = nn.LSTM(d_input, d_model, cfg.num_layers, batch_first=True, dropout=cfg.dropout)
        self.q_proj = nn.Linear(d_model, d_input)
        self.attention = nn.MultiheadAttention(d_input, cfg.heads, cfg.dropout, batch_first=True)
        self.output_projector = nn.Sequential(nn.Linear(d_model, cfg.out_dims))
        bound = math.sqrt(1 / d_model)
        self.start_hidden_state = nn.Parameter(
            torch.empty(cfg.num_layers, d_model).uniform_(-bound, bound)
        )
        self.start_cell_state = nn.Parameter(
            torch.empty(cfg.num_layers, d_model).uniform_(-bound, bound)
        )

    def forward(self, x: torch.Tensor, track: bool = False):
        kv = self.compute_features(x)
        b = x.size(0)
        hidden = self.start_hidden_state.unsqueeze(1).expand(-1, b, -1).contiguous()
        cell = self.start_cell_state.unsqueeze(1).expand(-1, b, -1).contiguous()
        states, attention = [], []
        for _ in range(self.cfg.iterations):
            query = self.q_proj(hidden[-1].unsqueeze(1))
            attended, weights = self.attention(
                query, kv, kv, need_weights=track, average_attn_weights=False
            )
            output, (hidden, cell) = self.lstm(attended, (hidden, cell))
            states.append(output.squeeze(1))
            if track:
                attention.append(weights.detach())
        stacked = torch.stack(states)  # [T, B, d_model]
        predictions = self.output_projector(stacked)  # one projection for every tick
        certainties = self.compute_certainty(predictions.flatten(0, 1)).unflatten(
            0, predictions.shape[:2]
        )
        predictions = predictions.permute(1, 2, 0).float().contiguous()
        certainties = certainties.permute(1, 2, 0).float().contiguous()
        if not track:
            return predictions, certainties, None
        return (
            predictions,
            certainties,
            None,
            LSTMTracking(stacked.detach(), torch.stack(attention)),
        )


# --- presets -----------------------------------------------------------------------------------


def _parity(sequence_length: int = 64) -> dict[str, Any]:
    # tasks/parity/scripts/train_lstm_75.sh (d_model 669 matches the 75-tick CTM's parameter count)
    return dict(
        iterations=75,
        d_model=669,
        d_input=512,
        heads=8,
        num_layers=1,
        dropout=0.0,
        positional_embedding_type="custom-rotational-1d",
        backbone_type="parity_backbone",
        out_dims=sequence_length * 2,
        prediction_reshaper=[sequence_length, 2],
    )


def _parity_small(sequence_length: int = 16) -> dict[str, Any]:
    # the input path and ticks of the CTM's parity-small preset
    return dict(_parity(sequence_length), iterations=16, d_model=128, d_input=64, heads=4)


_PRESETS = {"parity": _parity, "parity-small": _parity_small}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> LSTMConfig:
    """A named LSTM configuration with fields overridden (``sequence_length`` sizes the output)."""
    return preset_config(
        LSTMConfig,
        _PRESETS,
        name,
        overrides,
        builder_args=("sequence_length",),
        label="no LSTM preset",
    )
