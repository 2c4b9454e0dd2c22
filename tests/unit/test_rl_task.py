"""The RL task's pieces: environments as the reference wraps them, reward scaling, rollouts and
PPO minibatches for every environment family and both agent cores, config and launcher flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium.wrappers.utils import RunningMeanStd

from ctm_dist.data.rl_envs import (
    RewardScaler,
    check_env_id,
    env_shapes,
    make_vector_env,
    random_policy_returns,
)
from ctm_dist.model.rl import LSTMCore, RLAgent
from ctm_dist.tasks import make_task
from ctm_dist.tasks.sums import MetricSums
from ctm_dist.train.cli import TASK_DEFAULTS, config_from_args, make_parser
from ctm_dist.train.config import ConfigError, build_config
from ctm_dist.train.driver import next_commands, summary_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "model.d_model=16",
    "model.d_input=4",
    "model.n_synch_out=4",
    "model.memory_length=3",
    "model.memory_hidden_dims=2",
    "rl.num_envs=4",
    "rl.num_steps=5",
    "rl.num_minibatches=2",
    "rl.update_epochs=2",
    "rl.eval_envs=2",
    "rl.max_environment_steps=20",
]


def test_reward_scaler_is_gymnasiums_normalize_reward_per_environment():
    rng = np.random.default_rng(0)
    scaler = RewardScaler(3, 0.99)
    returns, moments = np.zeros(3), [RunningMeanStd(shape=()) for _ in range(3)]
    for _ in range(40):
        reward, terminated = rng.random(3), (rng.random(3) < 0.2).astype(float)
        ours = scaler(reward, terminated)
        for i in range(3):  # gymnasium's NormalizeReward.step, one environment each
            returns[i] = returns[i] * 0.99 * (1 - terminated[i]) + reward[i]
            moments[i].update(np.array([returns[i]]))
            assert ours[i] == pytest.approx(reward[i] / np.sqrt(moments[i].var + 1e-8), rel=1e-12)
    restored = RewardScaler(3, 0.99)
    restored.load_state_dict(scaler.state_dict())
    assert np.array_equal(restored(np.ones(3), np.zeros(3)), scaler(np.ones(3), np.zeros(3)))


def test_environments_as_the_reference_wraps_them():
    envs = make_vector_env("CartPole-v1", 2, max_steps=7, mask_velocity=True)
    obs, _ = envs.reset(seed=0)
    assert obs.dtype == np.float32 and np.all(obs[:, [1, 3]] == 0)  # velocities hidden
    for t in range(7):
        obs, _, terminated, truncated, _ = envs.step(np.zeros(2, dtype=np.int64))
        if truncated.any() or terminated.any():
            break
    assert np.all(obs[:, [1, 3]] == 0)
    assert env_shapes("Acrobot-v1") == {
        "backbone_type": "classic-control-backbone",
        "obs_dim": 6,
        "n_actions": 3,
    }
    grid = make_vector_env("MiniGrid-FourRooms-v0", 1, max_steps=5)
    assert grid.reset(seed=0)[0].shape == (1, 7, 7, 3)  # the symbolic view only
    with pytest.raises(ValueError, match="unknown RL environment 'Pong-v5'") as error:
        check_env_id("Pong-v5")
    assert "\n" not in str(error.value)
    returns = random_policy_returns("CartPole-v1", 20, max_steps=200, seed=0)
    assert len(returns) == 20 and 8 <= np.mean(returns) <= 60


@pytest.mark.parametrize(
    "env, kind",
    [("CartPole-v1", "ctm"), ("Acrobot-v1", "lstm"), ("MiniGrid-FourRooms-v0", "ctm")],
)
def test_rollouts_and_ppo_minibatches(env, kind):
    """A rollout with the current agent, its minibatches (env slices, all steps, start states), a PPO
    loss whose gradient reaches every parameter, episodes counted; state round-trips."""
    cfg = build_config(
        None,
        ["scale.workers=1", f"rl.env_id={env}", f"model.kind={kind}", *TINY],
        TASK_DEFAULTS["rl"],
    )
    task = make_task(cfg, 0, 1)
    torch.manual_seed(0)
    agent = task.build_model(task.model_config())
    assert isinstance(agent, RLAgent) and isinstance(agent.recurrent_model, LSTMCore) == (
        kind == "lstm"
    )
    loader = task.train_loader(0, seed=1)
    task.bind_model(agent)
    batches = list(loader)
    assert len(batches) == 4 and loader.minibatches == 4 and loader.env_steps == 20
    first = batches[0]
    assert first["obs"].shape[:2] == (5, 2) and first["actions"].shape == (5, 2)
    assert first["hidden"] is None  # the very first rollout starts from the learned start state
    sums = MetricSums()
    loss = task.training_loss(agent, first, sums, torch.device("cpu"), torch.float32)
    loss.backward()
    assert all(p.grad is not None for p in agent.parameters())
    assert float(sums["samples"][0]) == 10 and float(sums["env_steps"][0]) == 20
    second = next(iter(loader))  # the next rollout starts from the carried state
    assert second["hidden"] is not None and second["hidden"][0].shape[0] == 2
    summary = task.summarise(sums.reduce()[0], "train")
    assert {"train/policy_loss", "train/entropy", "perf/episodes_per_s"} <= set(summary)
    again = make_task(cfg, 0, 1).train_loader(0, seed=1)
    again.load_state_dict(loader.state_dict())
    assert again.state_dict() == loader.state_dict()
    evaluation = task.evaluate_model(agent, torch.device("cpu"))
    assert evaluation["eval/episodes"] == 2


def test_target_kl_skips_the_rest_of_a_rollouts_epochs():
    """The reference's --target_kl: after an epoch whose last minibatch's approx KL exceeds it, the
    rollout's remaining epochs are skipped (counted as served, so a resume keeps rollout
    boundaries); below it every epoch runs. The loss feeds the KL back through the task."""
    cfg = build_config(
        None,
        ["scale.workers=1", *TINY, "rl.update_epochs=3", "rl.target_kl=1e-9"],
        TASK_DEFAULTS["rl"],
    )
    task = make_task(cfg, 0, 1)
    torch.manual_seed(0)
    agent = task.build_model(task.model_config())
    loader = task.train_loader(0, seed=1)
    task.bind_model(agent)
    optimizer = torch.optim.SGD(agent.parameters(), lr=1.0)  # a big step: the KL moves off 0
    served = 0
    for batch in loader:
        optimizer.zero_grad()
        task.training_loss(
            agent, batch, MetricSums(), torch.device("cpu"), torch.float32
        ).backward()
        optimizer.step()
        served += 1
    assert loader.last_kl > 1e-9
    assert served == 2 and loader.minibatches == 6 and loader.early_stops == 1
    next(iter(loader))  # the next rollout starts on its boundary
    assert loader.minibatches == 7

    loose = build_config(
        None,
        ["scale.workers=1", *TINY, "rl.update_epochs=3", "rl.target_kl=1e9"],
        TASK_DEFAULTS["rl"],
    )
    task = make_task(loose, 0, 1)
    loader = task.train_loader(0, seed=1)
    task.bind_model(agent)
    served = 0
    for batch in loader:
        task.training_loss(agent, batch, MetricSums(), torch.device("cpu"), torch.float32)
        served += 1
    assert served == 6 and loader.early_stops == 0
    with pytest.raises(ConfigError, match="rl.target_kl must be > 0"):
        build_config(None, ["rl.target_kl=0"], TASK_DEFAULTS["rl"])


def test_rl_config_and_launcher_flags():
    parser = make_parser("ctm-rl", "rl")
    cfg = config_from_args("rl", parser.parse_args(["--env", "Acrobot-v1", "model.kind=lstm"]))
    assert (cfg.rl.env_id, cfg.model.preset, cfg.rl.max_environment_steps) == (
        "Acrobot-v1",
        "acrobot",
        500,
    )
    assert cfg.model.kind == "lstm" and cfg.model.overrides == {}
    assert cfg.deepspeed.precision == "fp32"
    explicit = parser.parse_args(["--env", "Acrobot-v1", "rl.max_environment_steps=50"])
    assert config_from_args("rl", explicit).rl.max_environment_steps == 50
    with pytest.raises(ConfigError, match="multiple of rl.num_minibatches"):
        build_config(None, ["rl.num_envs=6", "rl.num_minibatches=4"], TASK_DEFAULTS["rl"])
    with pytest.raises(ConfigError, match="kind must be one of"):
        build_config(None, ["model.kind=gru"], TASK_DEFAULTS["rl"])


def test_driver_reports_the_eval_return_and_suggests_the_offline_tools():
    assert [c.split()[1] for c in next_commands("s3://b/runs/rl-a", "rl")] == [
        "launch/evaluate.py",
        "launch/visualize.py",  # pictures from episodes: no data to give
        "launch/export.py",
    ]
    assert [c.split()[1] for c in next_commands("s3://b/runs/p", "parity")] == [
        "launch/evaluate.py",
        "launch/export.py",  # parity pictures need --data
    ]
    lines = summary_lines({"run": "rl-a", "step": 9, "eval/episode_return": 87.25})
    assert "  eval mean episode return: 87.2500" in lines
