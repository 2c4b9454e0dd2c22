"""The reinforcement-learning agents: a CTM (or LSTM) core whose state is the agent's memory.

The RL CTM (the reference's ``ContinuousThoughtMachineRL``) has no attention: each tick the
synapses read [observation features, last post-activations], the new pre-activation is pushed
onto every neuron's pre-activation history, and the neuron-level models turn that history into
the next post-activation, which is pushed onto a second history, of post-activations. Both
histories, ``[B, D, M]`` each, are the hidden state carried from one environment step to the
next (``continuous_state_trace``), and reset to learned start traces where an episode ended.

What the actor and critic read is the out synchronisation of the last ``n_synch_out`` neurons,
taken over the post-activation history window (not a running sum as in the supervised CTM)::

    sync_ij = sum_m w_m z_i(m) z_j(m) / sqrt(sum_m w_m),   w_m = exp(-(M - 1 - m) * clamp(decay_ij, 0, 4))

The LSTM baseline (``kind="lstm"``) runs an ``LSTMCell`` for ``iterations`` ticks on the same
features; its (hidden, cell) state is the memory and its hidden state is what the heads read.

``RLAgent`` is the reference's agent as a whole: ``recurrent_model``, ``actor`` and ``critic``
(state-dict keys as the reference's), ``get_initial_state``, ``m(x, hidden)`` for one step and
``unroll`` for a rollout's steps with episode resets.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Categorical

from .nlm import NeuronLevelModels
from .rl_backbones import build_rl_backbone, glu_block
from .rl_config import RLAgentConfig
from .synapses import SynapseUNet

RL_DECAY_CLAMP = (0.0, 4.0)
HEAD_WIDTH = 64


def _uniform(shape: tuple[int, ...], fan: int) -> nn.Parameter:
    bound = math.sqrt(1 / fan)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class CTMCore(nn.Module):
    """One environment step of the RL CTM: ``(x, (pre_trace, post_trace)) -> (sync_out, state)``."""

    def __init__(self, cfg: RLAgentConfig):
        super().__init__()
        self.cfg = cfg
        d, m, n = cfg.d_model, cfg.memory_length, cfg.n_synch_out
        self.backbone = build_rl_backbone(cfg.backbone_type, cfg.obs_dim, cfg.d_input)
        in_dims = cfg.backbone_out + d
        if cfg.synapse_depth == 1:  # two blocks, as the reference's RL synapses
            self.synapses = nn.Sequential(
                nn.Dropout(cfg.dropout), *glu_block(in_dims, d), *glu_block(d, d)
            )
        else:
            self.synapses = SynapseUNet(in_dims, d, cfg.synapse_depth, cfg.dropout)
        self.trace_processor = NeuronLevelModels(
            d, m, cfg.deep_nlms, cfg.memory_hidden_dims, cfg.do_layernorm_nlm, cfg.dropout
        )
        self.start_trace = _uniform((d, m), d + m)
        self.start_activated_trace = _uniform((d, m), d + m)
        self.decay_params_out = nn.Parameter(torch.zeros(cfg.synch_size_out))
        # Kept for the reference's state-dict keys; the synchronisation reads the last n neurons.
        self.register_buffer("out_neuron_indices_left", torch.arange(n))
        self.register_buffer("out_neuron_indices_right", torch.arange(n))
        self.register_buffer("diagonal_mask_out", torch.triu(torch.ones(n, n, dtype=torch.bool)))
        rows, cols = torch.triu_indices(n, n)
        self.register_buffer("_pairs", torch.stack((rows, cols)) + d - n, persistent=False)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.start_trace.unsqueeze(0).expand(batch, -1, -1),
            self.start_activated_trace.unsqueeze(0).expand(batch, -1, -1),
        )

    def synchronisation(self, post_trace: torch.Tensor) -> torch.Tensor:
        """``[B, D, M]`` post-activation history -> ``[B, pairs]`` decayed synchronisation."""
        m = post_trace.size(-1)
        age = torch.arange(m - 1, -1, -1, device=post_trace.device, dtype=post_trace.dtype)
        weights = torch.exp(
            -age.unsqueeze(0) * self.decay_params_out.clamp(*RL_DECAY_CLAMP)[:, None]
        )
        left, right = self._pairs
        products = post_trace[:, left] * post_trace[:, right]  # [B, pairs, M]
        return (products * weights).sum(-1) / torch.sqrt(weights.sum(-1))

    def forward(self, x: torch.Tensor, hidden, track: bool = False):
        features = self.backbone(x).reshape(x.size(0), -1)
        pre_trace, post_trace = hidden
        pre, post = [], []
        for _ in range(self.cfg.iterations):
            state = self.synapses(torch.cat((features, post_trace[:, :, -1]), dim=-1))
            pre_trace = torch.cat((pre_trace[:, :, 1:], state.unsqueeze(-1)), dim=-1)
            activated = self.trace_processor(pre_trace.permute(1, 2, 0))
            post_trace = torch.cat((post_trace[:, :, 1:], activated.unsqueeze(-1)), dim=-1)
            pre.append(state.detach())
            post.append(activated.detach())
        sync = self.synchronisation(post_trace)
        if track:
            return sync, (pre_trace, post_trace), torch.stack(pre), torch.stack(post)
        return sync, (pre_trace, post_trace)


class LSTMCore(nn.Module):
    """The LSTM baseline: ``(x, (h, c)) -> (h, (h, c))`` after ``iterations`` cell steps."""

    def __init__(self, cfg: RLAgentConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_rl_backbone(cfg.backbone_type, cfg.obs_dim, cfg.d_input)
        self.lstm_cell = nn.LSTMCell(cfg.backbone_out, cfg.d_model)
        self.start_hidden_state = _uniform((cfg.d_model,), cfg.d_model)
        self.start_cell_state = _uniform((cfg.d_model,), cfg.d_model)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.start_hidden_state.unsqueeze(0).expand(batch, -1),
            self.start_cell_state.unsqueeze(0).expand(batch, -1),
        )

    def forward(self, x: torch.Tensor, hidden, track: bool = False):
        features = self.backbone(x).reshape(x.size(0), -1)
        h, c = hidden
        seen = []
        for _ in range(self.cfg.iterations):
            h, c = self.lstm_cell(features, (h, c))
            seen.append(h.detach())
        if track:
            return h, (h, c), torch.stack(seen), torch.stack(seen)
        return h, (h, c)


def _head(d_in: int, d_out: int) -> nn.Sequential:
    layers = [nn.Linear(d_in, HEAD_WIDTH), nn.ReLU(), nn.Linear(HEAD_WIDTH, HEAD_WIDTH), nn.ReLU()]
    layers.append(nn.Linear(HEAD_WIDTH, d_out))
    for layer in layers:
        if isinstance(layer, nn.Linear):  # orthogonal with gain 1, zero bias (CleanRL's PPO)
            nn.init.orthogonal_(layer.weight, 1.0)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class Step(NamedTuple):
    """The agent's reading of observations: sampled (or given) actions and what PPO needs."""

    action: torch.Tensor  # [N]
    logprob: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N]
    value: torch.Tensor  # [N]
    logits: torch.Tensor  # [N, actions]
    hidden: tuple


