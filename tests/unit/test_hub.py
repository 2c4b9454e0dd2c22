"""The reference's Hugging Face Hub layout (config.json + model.safetensors) through ``ctm_dist.load``.

``tests/fixtures/hub_ctm_parity/`` was written by the mixin's own ``save_pretrained`` from a
reference CTM built with the reference's constructor arguments, with that model's outputs beside
it (``tests/fixtures/make_hub_layout.py``); the LSTM case is laid out here from the golden weights
and arguments of the reference's LSTM baseline (``tests/golden/generate_baselines.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctm_dist
from ctm_dist.compat import CheckpointError
from ctm_dist.eval.loading import load_model
from ctm_dist.hub import is_hub_config
from ctm_dist.model import CTM, LSTMBaseline

TESTS = Path(__file__).resolve().parents[1]
LAYOUT = TESTS / "fixtures" / "hub_ctm_parity"
EXPECTED = TESTS / "fixtures" / "hub_ctm_parity.expected.safetensors"
LSTM_GOLDEN = TESTS / "golden" / "baselines" / "lstm_parity.safetensors"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_ctm_from_a_hub_directory_gives_the_reference_outputs():
    loaded = load_model(LAYOUT)
    assert loaded.kind == "hub" and isinstance(loaded.model, CTM) and not loaded.model.training
    assert loaded.cfg.prediction_reshaper == [8, 2] and loaded.cfg.in_channels == 3
    want = load_file(str(EXPECTED))
    with torch.no_grad():
        predictions, certainties, synch_out = ctm_dist.load(str(LAYOUT))(want["inputs"])
    torch.testing.assert_close(predictions, want["predictions"], atol=1e-5, rtol=0)
    torch.testing.assert_close(certainties, want["certainties"], atol=1e-5, rtol=0)
    torch.testing.assert_close(synch_out, want["synch_out"], atol=1e-5, rtol=0)


def test_reference_lstm_in_the_hub_layout_is_the_lstm_baseline(tmp_path):
    from safetensors import safe_open

    with safe_open(str(LSTM_GOLDEN), "pt") as f:
        arguments = json.loads(f.metadata()["config"])
    arguments.pop("in_channels")  # ours: the reference's constructor does not take it
    tensors = load_file(str(LSTM_GOLDEN))
    weights = {k.removeprefix("model."): v.float() for k, v in tensors.items() if k[:6] == "model."}
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(arguments))
    model = ctm_dist.load(str(tmp_path))
    assert isinstance(model, LSTMBaseline)
    with torch.no_grad():
        predictions, certainties, _ = model(tensors["input"])
    torch.testing.assert_close(predictions, tensors["predictions"], atol=1e-5, rtol=0)
    torch.testing.assert_close(certainties, tensors["certainties"], atol=1e-5, rtol=0)


def test_arguments_the_model_does_not_take_are_one_line(tmp_path):
    layout = tmp_path / "layout"
    shutil.copytree(LAYOUT, layout)
    arguments = json.loads((layout / "config.json").read_text())
    (layout / "config.json").write_text(json.dumps({**arguments, "n_experts": 4}))
    with pytest.raises(CheckpointError, match=r"\['n_experts'\] that the CTMConfig does not take"):
        ctm_dist.load(str(layout))


def test_a_hub_repository_id_is_fetched_through_huggingface_hub(monkeypatch):
    """Offline (as here) the fetch fails in one line that names the Hub."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, when the library loads
    for source in ("hf://sakana-ai/ctm-parity", "sakana-ai/ctm-parity"):
        with pytest.raises(
            CheckpointError, match="fetching it from the Hugging Face Hub failed"
        ) as e:
            ctm_dist.load(source)
        assert "\n" not in str(e.value)


def test_our_exports_config_is_not_taken_for_constructor_arguments():
    assert is_hub_config(json.loads((LAYOUT / "config.json").read_text()))
    assert not is_hub_config({"format": "ctm-dist-export/1", "model": {}})
