"""Reinforcement learning: PPO on gymnasium environments (CartPole, Acrobot, MiniGrid four-rooms).

The reference's RL task (``tasks/rl`` of the CTM repository): a recurrent agent (the RL CTM, or
the LSTM baseline with ``model.kind=lstm``) trained with PPO, its memory carried across
environment steps. Here it is a task of the one training loop: every worker runs its own
``rl.num_envs`` environments (``rl_rollouts.py``), one trainer step is one PPO minibatch through
the DeepSpeed engine, whose gradients are all-reduced over the workers as for every task, and
evaluation plays one episode per evaluation environment with the current policy.

Metrics: ``train/episode_return`` and ``train/episode_length`` (raw, of the episodes finished
since the last log line), ``perf/episodes_per_s``, ``perf/env_steps_per_s``, PPO's losses,
entropy, approximate KL and clip fraction; ``eval/episode_return``.

Offline (``rl_offline.py``): evaluation plays ``--episodes`` episodes with the greedy policy in
the run's environment (recorded in the model's metadata, ``run_meta``) and reports their mean
return and length; the pictures are the return per episode and the value estimate and action
probability per step; exports in the reference's format are its RL script's (``dataset``: the
environment id).
"""

from __future__ import annotations

import time

import torch

from ctm_dist.data.rl_envs import check_env_id, env_shapes
from ctm_dist.losses.ppo import ppo_loss
from ctm_dist.model.rl import RLAgent
from ctm_dist.model.rl_config import RLAgentConfig, rl_preset

from .base import EVAL_SEED_OFFSET, Task
from .rl_offline import EnvSettings, EpisodeMeasure, episode_charts, play_episodes
from .rl_rollouts import RolloutLoader, RolloutSpec
from .sums import MetricSums

# --env: the reference scripts' model preset and episode limit per environment
ENV_DEFAULTS = {
    "CartPole-v1": ("cartpole", 200),
    "Acrobot-v1": ("acrobot", 500),
    "MiniGrid-FourRooms-v0": ("4rooms", 300),
}
# PPO statistics averaged over the transitions of a log interval (metric name -> sum name)
PPO_RATES = {
    "policy_loss": "policy_sum",
    "value_loss": "value_sum",
    "entropy": "entropy_sum",
    "approx_kl": "kl_sum",
    "clip_fraction": "clip_sum",
}


