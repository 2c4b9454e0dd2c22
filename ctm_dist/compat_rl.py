"""Reference RL checkpoints in and out (``tasks/rl/train.py`` of the reference CTM repository).

Its checkpoints hold ``model_state_dict`` (the PPO agent: ``recurrent_model``, ``actor``,
``critic``), ``optimizer_state_dict`` and ``args``, a Namespace without a ``dataset`` field: an
RL run is told by its ``env_id``. The agent's sizes come from ``args``; the observation length
and the number of actions, which the environment gave the reference, are read off the weights.
``ctm_dist.compat`` dispatches here.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from ctm_dist.compat_args import config_from_args, require_args
from ctm_dist.model.rl import RLAgent
from ctm_dist.model.rl_config import RLAgentConfig
from ctm_dist.storage.checkpoints import CheckpointError

# args the reference's RL agent is built from
_REQUIRED_ARGS = (
    "model_type",
    "env_id",
    "iterations",
    "d_model",
    "d_input",
    "memory_length",
    "memory_hidden_dims",
    "n_synch_out",
)
# the reference script's defaults for the options that do not shape the agent (written on export)
REFERENCE_RUN_DEFAULTS = dict(
    mask_velocity=True,
    max_environment_steps=500,
    num_steps=100,
    total_timesteps=1_000_000,
    num_envs=8,
    anneal_lr=True,
    discount_gamma=0.99,
    gae_lambda=0.95,
    num_minibatches=4,
    update_epochs=1,
    norm_adv=True,
    clip_coef=0.1,
    clip_vloss=False,
    ent_coef=0.1,
    vf_coef=0.25,
    max_grad_norm=0.5,
    target_kl=None,
    lr=5e-4,
    num_validation_envs=1,
    seed=0,
)


def is_rl_args(args: Any) -> bool:
    """Whether a checkpoint's ``args`` are those of the reference's RL script."""
    return isinstance(args, argparse.Namespace) and hasattr(args, "env_id")


def backbone_for_env(env_id: str) -> str:
    return "navigation-backbone" if "MiniGrid" in env_id else "classic-control-backbone"


def rl_config_from_reference_args(
    args: argparse.Namespace, state_dict: Mapping[str, torch.Tensor]
) -> RLAgentConfig:
    require_args(args, _REQUIRED_ARGS, "the reference RL train script")
    actions = state_dict.get("actor.4.weight")
    if not isinstance(actions, torch.Tensor) or actions.dim() != 2:
        raise CheckpointError("model_state_dict lacks actor.4.weight: not a reference RL agent")
    projector = state_dict.get("recurrent_model.backbone.input_projector.1.weight")
    values = dict(
        kind=args.model_type,
        iterations=args.iterations,
        d_model=args.d_model,
        d_input=args.d_input,
        n_synch_out=args.n_synch_out,
        synapse_depth=getattr(args, "synapse_depth", 1),
        memory_length=args.memory_length,
        deep_nlms=bool(getattr(args, "deep_memory", True)),
        memory_hidden_dims=args.memory_hidden_dims,
        do_layernorm_nlm=bool(getattr(args, "do_normalisation", False)),
        dropout=getattr(args, "dropout", 0.0),
        neuron_select_type=getattr(args, "neuron_select_type", "first-last"),
        continuous_state_trace=bool(getattr(args, "continuous_state_trace", True)),
        backbone_type=backbone_for_env(args.env_id),
        obs_dim=int(projector.shape[1]) if isinstance(projector, torch.Tensor) else 1,
        n_actions=int(actions.shape[0]),
    )
    return config_from_args(RLAgentConfig, values, "RL agent")


def reference_args_from_rl_config(
    cfg: RLAgentConfig, env_id: str, extra_args: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """The ``args`` the reference RL script would have saved for an agent of this config."""
    if backbone_for_env(env_id) != cfg.backbone_type:
        raise ValueError(f"env {env_id!r} does not fit an agent with {cfg.backbone_type!r}")
    args = argparse.Namespace(
        model_type=cfg.kind,
        d_model=cfg.d_model,
        d_input=cfg.d_input,
        synapse_depth=cfg.synapse_depth,
        n_synch_out=cfg.n_synch_out,
        neuron_select_type=cfg.neuron_select_type,
        iterations=cfg.iterations,
        memory_length=cfg.memory_length,
        deep_memory=cfg.deep_nlms,
        memory_hidden_dims=cfg.memory_hidden_dims,
        dropout=cfg.dropout,
        do_normalisation=cfg.do_layernorm_nlm,
        continuous_state_trace=cfg.continuous_state_trace,
        env_id=env_id,
        **REFERENCE_RUN_DEFAULTS,
    )
    for key, value in (extra_args or {}).items():
        setattr(args, key, value)
    args.batch_size = args.num_envs * args.num_steps  # the reference derives these after parsing
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_training_iterations = args.total_timesteps // args.batch_size
    return args


def build_reference_agent(args: argparse.Namespace, state: Mapping[str, torch.Tensor]) -> RLAgent:
    return RLAgent(rl_config_from_reference_args(args, state))
