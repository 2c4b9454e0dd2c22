"""The feed-forward baseline of the CTM paper: a ResNet, average pooling and a two-layer head.

The paper compares the CTM with this model on image classification (and mazes): the same
ResNet backbone as the CTM's (``backbone_type``), its feature map averaged over space, then
``Linear(d_model) -> ReLU -> Dropout -> Linear(out_dims)``. ``d_model`` sizes the head so that
the parameter count can be matched to the CTM's. A 1x1 convolution (``initial_rgb``) first maps
the input to three channels, as in the reference.

``FFBaseline`` has the interface of the other model kinds, so the trainer, the losses and the
evaluation tools take it unchanged: ``forward(x)`` -> predictions ``[B, out_dims, 1]`` (one
"tick"), certainties ``[B, 2, 1]`` (normalised entropy, 1 - normalised entropy, over
``prediction_reshaper`` as for the CTM) and ``None`` in place of the synchronisation. With a
single tick the CTM's classification loss is plain cross-entropy, the reference's FF loss.
``ReferenceFFBaseline`` is the same module called as the reference's ``FFBaseline``:
``m(x)`` -> logits ``[B, out_dims]``. The ``state_dict`` keys are the reference's
(``models/ff.py``), so its checkpoints load strictly.

``FFConfig`` holds the reference constructor's arguments plus ``in_channels`` (built eagerly) and
``prediction_reshaper`` (the output's shape for the certainty: ``[-1]`` for classes,
``[route_length, 5]`` for mazes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .backbones import backbone_channels, build_backbone
from .config import MAZE_ROUTE_LENGTH
from .config import preset as ctm_preset
from .config_base import (
    RESNET_BACKBONES,
    ConfigDict,
    check_positive_ints,
    check_prediction_reshaper,
    preset_config,
    requirement,
)
from .ctm import certainty


@dataclass
class FFConfig(ConfigDict):
    d_model: int = 256
    backbone_type: str = "resnet18-1"
    out_dims: int = 10
    prediction_reshaper: list[int] = field(default_factory=lambda: [-1])
    dropout: float = 0.0
    # ours
    in_channels: int = 3

    kind: ClassVar[str] = "ff"
    iterations: ClassVar[int] = 1  # its outputs have one tick

    def __post_init__(self) -> None:
        self.prediction_reshaper = [int(v) for v in self.prediction_reshaper]
        self.validate()

    def validate(self) -> None:
        need = requirement("FFConfig")
        check_positive_ints(need, self, ("d_model", "out_dims", "in_channels"))
        need(
            self.backbone_type in RESNET_BACKBONES,
            f"backbone_type must be a ResNet ({RESNET_BACKBONES[0]} ... {RESNET_BACKBONES[-1]}), "
            f"got {self.backbone_type!r}",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        check_prediction_reshaper(need, self)


class Squeeze(nn.Module):
    """Drops dimension ``dim`` (of size 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(self.dim)


class FFBaseline(nn.Module):
    def __init__(self, cfg: FFConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.initial_rgb = nn.Conv2d(cfg.in_channels, 3, kernel_size=1)
        self.backbone = build_backbone(cfg.backbone_type, 0, 3)
        features = backbone_channels(cfg.backbone_type, 0, 3)
        # the reference's layout (indices 3 and 6 hold the weights): pool, squeeze the two
        # spatial dims, hidden layer, ReLU, dropout, output layer
        self.output_projector = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            Squeeze(-1),
            Squeeze(-1),
            nn.Linear(features, cfg.d_model),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, cfg.out_dims),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> logits [B, out_dims]."""
        return self.output_projector(self.backbone(self.initial_rgb(x)))

    def forward(self, x: torch.Tensor):
        logits = self.logits(x)
        certainties = certainty(logits, self.cfg.prediction_reshaper)
        return logits.float().unsqueeze(-1), certainties.float().unsqueeze(-1), None


class ReferenceFFBaseline(FFBaseline):
    """The FF baseline called as the reference's ``FFBaseline``: ``m(x)`` -> logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def as_baseline(self) -> FFBaseline:
        """The same weights in an :class:`FFBaseline` (the interface of the other kinds)."""
        model = FFBaseline(self.cfg)
        model.load_state_dict(self.state_dict(), strict=True)
        return model.train(self.training)


# --- presets -----------------------------------------------------------------------------------
# The CTM presets' backbone and d_model for each task the reference trains the FF baseline on
# (tasks/image_classification/scripts/train_cifar10.sh: --model ff --d_model 256 --backbone_type
# resnet18-1, the CTM's), and their output shape and dropout.

FF_FIELDS = ("d_model", "backbone_type", "out_dims", "prediction_reshaper", "dropout")


def _from_ctm(name: str, **arguments: Any) -> dict[str, Any]:
    values = ctm_preset(name, **arguments).to_dict()
    return {key: values[key] for key in FF_FIELDS}


_PRESETS = {
    "imagenet": lambda: _from_ctm("imagenet"),
    "cifar10": lambda: _from_ctm("cifar10"),
    "demo": lambda: _from_ctm("demo"),
    "mazes": lambda route_length=MAZE_ROUTE_LENGTH: _from_ctm("mazes", route_length=route_length),
    "mazes-small": lambda route_length=4: _from_ctm("mazes-small", route_length=route_length),
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> FFConfig:
    """A named FF configuration with fields overridden (``route_length`` sizes a maze output)."""
    return preset_config(
        FFConfig, _PRESETS, name, overrides, builder_args=("route_length",), label="no FF preset"
    )
