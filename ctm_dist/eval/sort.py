"""Pictures of the sort task: which input position the CTM emits at every tick.

``sort_order`` draws, for one input, the probability of every class at every tick: one row per
input position, ordered by the rank of its value (smallest at the bottom), and the blank on top.
A model that sorts climbs a staircase from the bottom-left to the top-right, one step per
emitted element; the ticks where the decoder emits a position are marked, green where the
position is the right one for its place in the order, red where it is not.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .plots import _np, tick_xaxis  # noqa: E402

LABELLED_ROWS = 16  # name every row (position and value) up to this many numbers


def emissions(predictions: torch.Tensor) -> list[tuple[int, int]]:
    """(tick, position) of every element the greedy decoder emits, for predictions ``[C, T]``.

    The same rule as ``ctm_dist.losses.decode_sort``: the most likely class at each tick, unless
    it is the blank (the last class) or the last position emitted.
    """
    blank = predictions.shape[0] - 1
    out, last = [], -1
    for t, symbol in enumerate(predictions.argmax(0).tolist()):
        if symbol != blank and symbol != last:
            out.append((t, symbol))
            last = symbol
    return out


def sort_order(values, predictions, target=None):
    """Figure of one input: ``values`` [N], ``predictions`` [N + 1, T] (logits), ``target`` [N]."""
    values = _np(values)
    logits = torch.as_tensor(_np(predictions))
    n, ticks = values.shape[0], logits.shape[1]
    ranks = np.argsort(values, kind="stable")  # positions from the smallest value up
    row_of = np.empty(n + 1, dtype=int)
    row_of[ranks] = np.arange(n)
    row_of[n] = n  # the blank on top
    probs = torch.softmax(logits.float(), dim=0).numpy()
    image = np.empty_like(probs)
    image[row_of] = probs

    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * ticks + 2), max(3.5, 0.25 * (n + 1) + 1.5)))
    shown = ax.imshow(
        image,
        origin="lower",
        aspect="auto",
        cmap="viridis",
        vmin=0,
        vmax=1,
        extent=(0.5, ticks + 0.5, -0.5, n + 0.5),
    )
    fig.colorbar(shown, ax=ax, label="probability")
    emitted = emissions(logits)
    right = 0
    for place, (t, position) in enumerate(emitted):
        ok = target is not None and place < n and int(target[place]) == position
        right += ok
        colour = "limegreen" if ok or target is None else "red"
        ax.plot(t + 1, row_of[position], "o", ms=5, mfc="none", mec=colour, mew=1.5)
    if n <= LABELLED_ROWS:
        labels = [f"x[{p}]={values[p]:.2f}" for p in ranks] + ["blank"]
    else:
        labels = [f"rank {r + 1}" if r % 5 == 0 else "" for r in range(n)] + ["blank"]
    ax.set_yticks(np.arange(n + 1), labels, fontsize=7)
    ax.set_ylabel("input, by value")
    tick_xaxis(ax)
    title = f"{len(emitted)} emitted over {ticks} ticks"
    if target is not None:
        title += f"; {right}/{n} in the right place"
    ax.set_title(title)
    return fig