class ReinforcementLearning(Task):
    name = "rl"
    generated_data = True  # environments, no shard set
    pictures_from_model = True  # episodes played in the run's environment
    launch_defaults = {
        # the reference's cartpole script, sized for a few CPU workers (it ran 256 envs on a GPU)
        "run": {"name": "rl", "max_steps": 20_000, "log_every": 20},
        "data": {"task": "rl"},
        "model": {"preset": "cartpole"},
        # Adam as the reference's (eps 1e-5), lr annealed linearly to 0 over the run (--anneal_lr)
        "optim": {"lr": 1e-3, "eps": 1e-5, "warmup_steps": 0, "schedule": "linear", "min_lr": 0.0},
        "deepspeed": {"precision": "fp32", "gradient_clipping": 0.5},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000},
    }

    launch_flags = {
        "env": "the environment: "
        + ", ".join(ENV_DEFAULTS)
        + " (sets rl.env_id and the reference's model preset and episode limit for it)"
    }

    @classmethod
    def flag_overrides(cls, flags: dict) -> list[str]:
        env = flags.get("env")
        if env is None:
            return []
        preset_name, max_steps = ENV_DEFAULTS.get(env, (None, None))
        out = [f"rl.env_id={env}"]
        if preset_name is not None:
            out += [f"model.preset={preset_name}", f"rl.max_environment_steps={max_steps}"]
        return out

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        self.rl = cfg.rl
        self.loader: RolloutLoader | None = None
        self.model = None
        self._clock = time.perf_counter()
        self._env_steps_counted = 0  # environment steps already added to the metric sums

    @classmethod
    def preflight(cls, cfg) -> None:
        check_env_id(cfg.rl.env_id)

    # --- model
    def data_overrides(self) -> dict:
        return env_shapes(self.rl.env_id)

    @classmethod
    def config_for(cls, preset_name: str, overrides: dict, kind: str = "ctm") -> RLAgentConfig:
        return rl_preset(preset_name, **{"kind": kind, **overrides})

    def model_config(self) -> RLAgentConfig:
        return self.config_for(
            self.cfg.model.preset,
            {**self.data_overrides(), **self.cfg.model.overrides},
            self.cfg.model.kind,
        )

    @classmethod
    def build_model(cls, model_cfg: RLAgentConfig) -> RLAgent:
        return RLAgent(model_cfg)

    @classmethod
    def config_type(cls, fields: dict) -> type:
        return RLAgentConfig

    @classmethod
    def run_meta(cls, train_config: dict) -> dict:
        """The environment the run trained in, which the offline tools play."""
        rl = train_config.get("rl") or {}
        keys = ("env_id", "max_environment_steps", "mask_velocity")
        return {k: rl[k] for k in keys if k in rl}

    @classmethod
    def reference_dataset(cls, meta: dict) -> str | None:
        return meta.get("env_id")

    def bind_model(self, model) -> None:
        self.model = model
        if self.loader is not None:
            self.loader.bind(model)

    # --- data
    def train_loader(self, batch_size: int, seed: int) -> RolloutLoader:
        r = self.rl
        spec = RolloutSpec(
            r.env_id,
            r.num_envs,
            r.num_steps,
            r.update_epochs,
            r.num_minibatches,
            r.gamma,
            r.gae_lambda,
            r.max_environment_steps,
            r.mask_velocity,
            r.target_kl,
        )
        self.loader = RolloutLoader(spec, seed, self.rank, torch.device("cpu"))
        if self.model is not None:
            self.loader.bind(self.model)
        return self.loader

    def eval_loader(self, batch_size: int):
        return []  # evaluation plays episodes (evaluate_model)

    # --- objective
    def training_loss(self, engine, batch, sums: MetricSums, device, dtype) -> torch.Tensor:
        r = self.rl
        step = engine(batch["obs"], batch["hidden"], batch["dones"], batch["actions"].flatten())
        out = ppo_loss(
            step.logprob.float(),
            step.entropy.float(),
            step.value.float(),
            batch["logprobs"].flatten(),
            batch["advantages"].flatten(),
            batch["returns"].flatten(),
            batch["values"].flatten(),
            r.clip_coef,
            r.ent_coef,
            r.vf_coef,
            r.norm_adv,
            r.clip_vloss,
        )
        if r.target_kl is not None:  # a host sync per minibatch, only when asked for
            self.loader.observe_kl(float(out.approx_kl))
        with torch.no_grad():
            n = batch["actions"].numel()
            sums.add("samples", n)
            sums.add("loss_sum", out.loss.detach() * n)
            for name, value in zip(
                PPO_RATES.values(),
                (out.policy, out.value, out.entropy, out.approx_kl, out.clip_fraction),
            ):
                sums.add(name, value.detach() * n)
            add_episodes(sums, self.loader.episodes.take())
            sums.add("env_steps", self.loader.env_steps - self._env_steps_counted)
            self._env_steps_counted = self.loader.env_steps
        return out.loss

    def summarise(self, reduced: dict, split: str) -> dict:
        out = episode_summary(reduced, split)
        if split == "train":
            n = max(float(reduced["samples"][0]), 1.0)
            for metric, sum_name in PPO_RATES.items():
                out[f"train/{metric}"] = float(reduced[sum_name][0]) / n
            now = time.perf_counter()
            elapsed, self._clock = max(now - self._clock, 1e-9), now
            out["perf/episodes_per_s"] = float(reduced["episodes"][0]) / elapsed
            out["perf/env_steps_per_s"] = float(reduced["env_steps"][0]) / elapsed
        return out

    @torch.no_grad()
    def evaluate_model(self, engine, device) -> dict:
        """One episode per evaluation environment, policy sampled, the same seeds every time."""
        r = self.rl
        first = self.cfg.run.seed + EVAL_SEED_OFFSET * (self.rank + 1)
        env = EnvSettings(r.env_id, r.max_environment_steps, r.mask_velocity)
        played = play_episodes(
            engine, env, [first + i for i in range(r.eval_envs)], greedy=False, device=device
        )
        sums = MetricSums()
        add_episodes(sums, [(e.ret, e.length) for e in played])
        reduced, _ = sums.reduce()
        return episode_summary(reduced, "eval")

    # --- offline evaluation and pictures
    @classmethod
    def evaluation_loader(cls, model_cfg, data, req, rank, world_size):
        return []  # episodes, played in evaluation_extras

    @classmethod
    def evaluation_measures(cls, model_cfg, req):
        return {}

    @classmethod
    def evaluation_extras(cls, model, req, locate, rank, world_size, meta=None):
        """``req.episodes`` episodes (seeds ``req.rl_seed + i``), greedy, split over workers."""
        measure = EpisodeMeasure(EnvSettings.from_meta(meta), req.episodes, req.rl_seed)
        return {"rl": measure.play(model, rank, world_size)}

    @classmethod
    def picture_charts(cls, model, meta, data, req):
        return episode_charts(model, EnvSettings.from_meta(meta), req)


def add_episodes(sums: MetricSums, episodes: list[tuple[float, int]]) -> None:
    sums.add("episodes", len(episodes))
    sums.add("return_sum", sum(ret for ret, _ in episodes))
    sums.add("length_sum", sum(length for _, length in episodes))


def episode_summary(reduced: dict, split: str) -> dict:
    episodes = float(reduced["episodes"][0])
    out = {f"{split}/episodes": episodes}
    if episodes:
        out[f"{split}/episode_return"] = float(reduced["return_sum"][0]) / episodes
        out[f"{split}/episode_length"] = float(reduced["length_sum"][0]) / episodes
    return out
