"""PPO's data: rollouts collected with the current agent, served as minibatches, resumable.

Each training worker runs its own ``num_envs`` environments. ``RolloutLoader`` is the RL task's
training loader: one pass over it collects a rollout of ``num_steps`` steps in every environment
with the agent as it is now (no gradients, actions sampled from the policy), computes the
advantages, and yields ``update_epochs x num_minibatches`` minibatches, each a slice of the
environments with all their steps and the agent state they started the rollout from (the
agent is recurrent, so a minibatch is whole sequences, as the reference's). One trainer step is
one minibatch; the next pass collects the next rollout with the updated agent.

The agent is called through what ``bind`` gave, the DeepSpeed engine: ``model(xs, hidden,
dones, actions)`` (``RLAgent.forward``), ``hidden=None`` meaning the learned start state.

Resume: ``state_dict`` holds the rollouts and minibatches done, the reward scaler and the
counters. Gymnasium has no portable snapshot of an environment's internals (a MiniGrid grid,
a pole's angle), so a resumed loader resets its environments, seeded from (seed, rank,
rollouts done), starts new episodes from the agent's start state, and begins with a new
rollout (the minibatches left of a rollout interrupted by the checkpoint are not replayed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctm_dist.data.rl_envs import EpisodeStats, RewardScaler, is_minigrid, make_vector_env
from ctm_dist.losses.ppo import advantages

STATE_FORMAT = "ctm-dist-rl-rollouts-1"
RANK_SEED_STRIDE = 1_000_003
ROLLOUT_SEED_STRIDE = 7_919


@dataclass
class RolloutSpec:
    """What ``RolloutLoader`` needs of the run's ``rl`` section."""

    env_id: str
    num_envs: int
    num_steps: int
    update_epochs: int
    num_minibatches: int
    gamma: float
    gae_lambda: float
    max_environment_steps: int
    mask_velocity: bool = True
    target_kl: float | None = None  # see RolloutLoader.observe_kl


def as_tensor(obs: np.ndarray, env_id: str, device: torch.device) -> torch.Tensor:
    """Observations as the agent takes them: float vectors, or MiniGrid cell indices (int64)."""
    tensor = torch.from_numpy(np.asarray(obs))
    return tensor.to(device, torch.long if is_minigrid(env_id) else torch.float32)


