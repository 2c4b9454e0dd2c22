"""Batches of generated samples with the reader's interface: no shards, resumable, split by rank.

A task whose samples are made on the fly (parity, sorting, Q&A MNIST) subclasses
:class:`GeneratedLoader` and says how to make samples from their global indices (or, where a
whole batch shares a draw, how to make this rank's batch: ``batch_at``). Sample ``n`` of epoch ``e`` depends only
on ``(seed, e, n)``, so the stream is the same for every world size: step ``s`` of an ``N``-rank
job gives rank ``r`` the samples ``consumed + s*N*B + r*B ... + B``, and a job resumed with
another world size continues exactly where the last one stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class GeneratedLoader:
    """Batches ``dict(input, target, valid [B], key)``; subclasses define ``samples`` and the state's shape."""

    state_format = ""  # "ctm-dist-<task>/<version>"
    kind = ""  # the task's name, for error messages

    def __init__(
        self,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        samples_per_epoch: int = 100_000,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.samples_per_epoch = samples_per_epoch
        self.stats: dict[str, int] = {"samples": 0, "padding": 0}
        self.epoch, self._consumed = 0, 0

    # --- what a subclass says
    def samples(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the global sample ``indices`` of ``self.epoch``."""
        raise NotImplementedError

    def shape_state(self) -> dict[str, Any]:
        """The fields that decide what a sample is (a state only loads into an equal loader)."""
        return {}

    def batch_at(self, consumed: int) -> dict[str, Any]:
        """This rank's batch once ``consumed`` samples of the epoch are consumed (all ranks)."""
        first = consumed + self.rank * self.batch_size
        idx = np.arange(first, first + self.batch_size)
        x, y = self.samples(idx)
        return {
            "input": x,
            "target": y,
            "valid": torch.from_numpy(idx < self.samples_per_epoch),
            "key": [f"{self.epoch}/{i}" for i in idx.tolist()],
        }

    # --- iteration
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
            out = self.batch_at(self._consumed)
            self._consumed += step
            self.stats["samples"] += int(out["valid"].sum())
            self.stats["padding"] += int((~out["valid"]).sum())
            yield out
        self.epoch, self._consumed = self.epoch + 1, 0

    # --- resuming
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": self.state_format,
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self._consumed,
            "samples_per_epoch": self.samples_per_epoch,
            **self.shape_state(),
        }

    def global_state_dict(self) -> dict[str, Any]:
        return self.state_dict()  # identical on every rank

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != self.state_format:
            raise ValueError(f"not a {self.kind} loader state of format {self.state_format!r}")
        shape = self.shape_state()
        if state["seed"] != self.seed or any(state.get(k) != v for k, v in shape.items()):
            names = " or ".join(["seed", *(k.replace("_", " ") for k in shape)])
            raise ValueError(f"{self.kind} loader state is for another {names}")
        self.epoch, self._consumed = int(state["epoch"]), int(state["consumed"])


def merge_generated_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The one state of all ranks (they must have been taken at the same step)."""
    if any(
        s["consumed"] != states[0]["consumed"] or s["epoch"] != states[0]["epoch"] for s in states
    ):
        raise ValueError("loader states disagree: take every rank's state at the same step")
    return dict(states[0])
