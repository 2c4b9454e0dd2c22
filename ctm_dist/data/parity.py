"""Parity sequences generated on the fly, with the reader's interface (no shards).

A sample is a vector of +-1 of ``sequence_length``; its target at position i is the parity of the
number of -1 among the first i+1 entries (as in the CTM parity task). Sample ``n`` of epoch ``e``
depends only on ``(seed, e, n)`` (a counter-based hash), so the stream is the same for every
world size and resumes exactly (``generated.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .generated import GeneratedLoader, merge_generated_states

STATE_FORMAT = "ctm-dist-parity/1"
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def parity_samples(indices: np.ndarray, sequence_length: int, seed: int, epoch: int):
    """(inputs [n, L] float of +-1, targets [n, L] long) for global sample ``indices``."""
    with np.errstate(over="ignore"):
        base = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) ^ np.uint64(epoch))
        n = _splitmix64(base ^ _splitmix64(indices.astype(np.uint64)))
        bits = _splitmix64(
            n[:, None] + np.arange(sequence_length, dtype=np.uint64)[None, :]
        ) >> np.uint64(63)
    negatives = bits.astype(np.int64)
    inputs = torch.from_numpy(1.0 - 2.0 * negatives.astype(np.float32))
    targets = torch.from_numpy(np.cumsum(negatives, axis=1) % 2)
    return inputs, targets


class ParityLoader(GeneratedLoader):
    """Batches ``dict(input [B, L], target [B, L], valid [B], key)`` of generated parity sequences."""

    state_format, kind = STATE_FORMAT, "parity"

    def __init__(self, sequence_length: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.sequence_length = sequence_length

    def samples(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return parity_samples(indices, self.sequence_length, self.seed, self.epoch)

    def shape_state(self) -> dict[str, Any]:
        return {"sequence_length": self.sequence_length}


merge_parity_states = merge_generated_states
