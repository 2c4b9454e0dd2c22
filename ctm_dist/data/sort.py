"""Sorting data generated on the fly: N standard-normal numbers and the order that sorts them.

As the reference's ``SortDataset``: the input is ``N`` float32 draws from N(0, 1) (N = 30 by
default), the target is ``argsort(input)``, the positions of the values from the smallest to the
largest. Sample ``n`` of epoch ``e`` is drawn by NumPy's generator seeded with ``(seed, e, n)``,
so it is the same whichever rank draws it and after a resume (``generated.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .generated import GeneratedLoader

STATE_FORMAT = "ctm-dist-sort/1"
DEFAULT_LENGTH = 30


def sort_samples(
    indices: np.ndarray, length: int, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, length] float32, targets [n, length] long) for global sample ``indices``."""
    values = np.stack(
        [
            np.random.default_rng((seed, epoch, int(i))).standard_normal(length, dtype=np.float32)
            for i in indices
        ]
    )
    order = np.argsort(values, axis=1, kind="stable")
    return torch.from_numpy(values), torch.from_numpy(order.astype(np.int64))


class SortLoader(GeneratedLoader):
    """Batches ``dict(input [B, N], target [B, N], valid [B], key)`` of numbers to sort."""

    state_format, kind = STATE_FORMAT, "sort"

    def __init__(self, length: int = DEFAULT_LENGTH, **kwargs: Any):
        if length < 2:
            raise ValueError(f"sorting needs at least 2 numbers, got {length}")
        super().__init__(**kwargs)
        self.length = length

    def samples(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return sort_samples(indices, self.length, self.seed, self.epoch)

    def shape_state(self) -> dict[str, Any]:
        return {"sequence_length": self.length}
