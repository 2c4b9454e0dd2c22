"""The model kinds a run can train: the CTM and the paper's LSTM and feed-forward baselines.

``model.kind`` in a training config picks one; the rest of the code asks this module for the
kind's config (from a preset name and overrides, or from a saved dict) and builds the module.
Every kind is called the same way: ``model(x)`` -> predictions ``[B, out_dims, T]``,
certainties ``[B, 2, T]`` and a third value (the CTM's last synchronisation, ``None`` for the
baselines). The feed-forward baseline has one tick (``T = 1``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import ff, lstm, qamnist
from .config import VARIANT_PRESETS, CTMConfig
from .config import preset as ctm_preset
from .ctm import CTM
from .sort import SortCTM

MODEL_KINDS = ("ctm", "lstm", "ff")
CONFIG_TYPES = {"ctm": CTMConfig, "lstm": lstm.LSTMConfig, "ff": ff.FFConfig}
ModelConfig = CTMConfig | lstm.LSTMConfig | ff.FFConfig
BASELINE_PRESETS = {"lstm": lstm.preset, "ff": ff.preset}


def check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")


def kind_of(cfg: ModelConfig) -> str:
    """The kind of a config; a variant's (Q&A MNIST, sort) counts as the CTM's."""
    return next((k for k, t in CONFIG_TYPES.items() if k != "ctm" and isinstance(cfg, t)), "ctm")


def model_config(kind: str, name: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``name`` of ``kind`` with fields overridden."""
    check_kind(kind)
    if name in VARIANT_PRESETS:  # a variant's config (Q&A MNIST) holds its own kind
        return ctm_preset(name, **{"kind": kind, **overrides})
    return BASELINE_PRESETS.get(kind, ctm_preset)(name, **overrides)


def config_from_dict(kind: str, values: dict[str, Any]) -> ModelConfig:
    check_kind(kind)
    return CONFIG_TYPES[kind].from_dict(values)


def kind_of_fields(values: dict[str, Any]) -> str:
    """The kind whose config a saved field dict is: the LSTM's has layers and no synchronisation,
    the feed-forward baseline's no ticks."""
    if "iterations" not in values and "d_model" in values:
        return "ff"
    return "lstm" if "num_layers" in values and "n_synch_out" not in values else "ctm"


def config_from_fields(values: dict[str, Any]) -> ModelConfig:
    """A saved config dict (an export's, a run's) back into the config of its kind."""
    return config_from_dict(kind_of_fields(values), values)


def build_model(cfg: ModelConfig) -> nn.Module:
    if isinstance(cfg, qamnist.QAMNISTConfig):
        return qamnist.build_qamnist_model(cfg)
    if isinstance(cfg, lstm.LSTMConfig):
        return lstm.LSTMBaseline(cfg)
    if isinstance(cfg, ff.FFConfig):
        return ff.FFBaseline(cfg)
    return SortCTM(cfg) if cfg.variant == "sort" else CTM(cfg)
