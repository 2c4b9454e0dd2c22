"""PPO's pieces (Schulman et al. 2017, as CleanRL's recurrent PPO that the reference builds on).

``advantages``: generalised advantage estimates over a rollout, ``[T, N]`` step-major, where
``dones[t]`` says the episode ended before step ``t`` (so nothing flows back across it).
``ppo_loss``: the clipped surrogate, the value loss (optionally clipped) and the entropy bonus.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    next_done: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both ``[T, N]``."""
    steps = rewards.size(0)
    out = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        if t == steps - 1:
            alive, following = 1.0 - next_done, next_value
        else:
            alive, following = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * following * alive - values[t]
        out[t] = last = delta + gamma * lam * alive * last
    return out, out + values


class PPOLoss(NamedTuple):
    loss: torch.Tensor
    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    approx_kl: torch.Tensor  # (ratio - 1) - log ratio, averaged
    clip_fraction: torch.Tensor


def ppo_loss(
    logprob: torch.Tensor,
    entropy: torch.Tensor,
    value: torch.Tensor,
    old_logprob: torch.Tensor,
    advantage: torch.Tensor,
    returns: torch.Tensor,
    old_value: torch.Tensor,
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    norm_adv: bool = True,
    clip_vloss: bool = False,
) -> PPOLoss:
    log_ratio = logprob - old_logprob
    ratio = log_ratio.exp()
    if norm_adv:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    policy = torch.max(
        -advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    ).mean()
    if clip_vloss:
        clipped = old_value + torch.clamp(value - old_value, -clip_coef, clip_coef)
        value_loss = 0.5 * torch.max((value - returns) ** 2, (clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((value - returns) ** 2).mean()
    entropy_mean = entropy.mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_coef).float().mean()
    loss = policy - ent_coef * entropy_mean + vf_coef * value_loss
    return PPOLoss(loss, policy, value_loss, entropy_mean, approx_kl, clip_fraction)
