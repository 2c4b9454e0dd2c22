"""The LSTM baseline against outputs of the reference's ``models/lstm.py``
(fixtures from tests/golden/generate_baselines.py), and its config's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_fixtures import read_golden

from ctm_dist.model.lstm import LSTMBaseline, LSTMConfig

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "baselines"
FIXTURES = sorted(GOLDEN.glob("lstm_*.safetensors"))
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_case(path: Path):
    metadata, weights, tensors = read_golden(path)
    return json.loads(metadata["config"]), weights, tensors


def test_fixtures_cover_the_parity_configuration_and_more_layers():
    configs = [load_case(p)[0] for p in FIXTURES]
    assert {c["backbone_type"] for c in configs} >= {"parity_backbone", "resnet18-1"}
    assert {c["num_layers"] for c in configs} == {1, 2}


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_matches_reference(path):
    config, weights, expected = load_case(path)
    model = LSTMBaseline(LSTMConfig(**config))
    model.load_state_dict(weights, strict=True)  # the reference's parameter names
    model.eval()
    with torch.no_grad():
        predictions, certainties, synch = model(expected["input"])
        _, _, _, tracking = model(expected["input"], track=True)
    assert synch is None
    torch.testing.assert_close(predictions, expected["predictions"], atol=ATOL, rtol=0)
    torch.testing.assert_close(certainties, expected["certainties"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tracking.hidden_states, expected["hidden_states"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tracking.attention, expected["attention"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(heads=3), "divisible by heads"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(backbone_type="vgg"), "backbone_type must be one of"),
        (dict(out_dims=10), "does not fit prediction_reshaper"),
    ],
)
def test_bad_config_is_one_line(change, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        LSTMConfig(**change)
    assert "\n" not in str(error.value)