class RLAgent(nn.Module):
    def __init__(self, cfg: RLAgentConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.recurrent_model = CTMCore(cfg) if cfg.kind == "ctm" else LSTMCore(cfg)
        self.actor = _head(cfg.features_out, cfg.n_actions)
        self.critic = _head(cfg.features_out, 1)

    def get_initial_state(self, num_envs: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recurrent_model.initial_state(num_envs)

    def reset_where_done(self, hidden, done: torch.Tensor):
        """The state where ``done`` (1.0: the episode ended before this step) is the start state.

        ``hidden=None`` is the start state everywhere."""
        start = self.get_initial_state(done.size(0))
        if hidden is None or (self.cfg.kind == "ctm" and not self.cfg.continuous_state_trace):
            return start
        out = []
        for carried, fresh in zip(hidden, start):
            d = done.to(carried.dtype).view(-1, *([1] * (carried.dim() - 1)))
            out.append((1.0 - d) * carried + d * fresh)
        return tuple(out)

    def forward(self, x: torch.Tensor, hidden, dones=None, action=None, track: bool = False):
        """``m(x, hidden)``: one environment step, ``(features for the heads, next state)``, as
        the reference's. ``m(xs, hidden, dones, action)``: ``act`` over a rollout's steps (what a
        DeepSpeed engine calls, so that ZeRO-3 gathers the parameters around all of it)."""
        if dones is None:
            return self.recurrent_model(x, hidden, track=track)
        return self.act(x, hidden, dones, action)

    def unroll(self, xs: torch.Tensor, hidden, dones: torch.Tensor):
        """``xs [T, N, ...]`` with ``dones [T, N]`` from state ``hidden`` -> (``[T * N, F]``, last state).

        ``dones[t]`` is 1.0 where the episode ended before step ``t``: the state is reset there."""
        features = []
        for x, done in zip(xs, dones):
            out, hidden = self.recurrent_model(x, self.reset_where_done(hidden, done))
            features.append(out)
        return torch.cat(features), hidden

    def act(self, xs, hidden, dones, action: torch.Tensor | None = None) -> Step:
        """Policy and value over ``unroll``'s rows; samples an action per row unless ``action`` is given."""
        if xs.is_floating_point():  # observation vectors in the weights' precision
            xs = xs.to(self.actor[0].weight.dtype)
        features, hidden = self.unroll(xs, hidden, dones)
        logits = self.actor(features)
        policy = Categorical(logits=logits)
        if action is None:
            action = policy.sample()
        value = self.critic(features).squeeze(-1)
        return Step(action, policy.log_prob(action), policy.entropy(), value, logits, hidden)
