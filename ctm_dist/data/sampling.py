"""Epoch plans: which (rank, worker) slot reads which samples of which shard, in which order.

A plan is a pure function of the shard counts, the positions it starts from, (seed, epoch) and the
topology (world size, workers per rank). Shards are shuffled by (seed, epoch) and dealt greedily to
the least-loaded slot; each slot reads its shards in windows of ``window`` shards whose samples are
interleaved in a seeded random order (every shard is still read front to back, so "samples of a
shard consumed" is always a prefix and one number per shard describes the job's position).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardRange:
    name: str
    start: int  # first sample index this plan reads
    stop: int  # one past the last


@dataclass(frozen=True)
class Slot:
    """What one (rank, worker) reads: shard ranges in order, interleaved in windows."""

    slot_id: int
    ranges: tuple[ShardRange, ...]
    window: int

    @property
    def num_samples(self) -> int:
        return sum(r.stop - r.start for r in self.ranges)

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_samples // batch_size)

    def groups(self) -> list[tuple[ShardRange, ...]]:
        w = max(1, self.window)
        return [self.ranges[i : i + w] for i in range(0, len(self.ranges), w)]


def name_hash(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def make_plan(
    counts: dict[str, int],
    base: dict[str, int],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    workers: int,
    shuffle: bool,
    window: int,
) -> list[Slot]:
    """Slots ``rank * workers + w`` for every rank and worker; ``counts`` is in index order."""
    n_slots = world_size * workers
    names = list(counts)
    order = (
        np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(names))
        if shuffle
        else np.arange(len(names))
    )
    loads = [0] * n_slots
    ranges: list[list[ShardRange]] = [[] for _ in range(n_slots)]
    for i in order:
        name = names[int(i)]
        start = min(base.get(name, 0), counts[name])
        if start >= counts[name]:
            continue
        slot = min(range(n_slots), key=lambda s: (loads[s], s))
        ranges[slot].append(ShardRange(name, start, counts[name]))
        loads[slot] += counts[name] - start
    return [Slot(s, tuple(r), window if shuffle else 1) for s, r in enumerate(ranges)]


def group_order(
    group: tuple[ShardRange, ...], *, seed: int, epoch: int, slot_id: int, shuffle: bool
) -> np.ndarray:
    """For each position in the group's stream, the index (into ``group``) of the shard it reads."""
    sizes = [r.stop - r.start for r in group]
    seq = np.repeat(np.arange(len(group)), sizes)
    if shuffle and len(group) > 1:
        key = [seed, epoch, slot_id] + [name_hash(r.name) for r in group] + [r.start for r in group]
        seq = np.random.default_rng(key).permutation(seq)
    return seq


def batches_per_rank(plan: list[Slot], world_size: int, workers: int, batch_size: int) -> list[int]:
    return [
        sum(plan[r * workers + w].num_batches(batch_size) for w in range(workers))
        for r in range(world_size)
    ]
