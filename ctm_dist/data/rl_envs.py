"""Environments of the RL task, as the reference trains on them, and what we keep of their state.

``make_vector_env`` builds ``num_envs`` copies of one gymnasium environment stepped in this
process (``SyncVectorEnv``; an ended episode resets within the same step, as gymnasium 0.29 did
for the reference):

* classic control (``CartPole-v1``, ``Acrobot-v1``): velocities masked out of the observation
  (``mask_velocity``, the reference's default, which makes the task need memory), episodes cut
  at ``max_steps``;
* MiniGrid (``MiniGrid-FourRooms-v0`` ...): the agent's 7 x 7 symbolic view (``image``) only,
  episodes cut at ``max_steps``.

Two pieces of per-environment state live here instead of in gymnasium wrappers so that a
checkpoint holds them: ``RewardScaler`` (the reference's ``NormalizeReward``: rewards divided by
the running standard deviation of each environment's discounted return) and ``EpisodeStats``
(raw returns and lengths of the episodes in progress and of those finished).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

CLASSIC_CONTROL = ("CartPole-v1", "Acrobot-v1")
# velocity components zeroed by mask_velocity
VELOCITY_MASKS = {
    "CartPole-v1": np.array([1, 0, 1, 0], dtype=np.float32),
    "Acrobot-v1": np.array([1, 1, 1, 1, 0, 0], dtype=np.float32),
}
REWARD_EPSILON = 1e-8  # the reference's NormalizeReward epsilon


def is_minigrid(env_id: str) -> bool:
    return env_id.startswith("MiniGrid")


def check_env_id(env_id: str) -> None:
    """A clear one-line error for an environment the RL task cannot run."""
    if env_id in CLASSIC_CONTROL:
        return
    if is_minigrid(env_id):
        # registers the MiniGrid environments; imported only for them (it loads pygame, ~1 s)
        import minigrid  # noqa: F401

        if env_id in gym.registry:
            return
    raise ValueError(
        f"unknown RL environment {env_id!r}: use {', '.join(CLASSIC_CONTROL)} or a MiniGrid id "
        "such as MiniGrid-FourRooms-v0"
    )


class MaskVelocity(gym.ObservationWrapper):
    def __init__(self, env: gym.Env, mask: np.ndarray):
        super().__init__(env)
        self.mask = mask

    def observation(self, observation):
        return (observation * self.mask).astype(np.float32)


def _classic_control(env_id: str, max_steps: int, mask_velocity: bool):
    def make() -> gym.Env:
        env = gym.make(env_id, max_episode_steps=max_steps, disable_env_checker=True)
        return MaskVelocity(env, VELOCITY_MASKS[env_id]) if mask_velocity else env

    return make


def _minigrid(env_id: str, max_steps: int):
    def make() -> gym.Env:
        from minigrid.wrappers import ImgObsWrapper  # only for MiniGrid, see check_env_id

        return ImgObsWrapper(gym.make(env_id, max_steps=max_steps, disable_env_checker=True))

    return make


def make_vector_env(
    env_id: str, num_envs: int, max_steps: int, mask_velocity: bool = True
) -> gym.vector.SyncVectorEnv:
    check_env_id(env_id)
    if is_minigrid(env_id):
        make = _minigrid(env_id, max_steps)
    else:
        make = _classic_control(env_id, max_steps, mask_velocity)
    return gym.vector.SyncVectorEnv(
        [make for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


class RewardScaler:
    """Per environment: reward / sqrt(running variance of its discounted return + eps).

    The running moments are those of gymnasium's ``NormalizeReward`` (Welford/Chan updates from a
    count of 1e-4); the discounted return is reset only where an episode terminated, as there.
    """

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.returns = np.zeros(num_envs)
        self.mean = np.zeros(num_envs)
        self.var = np.ones(num_envs)
        self.count = np.full(num_envs, 1e-4)

    def __call__(self, reward: np.ndarray, terminated: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma * (1 - terminated) + reward
        delta = self.returns - self.mean
        total = self.count + 1
        self.mean = self.mean + delta / total
        self.var = (self.var * self.count + delta**2 * self.count / total) / total
        self.count = total
        return reward / np.sqrt(self.var + REWARD_EPSILON)

    def state_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("returns", "mean", "var", "count")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, np.asarray(value, dtype=np.float64))


class EpisodeStats:
    """Raw return and length of each environment's episode in progress; finished ones collected."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []

    def step(self, reward: np.ndarray, done: np.ndarray) -> None:
        self.returns += reward
        self.lengths += 1
        for i in np.flatnonzero(done):
            self.finished.append((float(self.returns[i]), int(self.lengths[i])))
        self.returns[done] = 0.0
        self.lengths[done] = 0

    def take(self) -> list[tuple[float, int]]:
        out, self.finished = self.finished, []
        return out

    def restart(self) -> None:
        """All environments start new episodes (after a resume: see ``RolloutCollector.state_dict``)."""
        self.returns[:] = 0.0
        self.lengths[:] = 0


def random_policy_returns(
    env_id: str, episodes: int, max_steps: int, seed: int = 0, mask_velocity: bool = True
) -> list[float]:
    """Raw returns of ``episodes`` episodes of the uniformly random policy (the learning baseline)."""
    envs = make_vector_env(env_id, 1, max_steps, mask_velocity)
    envs.action_space.seed(seed)
    envs.reset(seed=seed)
    stats = EpisodeStats(1)
    returns: list[float] = []
    while len(returns) < episodes:
        _, reward, terminated, truncated, _ = envs.step(envs.action_space.sample())
        stats.step(reward, np.logical_or(terminated, truncated))
        returns += [r for r, _ in stats.take()]
    envs.close()
    return returns[:episodes]


def env_shapes(env_id: str) -> dict:
    """What the environment decides of the agent: backbone, observation length, actions."""
    envs = make_vector_env(env_id, 1, 1)
    space = envs.single_observation_space
    out = {
        "backbone_type": "navigation-backbone"
        if is_minigrid(env_id)
        else "classic-control-backbone",
        "obs_dim": 1 if is_minigrid(env_id) else int(np.prod(space.shape)),
        "n_actions": int(envs.single_action_space.n),
    }
    envs.close()
    return out