class RolloutLoader:
    def __init__(self, spec: RolloutSpec, seed: int, rank: int, device: torch.device):
        if spec.num_envs % spec.num_minibatches:
            raise ValueError(
                f"rl.num_envs ({spec.num_envs}) must be a multiple of rl.num_minibatches "
                f"({spec.num_minibatches}): a minibatch is a slice of the environments"
            )
        self.spec, self.seed, self.rank, self.device = spec, seed, rank, device
        self.envs = make_vector_env(
            spec.env_id, spec.num_envs, spec.max_environment_steps, spec.mask_velocity
        )
        self.scaler = RewardScaler(spec.num_envs, spec.gamma)
        self.episodes = EpisodeStats(spec.num_envs)
        self.model = None
        self.rollouts = 0  # collected so far
        self.minibatches = 0  # served so far
        self.env_steps = 0  # environment steps, all environments
        self._obs = None  # next observations, after a reset
        self._done = torch.zeros(spec.num_envs)
        self._hidden = None  # agent state carried to the next step (None: start state)
        self.last_kl: float | None = None  # approx KL of the minibatch served last
        self.early_stops = 0  # rollouts whose remaining epochs target_kl skipped

    @property
    def minibatches_per_rollout(self) -> int:
        return self.spec.update_epochs * self.spec.num_minibatches

    def bind(self, model) -> None:
        """The callable that acts: ``model(xs, hidden, dones, actions=None) -> Step``."""
        self.model = model

    def observe_kl(self, approx_kl: float) -> None:
        """PPO's approximate KL of the minibatch just served, measured before its update. After
        each epoch over a rollout the last one is compared with ``target_kl`` (the reference's
        ``--target_kl``): above it, the rollout's remaining epochs are skipped."""
        self.last_kl = approx_kl

    def _reset(self) -> None:
        seed = self.seed + RANK_SEED_STRIDE * self.rank + ROLLOUT_SEED_STRIDE * self.rollouts
        obs, _ = self.envs.reset(seed=seed)
        self._obs = as_tensor(obs, self.spec.env_id, self.device)
        self._done = torch.zeros(self.spec.num_envs, device=self.device)
        self._hidden = None
        self.episodes.restart()

    @torch.no_grad()
    def collect(self) -> dict[str, Any]:
        """One rollout with the agent as it is now, with advantages and returns."""
        if self.model is None:
            raise RuntimeError("RolloutLoader.bind(model) must be called before collecting")
        if self._obs is None:
            self._reset()
        spec, device = self.spec, self.device
        start = None if self._hidden is None else tuple(h.clone() for h in self._hidden)
        obs, actions, logprobs, values, rewards, dones = [], [], [], [], [], []
        for _ in range(spec.num_steps):
            step = self.model(self._obs[None], self._hidden, self._done[None])
            obs.append(self._obs)
            dones.append(self._done)
            actions.append(step.action)
            logprobs.append(step.logprob.float())
            values.append(step.value.float())
            self._hidden = step.hidden
            next_obs, reward, terminated, truncated, _ = self.envs.step(step.action.cpu().numpy())
            done = np.logical_or(terminated, truncated)
            self.episodes.step(reward, done)
            scaled = self.scaler(reward, terminated.astype(np.float64))
            rewards.append(torch.as_tensor(scaled, dtype=torch.float32, device=device))
            self._obs = as_tensor(next_obs, spec.env_id, device)
            self._done = torch.as_tensor(done, dtype=torch.float32, device=device)
        next_value = self.model(self._obs[None], self._hidden, self._done[None]).value.float()
        self.env_steps += spec.num_steps * spec.num_envs
        self.rollouts += 1
        rollout = {
            "obs": torch.stack(obs),
            "actions": torch.stack(actions),
            "logprobs": torch.stack(logprobs),
            "values": torch.stack(values),
            "dones": torch.stack(dones),
            "hidden": start,
        }
        rollout["advantages"], rollout["returns"] = advantages(
            torch.stack(rewards),
            rollout["values"],
            rollout["dones"],
            next_value,
            self._done,
            spec.gamma,
            spec.gae_lambda,
        )
        return rollout

    def minibatch(self, rollout: dict[str, Any], index: int) -> dict[str, Any]:
        """Minibatch ``index`` (of ``num_minibatches``): a slice of the environments, all steps."""
        per = self.spec.num_envs // self.spec.num_minibatches
        envs = slice(index * per, (index + 1) * per)
        batch = {k: v[:, envs] for k, v in rollout.items() if k != "hidden"}
        hidden = rollout["hidden"]
        batch["hidden"] = None if hidden is None else tuple(h[envs] for h in hidden)
        return batch

    def __iter__(self):
        """One rollout's minibatches, all epochs (resumed mid-rollout: a new rollout, see above)."""
        rollout = self.collect()
        done_here = self.minibatches % self.minibatches_per_rollout
        self.minibatches -= done_here  # the interrupted rollout's remainder is not replayed
        self.last_kl = None
        for epoch in range(self.spec.update_epochs):
            for index in range(self.spec.num_minibatches):
                self.minibatches += 1
                yield self.minibatch(rollout, index)
            target = self.spec.target_kl
            if target is not None and self.last_kl is not None and self.last_kl > target:
                # the skipped minibatches count as served, so a resume finds rollout boundaries
                skipped = self.spec.update_epochs - epoch - 1
                self.minibatches += skipped * self.spec.num_minibatches
                self.early_stops += skipped > 0
                break

    # --- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "env_id": self.spec.env_id,
            "num_envs": self.spec.num_envs,
            "rollouts": self.rollouts,
            "minibatches": self.minibatches,
            "env_steps": self.env_steps,
            "scaler": self.scaler.state_dict(),
        }

    def global_state_dict(self) -> dict[str, Any]:
        return self.state_dict()  # this rank's own environments

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an RL rollout state of format {STATE_FORMAT!r}")
        if state["env_id"] != self.spec.env_id:
            raise ValueError(f"RL state is for {state['env_id']!r}, not {self.spec.env_id!r}")
        self.rollouts, self.env_steps = int(state["rollouts"]), int(state["env_steps"])
        self.minibatches = int(state["minibatches"])
        if state["num_envs"] == self.spec.num_envs:  # else the scaler starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self._obs = None  # environments restart (see the module docstring)
