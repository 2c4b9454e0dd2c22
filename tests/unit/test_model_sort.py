"""The sort variant of the CTM: outputs equal to the reference's, and the CTM's execution paths.

Fixtures: ``tests/golden/sort/*.safetensors``, written by ``tests/golden/generate.py --only sort``
from the reference's ``ContinuousThoughtMachineSORT``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from golden_fixtures import load_case

from ctm_dist.model import CTM, CTMConfig, SortCTM, build_model, preset

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sort"
FIXTURES = sorted(GOLDEN.glob("sort_*.safetensors"))
ATOL = 1e-5
ATOL_INTERNALS = 5e-5  # as in test_model_golden.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fixtures_cover_the_options():
    configs = [load_case(p)[0] for p in FIXTURES]
    assert {c["neuron_select_type"] for c in configs} == {"first-last", "random", "random-pairing"}
    assert {c["deep_nlms"] for c in configs} == {True, False}
    assert {c["synapse_depth"] for c in configs} >= {1, 2, 4}


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_matches_reference(path):
    config, seed, weights, expected = load_case(path)
    np.random.seed(seed)
    model = build_model(CTMConfig(**config))
    assert type(model) is SortCTM
    for key, value in model.state_dict().items():  # the same NumPy seed draws the same pairs
        if "neuron_indices" in key:
            assert torch.equal(value, weights[key]), key
    assert not any("action" in key for key in weights)  # no action synchronisation at all
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        predictions, certainties, sync_out = model(expected["input"])
        tracked = model(expected["input"], track=True)
    torch.testing.assert_close(predictions, expected["predictions"], atol=ATOL, rtol=0)
    torch.testing.assert_close(certainties, expected["certainties"], atol=ATOL, rtol=0)
    torch.testing.assert_close(sync_out, expected["sync_out"][-1], atol=ATOL, rtol=0)
    tracking = tracked[3]
    assert tracking.attention is None and tracking.sync_action is None
    for name in ("sync_out", "pre_activations", "post_activations"):
        torch.testing.assert_close(
            getattr(tracking, name), expected[name], atol=ATOL_INTERNALS, rtol=0, msg=name
        )


def _small(**changes) -> CTMConfig:
    return preset(
        "sort",
        sequence_length=6,
        iterations=8,
        d_model=24,
        n_synch_out=8,
        memory_length=4,
        synapse_depth=2,
        **changes,
    )


def _grads(model: CTM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    predictions, certainties, _ = model(x)
    (predictions.square().mean() + certainties[:, 1].mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "execution",
    [
        dict(cpu_kernels=True),
        dict(cpu_kernels=True, tick_checkpointing=3),
        dict(cpu_kernels=True, recompute_nlms=True),
    ],
    ids=["banks", "tick_checkpointing", "recompute_nlms"],
)
def test_execution_paths_give_plain_autograd_gradients(execution):
    torch.manual_seed(0)
    plain = build_model(_small(cpu_kernels=False, compile=False))
    other = build_model(_small(compile=False, **execution))
    other.load_state_dict(plain.state_dict())
    x = torch.randn(5, 6)
    want, got = _grads(plain, x), _grads(other, x)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_preset_follows_the_reference_defaults_and_checks_its_input():
    cfg = preset("sort")
    assert (cfg.d_input, cfg.out_dims, cfg.iterations, cfg.d_model) == (30, 31, 50, 512)
    assert (cfg.heads, cfg.n_synch_action, cfg.backbone_type) == (0, 0, "none")
    model = build_model(_small())
    with pytest.raises(ValueError, match=r"takes \[batch, 6\] numbers, got \(2, 7\)"):
        model(torch.randn(2, 7))
    with pytest.raises(ValueError, match="heads and n_synch_action must be 0"):
        _small(heads=2)
    with pytest.raises(ValueError, match="backbone_type must be 'none'"):
        _small(backbone_type="parity_backbone")
    assert type(build_model(preset("demo"))) is CTM
