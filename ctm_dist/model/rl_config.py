"""Typed configuration of the reinforcement-learning agents (CTM or LSTM core) and their presets.

Field names follow the reference RL script's arguments (``tasks/rl/train.py``) where it has one,
so a reference run's ``args`` map onto a config field by field (``ctm_dist.compat``); ``kind`` is
its ``model_type`` and ``deep_nlms`` / ``do_layernorm_nlm`` its ``deep_memory`` /
``do_normalisation``. The environment decides ``backbone_type``, ``obs_dim`` (the observation
length of a classic-control task) and ``n_actions``.

Presets: ``cartpole``, ``acrobot`` and ``4rooms`` are the reference scripts' models (one tick);
``cartpole-small`` is a CTM small enough to learn CartPole on two CPU cores in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_base import ConfigDict, preset_config, requirement

RL_KINDS = ("ctm", "lstm")
RL_BACKBONES = ("classic-control-backbone", "navigation-backbone")
MINIGRID_VIEW = 7  # MiniGrid's agent sees a 7 x 7 grid of (object, colour, state) cells


@dataclass
class RLAgentConfig(ConfigDict):
    kind: str = "ctm"
    iterations: int = 1
    d_model: int = 128
    d_input: int = 128
    n_synch_out: int = 16
    synapse_depth: int = 1
    memory_length: int = 10
    deep_nlms: bool = True
    memory_hidden_dims: int = 4
    do_layernorm_nlm: bool = False
    dropout: float = 0.0
    neuron_select_type: str = "first-last"
    continuous_state_trace: bool = True
    backbone_type: str = "classic-control-backbone"
    obs_dim: int = 4
    n_actions: int = 2

    def __post_init__(self) -> None:
        self.validate()

    @property
    def synch_size_out(self) -> int:
        return self.n_synch_out * (self.n_synch_out + 1) // 2

    @property
    def features_out(self) -> int:
        """Width of what the actor and critic read: the out synchronisation, or the LSTM's hidden state."""
        return self.synch_size_out if self.kind == "ctm" else self.d_model

    @property
    def backbone_out(self) -> int:
        """Width of the flattened backbone features of one observation."""
        if self.backbone_type == "navigation-backbone":
            return MINIGRID_VIEW * MINIGRID_VIEW * self.d_input
        return self.d_input

    def validate(self) -> None:
        need = requirement("RLAgentConfig")
        need(self.kind in RL_KINDS, f"kind must be one of {RL_KINDS}, got {self.kind!r}")
        need(
            self.backbone_type in RL_BACKBONES,
            f"backbone_type must be one of {RL_BACKBONES}, got {self.backbone_type!r}",
        )
        need(
            self.neuron_select_type == "first-last",
            "the RL CTM supports neuron_select_type 'first-last' only (as the reference)",
        )
        for name in ("iterations", "d_model", "d_input", "memory_length", "n_actions", "obs_dim"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1")
        need(self.synapse_depth >= 1, "synapse_depth must be >= 1")
        need(1 <= self.n_synch_out <= self.d_model, "n_synch_out must be in [1, d_model]")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")


def _cartpole() -> dict[str, Any]:
    """tasks/rl/scripts/cartpole/train_ctm_1.sh."""
    return dict(d_model=128, d_input=128, memory_hidden_dims=4, n_synch_out=16, memory_length=10)


def _cartpole_small() -> dict[str, Any]:
    return dict(d_model=32, d_input=32, memory_hidden_dims=4, n_synch_out=8, memory_length=5)


def _acrobot() -> dict[str, Any]:
    """tasks/rl/scripts/acrobot/train_ctm_1.sh."""
    return dict(
        d_model=256,
        d_input=64,
        memory_hidden_dims=4,
        n_synch_out=16,
        memory_length=5,
        obs_dim=6,
        n_actions=3,
    )


def _four_rooms() -> dict[str, Any]:
    """tasks/rl/scripts/4rooms/train_ctm_1.sh."""
    return dict(
        d_model=512,
        d_input=128,
        memory_hidden_dims=16,
        n_synch_out=32,
        memory_length=10,
        backbone_type="navigation-backbone",
        n_actions=7,
    )


_PRESETS = {
    "cartpole": _cartpole,
    "cartpole-small": _cartpole_small,
    "acrobot": _acrobot,
    "4rooms": _four_rooms,
}
RL_PRESET_NAMES = tuple(_PRESETS)


def rl_preset(name: str, **overrides: Any) -> RLAgentConfig:
    """A named agent configuration with fields overridden."""
    return preset_config(RLAgentConfig, _PRESETS, name, overrides, label="unknown RL preset")
