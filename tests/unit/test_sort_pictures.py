"""The sort task's picture: emitted positions per tick, marked right or wrong."""

from __future__ import annotations

import numpy as np
import torch

from ctm_dist.eval.plots import save
from ctm_dist.eval.sort import emissions, sort_order
from ctm_dist.losses import decode_sort


def _staircase(values: torch.Tensor, ticks: int, late: int = 1) -> torch.Tensor:
    """Logits that emit the sorting order one tick after another from tick ``late``, blank elsewhere."""
    n = values.numel()
    logits = torch.zeros(n + 1, ticks)
    logits[n] = 3.0
    for place, position in enumerate(values.argsort().tolist()):
        logits[position, late + place] = 6.0
    return logits


def test_emissions_follow_the_decoder_and_the_figure_counts_right_places(tmp_path):
    torch.manual_seed(0)
    values = torch.randn(7)
    logits = _staircase(values, ticks=10)
    assert [p for _, p in emissions(logits)] == decode_sort(logits[None])[0].tolist()
    assert [t for t, _ in emissions(logits)] == list(range(1, 8))
    fig = sort_order(values, logits, values.argsort())
    assert fig.axes[0].get_title() == "7 emitted over 10 ticks; 7/7 in the right place"
    assert save(fig, tmp_path / "sort.png").stat().st_size > 0

    wrong = logits.clone()
    wrong[:, 1] = 0
    wrong[values.argsort()[3], 1] = 9.0  # one element emitted first, out of its place
    title = sort_order(values, wrong, values.argsort()).axes[0].get_title()
    assert title.endswith("in the right place") and "7/7" not in title
    many = torch.randn(40)  # rows named by rank, not by value, past LABELLED_ROWS
    fig = sort_order(many, _staircase(many, ticks=45))
    assert fig.axes[0].get_title() == "40 emitted over 45 ticks"


def test_make_pictures_draws_the_order_of_a_sort_model(tmp_path):
    from ctm_dist.data.sort import sort_samples
    from ctm_dist.eval.pictures import make_pictures
    from ctm_dist.inference import predict
    from ctm_dist.model import build_model, preset

    torch.manual_seed(0)
    model = build_model(preset("sort-small", sequence_length=5, d_model=16, n_synch_out=8)).eval()
    x, targets = sort_samples(np.arange(3), 5, seed=0, epoch=0)
    written = {p.name for p in make_pictures(model, x, "sort", tmp_path, targets, per_input=1)}
    assert {"order_0.png", "certainty_loss.png", "ticks_used.png"} <= written
    assert "order_1.png" not in written and not any(n.startswith("attention") for n in written)
    # adaptive halting drops finished samples from a context without attention as it goes
    with torch.no_grad():
        predictions, certainties, _ = model(x)
    certainty = certainties[:, 1]  # [B, T]
    threshold = float(certainty[:, 0].max())  # one sample stops at the first tick
    halted = predict(model, x, certainty_threshold=threshold)
    reached = certainty >= threshold
    want = torch.where(reached.any(1), reached.float().argmax(1), certainty.size(1) - 1)
    assert halted.tick.tolist() == want.tolist() and len(set(want.tolist())) > 1
    for i, t in enumerate(want.tolist()):
        torch.testing.assert_close(halted.predictions[i], predictions[i, :, t])
