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

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .backbones import backbone_channels, build_backbone
from .config import BACKBONE_TYPES, POSITIONAL_EMBEDDING_TYPES
from .ctm import normalised_entropy
from .positional import build_positional_embedding


@dataclass
class LSTMConfig:
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
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"LSTMConfig: {message}")

        for name in ("iterations", "d_model", "d_input", "heads", "num_layers", "out_dims"):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        need(
            self.d_input % self.heads == 0,
            f"d_input ({self.d_input}) must be divisible by heads ({self.heads})",
        )
        need(
            self.backbone_type in BACKBONE_TYPES,
            f"backbone_type must be one of {BACKBONE_TYPES}, got {self.backbone_type!r}",
        )
        need(
            self.positional_embedding_type in POSITIONAL_EMBEDDING_TYPES,
            f"positional_embedding_type must be one of {POSITIONAL_EMBEDDING_TYPES}, "
            f"got {self.positional_embedding_type!r}",
        )
        need(
            not (self.backbone_type == "none" and self.positional_embedding_type != "none"),
            "a positional embedding needs a backbone (backbone_type='none' takes positional_embedding_type='none')",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        shape = [v for v in self.prediction_reshaper if v != -1]
        need(
            all(v >= 1 for v in shape) and self.prediction_reshaper.count(-1) <= 1,
            f"prediction_reshaper must hold positive sizes and at most one -1, got {self.prediction_reshaper}",
        )
        size = math.prod(shape)
        need(
            self.out_dims % size == 0 if -1 in self.prediction_reshaper else size == self.out_dims,
            f"out_dims ({self.out_dims}) does not fit prediction_reshaper {self.prediction_reshaper}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LSTMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"LSTMConfig: unknown fields {unknown}")
        return cls(**values)

    def replace(self, **changes: Any) -> LSTMConfig:
        return dataclasses.replace(self, **changes)


class LSTMTracking(NamedTuple):
    """Per-tick internals (``forward(x, track=True)``), detached, ticks first."""

    hidden_states: torch.Tensor  # [T, B, d_model] (the last layer's)
    attention: torch.Tensor  # [T, B, heads, 1, L]


class LSTMBaseline(nn.Module):
    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d_model, d_input = cfg.d_model, cfg.d_input
        d_backbone = backbone_channels(cfg.backbone_type, d_input, cfg.in_channels)
        is_resnet = cfg.backbone_type.startswith("resnet")
        self.initial_rgb = (
            nn.Conv2d(cfg.in_channels, 3, kernel_size=1) if is_resnet else nn.Identity()
        )
        self.backbone = build_backbone(cfg.backbone_type, d_input, cfg.in_channels)
        self.positional_embedding = build_positional_embedding(
            cfg.positional_embedding_type, d_backbone
        )
        self.kv_proj = nn.Sequential(nn.Linear(d_backbone, d_input), nn.LayerNorm(d_input))
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

    def compute_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> key/value tokens [B, L, d_input]."""
        features = self.backbone(self.initial_rgb(x))
        if self.positional_embedding is not None:
            features = features + self.positional_embedding(features)
        return self.kv_proj(features.flatten(2).transpose(1, 2))

    def compute_certainty(self, prediction: torch.Tensor) -> torch.Tensor:
        """[N, out_dims] -> [N, 2]: (normalised entropy, 1 - normalised entropy)."""
        entropy = normalised_entropy(
            prediction.reshape([prediction.size(0)] + self.cfg.prediction_reshaper)
        )
        return torch.stack((entropy, 1 - entropy), dim=-1)

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
    if name not in _PRESETS:
        raise ValueError(f"no LSTM preset {name!r}; choose one of {PRESET_NAMES}")
    builder_args = {k: overrides.pop(k) for k in ("sequence_length",) if k in overrides}
    values = _PRESETS[name](**builder_args)
    known = {f.name for f in dataclasses.fields(LSTMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown LSTMConfig fields {unknown} for preset {name!r}")
    values.update(overrides)
    return LSTMConfig(**values)
