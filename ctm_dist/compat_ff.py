"""Reference checkpoints of the feed-forward baseline (``--model ff``) in.

The reference's image-classification and maze scripts build ``FFBaseline(d_model,
backbone_type, out_dims, dropout)`` and save its options as for the CTM. Its backbone is always a
ResNet: a ``backbone_type`` that names none (``none``, ``shallow-wide``, ``parity_backbone``)
builds all four stages of a ResNet-18 there, so it maps to ``resnet18-4`` here. Its input
channels are those of the lazily built ``initial_rgb`` convolution's weight.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from ctm_dist.compat_args import config_from_args, require_args
from ctm_dist.model.config_base import RESNET_BACKBONES
from ctm_dist.model.ff import FFConfig

# the backbone the reference's FFBaseline builds for a backbone_type that names no ResNet
NON_RESNET_BACKBONE = "resnet18-4"
_REQUIRED_FF_ARGS = ("d_model", "backbone_type", "dataset")


def ff_config_from_reference_args(
    args: argparse.Namespace,
    output_shape: tuple[int, list[int]],
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> FFConfig:
    """Map a reference FF-baseline run's options, its task's ``(out_dims, prediction_reshaper)``
    and (for the input channels) its weights to an :class:`~ctm_dist.model.FFConfig`."""
    require_args(args, _REQUIRED_FF_ARGS, "a reference FF train script")
    backbone_type = args.backbone_type
    if backbone_type not in RESNET_BACKBONES:
        backbone_type = NON_RESNET_BACKBONE
    weight = (state_dict or {}).get("initial_rgb.weight")
    in_channels = int(weight.shape[1]) if isinstance(weight, torch.Tensor) else 3
    out_dims, reshaper = output_shape
    values = dict(
        d_model=args.d_model,
        backbone_type=backbone_type,
        out_dims=out_dims,
        prediction_reshaper=reshaper,
        dropout=getattr(args, "dropout", 0.0),
        in_channels=in_channels,
    )
    return config_from_args(FFConfig, values, "FF baseline", overrides)
