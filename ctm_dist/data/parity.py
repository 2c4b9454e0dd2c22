"""Parity sequences generated on the fly, with the reader's interface (no shards).

A sample is a vector of +-1 of ``sequence_length``; its target at position i is the parity of the
number of -1 among the first i+1 entries (as in the CTM parity task). Sample ``n`` of epoch ``e``
depends only on ``(seed, e, n)`` (a counter-based hash), so the stream is the same for every
world size: step ``s`` of an ``N``-rank job gives rank ``r`` the samples
``consumed + s*N*B + r*B ... + B``, and a resumed job with another world size continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

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


class ParityLoader:
    """Batches ``dict(input [B, L], target [B, L], valid [B], key)`` of generated parity sequences."""

    def __init__(
        self,
        sequence_length: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        samples_per_epoch: int = 100_000,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.sequence_length, self.batch_size = sequence_length, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.samples_per_epoch = samples_per_epoch
        self.stats: dict[str, int] = {"samples": 0, "padding": 0}
        self.epoch, self._consumed = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._consumed = epoch, 0

    def __len__(self) -> int:
        left = self.samples_per_epoch - self._consumed
        left = left if left > 0 else self.samples_per_epoch
        return -(-left // (self.batch_size * self.world_size))

    @property
    def num_samples(self) -> int:
        return self.samples_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.batch_size * self.world_size
        if self._consumed >= self.samples_per_epoch:  # resumed after an epoch's last batch
            self.epoch, self._consumed = self.epoch + 1, 0
        while self._consumed < self.samples_per_epoch:
            first = self._consumed + self.rank * self.batch_size
            idx = np.arange(first, first + self.batch_size)
            x, y = parity_samples(idx, self.sequence_length, self.seed, self.epoch)
            valid = torch.from_numpy(idx < self.samples_per_epoch)
            self._consumed += step
            self.stats["samples"] += int(valid.sum())
            self.stats["padding"] += int((~valid).sum())
            yield {
                "input": x,
                "target": y,
                "valid": valid,
                "key": [f"{self.epoch}/{i}" for i in idx.tolist()],
            }
        self.epoch, self._consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self._consumed,
            "samples_per_epoch": self.samples_per_epoch,
            "sequence_length": self.sequence_length,
        }

    def global_state_dict(self) -> dict[str, Any]:
        return self.state_dict()  # identical on every rank

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a parity loader state of format {STATE_FORMAT!r}")
        if state["seed"] != self.seed or state["sequence_length"] != self.sequence_length:
            raise ValueError("parity loader state is for another seed or sequence length")
        self.epoch, self._consumed = int(state["epoch"]), int(state["consumed"])


def merge_parity_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    if any(
        s["consumed"] != states[0]["consumed"] or s["epoch"] != states[0]["epoch"] for s in states
    ):
        raise ValueError("parity loader states disagree: take every rank's state at the same step")
    return dict(states[0])
