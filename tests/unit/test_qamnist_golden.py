"""The QAMNIST CTM and LSTM baseline against the reference's outputs (fixtures: tests/golden/generate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from golden_fixtures import load_case

from ctm_dist.model.qamnist import QAMNISTCTM, build_qamnist_model, qamnist_config

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "qamnist"
FIXTURES = sorted(GOLDEN.glob("*.safetensors"))
ATOL = 1e-5
ATOL_INTERNALS = 5e-5  # as for the CTM fixtures (test_model_golden.py)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(config: dict, seed: int, attention_impl: str = "sdpa"):
    np.random.seed(seed)  # the reference's neuron indices come from the same NumPy draws
    return build_qamnist_model(qamnist_config(**config, attention_impl=attention_impl))


def test_fixtures_cover_both_models():
    kinds = {load_case(p)[0]["kind"] for p in FIXTURES}
    assert kinds == {"ctm", "lstm"}
    assert len(FIXTURES) >= 3


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
@pytest.mark.parametrize("attention_impl", ["sdpa", "reference"])
def test_matches_reference(path, attention_impl):
    config, seed, weights, expected = load_case(path)
    model = build(config, seed, attention_impl)
    for key, value in model.state_dict().items():
        if "neuron_indices" in key:
            assert torch.equal(value, weights[key]), key
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        predictions, certainties, sync_out = model(expected["input"], expected["question"])
    torch.testing.assert_close(predictions, expected["predictions"], atol=ATOL, rtol=0)
    torch.testing.assert_close(certainties, expected["certainties"], atol=ATOL, rtol=0)
    if isinstance(model, QAMNISTCTM):
        torch.testing.assert_close(sync_out, expected["sync_out"], atol=ATOL, rtol=0)
    else:
        assert sync_out is None


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_tracking_matches_reference(path):
    config, seed, weights, expected = load_case(path)
    model = build(config, seed)
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        _, _, _, tracking = model(expected["input"], expected["question"], track=True)
    for name in ("pre_activations", "post_activations", "attention"):
        torch.testing.assert_close(
            getattr(tracking, name), expected[name], atol=ATOL_INTERNALS, rtol=0, msg=name
        )
