"""The sort task's picture: emitted positions per tick, marked right or wrong."""

from __future__ import annotations

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
