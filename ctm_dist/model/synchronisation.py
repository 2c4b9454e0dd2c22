"""Neuron selection and recurrent synchronisation.

Synchronisation between neurons i and j is the decayed dot product of their post-activation
histories. Because it is linear in the history it is kept as two running sums per pair::

    alpha_t = r * alpha_{t-1} + z_i(t) * z_j(t)
    beta_t  = r * beta_{t-1}  + 1
    sync_t  = alpha_t / sqrt(beta_t)          with r = exp(-decay), decay clamped to [0, 15]

Which pairs are tracked depends on the selection type:

* ``first-last``: all pairs (upper triangle) among the first ``n`` neurons (out) or last ``n`` (action).
* ``random``: all pairs (upper triangle) between ``n`` random "left" and ``n`` random "right" neurons.
* ``random-pairing``: ``n`` pairs (left[k], right[k]); the first ``n_random_pairing_self`` pair a neuron
  with itself.

Random indices are drawn with replacement from NumPy's global generator, action before out, so a
given ``np.random.seed`` yields the reference's index buffers.
"""

from __future__ import annotations

import numpy as np
import torch


def select_neurons(
    select_type: str, synch_type: str, d_model: int, n_synch: int, n_self: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right neuron indices (int64) for one synchronisation representation."""
    if select_type == "first-last":
        first = 0 if synch_type == "out" else d_model - n_synch
        idx = torch.arange(first, first + n_synch)
        return idx, idx.clone()
    if select_type == "random":
        left = torch.from_numpy(np.random.choice(d_model, size=n_synch))
        right = torch.from_numpy(np.random.choice(d_model, size=n_synch))
        return left, right
    if select_type == "random-pairing":
        left = torch.from_numpy(np.random.choice(d_model, size=n_synch))
        others = torch.from_numpy(np.random.choice(d_model, size=n_synch - n_self))
        return left, torch.cat((left[:n_self], others))
    raise ValueError(f"unknown neuron_select_type {select_type!r}")


def upper_triangle(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column positions of the upper triangle (diagonal included) of an n x n matrix."""
    rows, cols = torch.triu_indices(n, n)
    return rows, cols


def pair_indices(
    select_type: str,
    left: torch.Tensor,
    right: torch.Tensor,
    tri_rows: torch.Tensor,
    tri_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron index of each side of every tracked pair."""
    if select_type == "random-pairing":
        return left, right
    return left[tri_rows], right[tri_cols]


def update_synchronisation(
    activated: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    r: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One recurrent step; returns (synchronisation, alpha, beta)."""
    product = activated[:, left] * activated[:, right]
    alpha = r * alpha + product
    beta = r * beta + 1
    return alpha / torch.sqrt(beta), alpha, beta
