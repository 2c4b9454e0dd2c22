"""Playing whole episodes with an agent: the RL task's evaluation in training (policy sampled), its
offline evaluation (greedy policy: the most probable action) and its pictures.

The environment is the run's (``rl.env_id``, ``rl.max_environment_steps``, ``rl.mask_velocity``):
the offline tools read it from the model's metadata, which a run's training config (and an
export of it) provides (``ReinforcementLearning.run_meta``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ctm_dist.data.rl_envs import make_vector_env

from .charts import Chart, PictureRequest
from .rl_rollouts import as_tensor
from .sums import Measure


@dataclass(frozen=True)
class EnvSettings:
    env_id: str
    max_steps: int
    mask_velocity: bool = True

    @classmethod
    def from_meta(cls, meta: dict | None) -> EnvSettings:
        """The environment a model's metadata records; ValueError when it records none."""
        meta = meta or {}
        if not meta.get("env_id"):
            raise ValueError(
                "the checkpoint records no RL environment: evaluate a run of ours or its export"
            )
        return cls(meta["env_id"], int(meta["max_environment_steps"]), bool(meta["mask_velocity"]))


@dataclass
class Episode:
    ret: float
    length: int
    values: list[float]  # the critic's value estimate at each step
    p_action: list[float]  # the probability of the action taken at each step


@torch.no_grad()
def play_episodes(
    agent, env: EnvSettings, seeds: list[int], greedy: bool, device=torch.device("cpu")
) -> list[Episode]:
    """One episode per seed, all environments stepped together, in the order of ``seeds``.

    ``agent(xs, hidden, dones)`` is an :class:`~ctm_dist.model.rl.RLAgent` (or its engine); its
    memory starts from the learned start state. ``greedy`` acts with the most probable action,
    else samples from the policy."""
    n = len(seeds)
    envs = make_vector_env(env.env_id, n, env.max_steps, env.mask_velocity)
    try:
        obs, _ = envs.reset(seed=list(seeds))
        obs = as_tensor(obs, env.env_id, device)
        done = torch.zeros(n)
        hidden, finished = None, np.zeros(n, bool)
        returns, lengths = np.zeros(n), np.zeros(n, np.int64)
        values = [[] for _ in range(n)]
        p_action = [[] for _ in range(n)]
        while not finished.all():
            step = agent(obs[None], hidden, done[None])
            logits = step.logits.float()
            action = logits.argmax(-1) if greedy else step.action
            probability = logits.softmax(-1).gather(1, action.view(-1, 1)).squeeze(1)
            obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
            ended = np.logical_or(terminated, truncated)
            for i in np.flatnonzero(~finished):
                returns[i] += reward[i]
                lengths[i] += 1
                values[i].append(float(step.value[i]))
                p_action[i].append(float(probability[i]))
            finished |= ended
            obs = as_tensor(obs, env.env_id, device)
            done = torch.as_tensor(ended, dtype=torch.float32)
            hidden = step.hidden
    finally:
        envs.close()
    return [Episode(float(returns[i]), int(lengths[i]), values[i], p_action[i]) for i in range(n)]


class EpisodeMeasure(Measure):
    """Return and length of ``episodes`` greedy episodes (seed ``seed + i`` for episode ``i``),
    each worker playing its share; per-episode values are kept as sums over the workers."""

    shape = ("env", "episodes", "seed")

    def __init__(self, env: EnvSettings, episodes: int, seed: int):
        super().__init__()
        self.env, self.episodes, self.seed = env, episodes, seed

    def play(self, agent, rank: int, world_size: int) -> EpisodeMeasure:
        mine = list(range(rank, self.episodes, world_size))
        played = play_episodes(agent, self.env, [self.seed + i for i in mine], greedy=True)
        returns, lengths = torch.zeros(self.episodes), torch.zeros(self.episodes)
        for i, episode in zip(mine, played):
            returns[i], lengths[i] = episode.ret, episode.length
        self.sums.add("samples", len(mine))
        self.sums.add("returns", returns)
        self.sums.add("lengths", lengths)
        return self

    def summary(self) -> dict:
        returns, lengths = self.sums["returns"], self.sums["lengths"]
        return {
            "env_id": self.env.env_id,
            "policy": "greedy",
            "episodes": self.n,
            "seed": self.seed,
            "mean_return": float(returns.mean()),
            "std_return": float(returns.std(unbiased=False)),
            "min_return": float(returns.min()),
            "max_return": float(returns.max()),
            "mean_length": float(lengths.mean()),
            "returns": returns.tolist(),
            "lengths": [int(v) for v in lengths.tolist()],
        }


def episode_charts(agent, env: EnvSettings, req: PictureRequest) -> list[Chart]:
    """The return of ``req.count`` greedy episodes, and for the first ``req.per_input`` the
    critic's value estimate and the probability of the action taken at every step."""
    played = play_episodes(agent, env, [req.seed + i for i in range(req.count)], greedy=True)
    returns = [e.ret for e in played]
    mean_length = sum(e.length for e in played) / len(played)
    charts = [
        Chart(
            "episode_returns",
            f"{env.env_id}, greedy policy: mean return {np.mean(returns):.1f}, "
            f"mean length {mean_length:.1f}",
            "episode",
            "return",
            {"return": returns},
            bars=True,
        )
    ]
    for i, episode in enumerate(played[: req.per_input]):
        charts.append(
            Chart(
                f"episode_{i}",
                f"episode {i} (seed {req.seed + i}): return {episode.ret:g}, "
                f"{episode.length} steps",
                "step",
                "value",
                {"value estimate": episode.values, "p(action taken)": episode.p_action},
            )
        )
    return charts
