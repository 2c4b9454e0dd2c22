"""Adaptive inference: per-sample early stopping against the full forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctm_dist.inference import predict
from ctm_dist.model import CTM, CTMConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_full():
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = CTMConfig(
        iterations=10,
        d_model=32,
        d_input=16,
        heads=2,
        n_synch_out=8,
        n_synch_action=6,
        synapse_depth=1,
        memory_length=4,
        memory_hidden_dims=3,
        backbone_type="none",
        positional_embedding_type="none",
        in_channels=5,
        out_dims=3,
    )
    model = CTM(cfg).eval()
    with torch.no_grad():  # certainty that rises then falls, differently per sample
        model.output_projector[0].weight.mul_(300)
        model.start_activated_state.zero_()
        model.decay_params_out.fill_(0.3)
    x = torch.randn(12, 5, 6)
    with torch.no_grad():
        predictions, certainties, _ = model(x)
    return model, x, predictions, certainties


def diverse_threshold(certainties: torch.Tensor, max_ticks: int) -> float:
    """A threshold at which samples stop at several different ticks."""
    candidates = certainties[:, 1, :max_ticks].flatten().sort().values
    for value in candidates[len(candidates) // 4 :]:
        if expected_ticks(certainties, value.item(), max_ticks).unique().numel() >= 3:
            return value.item()
    raise AssertionError("no threshold spreads the stopping ticks")


def expected_ticks(certainties: torch.Tensor, threshold: float, max_ticks: int) -> torch.Tensor:
    reached = certainties[:, 1, :max_ticks] >= threshold
    first = reached.float().argmax(-1)
    return torch.where(reached.any(-1), first, torch.full_like(first, max_ticks - 1))


@pytest.mark.parametrize("max_ticks", [None, 6])
def test_stops_each_sample_at_its_first_certain_tick(model_and_full, max_ticks):
    model, x, full_predictions, certainties = model_and_full
    limit = max_ticks or model.cfg.iterations
    threshold = diverse_threshold(certainties, limit)
    ticks = expected_ticks(certainties, threshold, limit)

    result = predict(model, x, threshold, max_ticks=max_ticks)
    assert torch.equal(result.tick, ticks)
    rows = torch.arange(x.size(0))
    torch.testing.assert_close(
        result.predictions, full_predictions[rows, :, ticks], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(result.certainty, certainties[rows, 1, ticks], atol=1e-5, rtol=1e-5)


def test_finished_samples_leave_the_batch(model_and_full):
    model, x, _, certainties = model_and_full
    threshold = diverse_threshold(certainties, model.cfg.iterations)
    ticks = expected_ticks(certainties, threshold, model.cfg.iterations)
    batch_sizes = []
    handle = model.synapses.register_forward_hook(
        lambda m, args, out: batch_sizes.append(args[0].size(0))
    )
    try:
        predict(model, x, threshold)
    finally:
        handle.remove()
    still_running = [int((ticks >= t).sum()) for t in range(int(ticks.max()) + 1)]
    assert (
        batch_sizes == still_running
    )  # shrinking batch, and no tick after the last sample is done


def test_threshold_zero_stops_after_one_tick_and_bad_max_ticks(model_and_full):
    model, x, full_predictions, _ = model_and_full
    result = predict(model, x, certainty_threshold=0.0)
    assert (result.tick == 0).all()
    torch.testing.assert_close(result.predictions, full_predictions[:, :, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_ticks"):
        predict(model, x, 0.5, max_ticks=0)
