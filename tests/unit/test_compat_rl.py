"""Reference RL checkpoints (tasks/rl/train.py's format) in and out through ``ctm_dist.compat``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from rl_fixtures import RL_FIXTURES as FIXTURES
from rl_fixtures import load_rl_case as load_case

from ctm_dist.compat import (
    CheckpointError,
    export_reference_checkpoint,
    load_reference_checkpoint,
    read_reference_checkpoint,
)
from ctm_dist.model.rl import RLAgent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_reference_checkpoint(path: Path, args, weights) -> None:
    """What the reference's ``save_model`` writes (its episode curves hold numpy scalars)."""
    torch.save(
        {
            "model_state_dict": weights,
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "global_step": 1200,
            "training_iteration": 3,
            "episode_rewards_tracking": [np.float32(12.0), np.float32(30.5)],
            "episode_lengths_tracking": [np.int64(12), np.int64(31)],
            "global_steps_tracking": [400, 800],
            "args": args,
        },
        path,
    )


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_reference_rl_checkpoint_gives_the_reference_agent(tmp_path, path):
    args, weights, expected = load_case(path)
    file = tmp_path / "checkpoint.pt"
    write_reference_checkpoint(file, args, weights)
    agent = load_reference_checkpoint(file)
    assert isinstance(agent, RLAgent) and not agent.training
    assert agent.cfg.kind == args.model_type
    hidden = (expected["hidden_0"], expected["hidden_1"])
    with torch.no_grad():
        features, _ = agent(expected["obs"][0], hidden)  # m(x, hidden), as the reference's
        logits = agent.actor(features)
        value = agent.critic(features)
    torch.testing.assert_close(features, expected["step_features"], atol=1e-5, rtol=0)
    assert logits.shape == (2, agent.cfg.n_actions) and value.shape == (2, 1)
    start = agent.get_initial_state(5)
    assert [tuple(s.shape) for s in start] == [(5, *h.shape[1:]) for h in hidden]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_export_then_load_gives_the_same_agent(tmp_path, path):
    args, weights, _ = load_case(path)
    file = tmp_path / "reference.pt"
    write_reference_checkpoint(file, args, weights)
    agent = load_reference_checkpoint(file)
    out = tmp_path / "exported.pt"
    export_reference_checkpoint(agent, out, args.env_id, extra_args={"num_envs": 4})
    saved = read_reference_checkpoint(out)
    for name, value in vars(args).items():  # every option the reference's agent is built from
        assert getattr(saved["args"], name) == value, name
    assert saved["args"].num_envs == 4 and saved["args"].batch_size == 400
    again = load_reference_checkpoint(out)
    for key, value in agent.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_rl_checkpoints_that_cannot_work(tmp_path):
    args, weights, _ = load_case(FIXTURES[0])
    file = tmp_path / "bad.pt"
    lacking = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "d_model"})
    write_reference_checkpoint(file, lacking, weights)
    with pytest.raises(CheckpointError, match=r"lack \['d_model'\]"):
        load_reference_checkpoint(file)
    wrong = argparse.Namespace(**{**vars(args), "d_model": args.d_model + 1})
    write_reference_checkpoint(file, wrong, weights)
    with pytest.raises(CheckpointError, match="do not fit the RLAgent its args describe"):
        load_reference_checkpoint(file)
    write_reference_checkpoint(file, args, weights)
    with pytest.raises(CheckpointError, match="no config overrides"):
        load_reference_checkpoint(file, attention_impl="sdpa")
    agent = load_reference_checkpoint(file)
    with pytest.raises(ValueError, match="does not fit"):
        export_reference_checkpoint(agent, tmp_path / "x.pt", "MiniGrid-FourRooms-v0")
