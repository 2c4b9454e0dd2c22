"""Metric sums: named float64 tensors that combine by addition, the one way every task measures.

Training adds a batch's sums on each rank and all-reduces them (``reduce``) at the same step on
every rank; offline evaluation adds a batch's sums in each Ray worker and adds the workers'
sums together (``merge``). Numbers (accuracies, means) are computed only from the combined sums,
so any split of the data over ranks or workers gives the same report.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MetricSums:
    """Named sums of any fixed shape (scalars kept as [1]) plus the most-certain ticks seen."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.ticks: list[torch.Tensor] = []

    def add(self, name: str, value) -> None:
        value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        if value.dim() == 0:
            value = value.reshape(1)
        if name in self.sums:
            if self.sums[name].shape != value.shape:
                raise ValueError(
                    f"metric sum {name!r}: shape {tuple(value.shape)} does not match "
                    f"{tuple(self.sums[name].shape)}"
                )
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def add_ticks(self, ticks: torch.Tensor) -> None:
        self.ticks.append(ticks.detach().cpu().long().reshape(-1))

    def merge(self, other: MetricSums) -> MetricSums:
        """Add another worker's sums (names missing on one side count as zeros)."""
        for name, value in other.sums.items():
            self.add(name, value)
        self.ticks.extend(other.ticks)
        return self

    def reduce(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """All-reduce the sums and gather the ticks; every rank must call it at the same step."""
        names = sorted(self.sums)
        flat = (
            torch.cat([self.sums[n].reshape(-1) for n in names])
            if names
            else torch.zeros(0, dtype=torch.float64)
        )
        ticks = torch.cat(self.ticks) if self.ticks else torch.zeros(0, dtype=torch.long)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, ticks)
            ticks = torch.cat(gathered)
        out, offset = {}, 0
        for n in names:
            size = self.sums[n].numel()
            out[n] = flat[offset : offset + size].reshape(self.sums[n].shape)
            offset += size
        return out, ticks

    def clear(self) -> None:
        self.sums.clear()
        self.ticks.clear()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sums[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def get(self, name: str, default=None):
        return self.sums.get(name, default)

    @property
    def samples(self) -> int:
        return int(self.sums["samples"][0]) if "samples" in self.sums else 0


class Measure:
    """An offline metric over named sums: ``update`` per batch, ``merge`` over workers, ``summary``.

    ``shape`` names the attributes that two workers' measures must share to be merged.
    """

    shape: tuple[str, ...] = ()

    def __init__(self):
        self.sums = MetricSums()

    @property
    def n(self) -> int:
        return self.sums.samples

    def merge(self, other: Measure) -> Measure:
        mine = [getattr(self, a) for a in self.shape]
        theirs = [getattr(other, a) for a in self.shape]
        if type(other) is not type(self) or mine != theirs:
            raise ValueError(
                f"cannot merge {type(self).__name__} of {dict(zip(self.shape, mine))} with "
                f"{type(other).__name__} of {dict(zip(self.shape, theirs))}"
            )
        self.sums.merge(other.sums)
        return self

    def update(self, predictions, certainties, targets, inputs=None) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        raise NotImplementedError
