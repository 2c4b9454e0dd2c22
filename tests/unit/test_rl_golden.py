"""Our RL agents (CTM and LSTM cores) against the reference's (fixtures from tests/golden/generate_rl.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rl_fixtures import RL_FIXTURES, load_rl_case

from ctm_dist.compat_rl import rl_config_from_reference_args
from ctm_dist.model.rl import RLAgent

FIXTURES = RL_FIXTURES
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def agent_for(path: Path):
    args, weights, expected = load_rl_case(path)
    agent = RLAgent(rl_config_from_reference_args(args, weights))
    agent.load_state_dict(weights, strict=True)
    return agent.eval(), expected


def test_fixtures_cover_both_cores_and_backbones():
    seen = {(a.model_type, "MiniGrid" in a.env_id) for a, _, _ in map(load_rl_case, FIXTURES)}
    assert seen == {("ctm", False), ("ctm", True), ("lstm", False), ("lstm", True)}


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_one_step_matches_reference(path):
    agent, expected = agent_for(path)
    hidden = (expected["hidden_0"], expected["hidden_1"])
    with torch.no_grad():
        features, (h0, h1), pre, post = agent(expected["obs"][0], hidden, track=True)
    torch.testing.assert_close(features, expected["step_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(h0, expected["step_hidden_0"], atol=ATOL, rtol=0)
    torch.testing.assert_close(h1, expected["step_hidden_1"], atol=ATOL, rtol=0)
    torch.testing.assert_close(pre, expected["step_pre_activations"], atol=ATOL, rtol=0)
    torch.testing.assert_close(post, expected["step_post_activations"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_rollout_with_resets_matches_reference(path):
    """Policy, value and state over three steps, one env's episode ending after each of the first two."""
    agent, expected = agent_for(path)
    hidden = (expected["hidden_0"], expected["hidden_1"])
    with torch.no_grad():
        step = agent.act(expected["obs"], hidden, expected["dones"], expected["actions"])
    for name in ("logprob", "entropy", "value", "logits"):
        torch.testing.assert_close(getattr(step, name), expected[name], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.hidden[0], expected["last_hidden_0"], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.hidden[1], expected["last_hidden_1"], atol=ATOL, rtol=0)
