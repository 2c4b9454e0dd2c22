"""The streaming shard reader: ``ShardLoader`` yields padded, masked batches from any Location.

* Shards are dealt to (rank, dataloader worker) slots by ``sampling.make_plan``; every sample of an
  epoch is read by exactly one slot. Each slot's batches hold exactly ``batch_size`` entries; the
  tail batch and entries that could not be decoded are masked (``valid`` False), and ranks with fewer
  batches append fully masked ones, so every rank yields the same number of batches per epoch.
* The position is kept as the trainer consumed it (updated when a batch is handed out, not when a
  worker prefetches it): epoch + samples consumed per shard. ``state_dict()`` of all ranks merge
  (``merge_states``) into a world-size independent state; loading it with the same topology replays
  the rest of the epoch in the same order, with another one it covers the rest exactly once.
* ``global_order=True``: the order of an epoch is a function of (seed, epoch) alone; global batch
  ``k`` (``batch_size * world_size`` entries) holds the same samples for every world size, each
  rank taking its slice of it, and a resume at the same global batch continues it exactly with
  any world size. The cost: every rank reads every shard (decoding only its slice), so storage
  traffic grows with the world size.
* Bad samples (including images over the task's pixel limit, ``decode.MAX_PIXELS``) are masked
  and counted in ``stats`` (or raise naming shard and key with ``strict=True``); a missing index/shard/bucket or refused credentials fail at construction.
* The index is checked, not believed: a count that the tar's size cannot hold (every tar member
  takes at least ``TAR_BLOCK`` bytes) fails at construction; a tar that ends before its count is
  reached, or holds samples past it, is a counted ``index_mismatch`` (the missing entries are
  masked, the unlisted ones are counted as ``skipped_unindexed``) and is logged with its shard, or
  raises with ``strict=True``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctm_dist.storage import Location, StorageError, StorageNotFound, is_transient, translate_error

from .decode import BadSample, Decoder, make_decoder
from .index import ShardIndex, read_index
from .parity import STATE_FORMAT as PARITY_STATE_FORMAT
from .parity import merge_parity_states
from .sampling import Slot, batches_per_rank, group_order, make_plan, name_hash

log = logging.getLogger(__name__)
STATE_FORMAT = "ctm-dist-reader/1"
STREAM_BLOCK = 4 * 2**20
MAX_LOGGED_SKIPS = 20
TAR_BLOCK = 512  # a tar member is a 512-byte header plus its data padded to 512 bytes


class DataError(RuntimeError):
    """A bad sample or shard in strict mode; names the shard and key."""


# ---------------------------------------------------------------- one shard, read front to back
class ShardStream:
    """Samples of one tar, in order; transient errors reopen the object and skip what was read."""

    def __init__(self, location: Location, name: str):
        self.location, self.name = location, name
        self.read = 0  # samples handed out so far
        self.last_key = None
        self._file = None
        self._it: Iterator[dict] | None = None

    def _open(self) -> None:
        import webdataset.tariterators as wt

        self.close()
        kwargs = {"block_size": STREAM_BLOCK} if self.location.protocol != "file" else {}
        self._file = self.location.open(self.name, "rb", **kwargs)

        def files():
            for f in wt.tar_file_iterator(self._file):
                f["__url__"] = self.name
                yield f

        self._it = wt.group_by_keys(files())
        for _ in range(self.read):
            next(self._it)

    def next(self) -> dict | None:
        """The next sample, or None at the end of the tar."""
        start = time.monotonic()
        while True:
            try:
                if self._it is None:
                    self._open()
                sample = next(self._it)
                self.read += 1
                self.last_key = sample.get("__key__")
                return sample
            except StopIteration:
                return None
            except StorageError:
                raise
            except Exception as e:
                if is_transient(e) and time.monotonic() - start < self.location.retry_deadline:
                    log.warning(
                        "%s: transient read error (%s), reopening", self.url, type(e).__name__
                    )
                    self._it = None
                    time.sleep(0.5)
                    continue
                if is_transient(e):
                    raise translate_error(e, self.url) from None
                raise DataError(
                    f"{self.url}: unreadable tar after key {self.last_key!r}: "
                    f"{type(e).__name__}: {e}"
                ) from None

    def skip(self, n: int) -> None:
        for _ in range(n):
            if self.next() is None:
                return

    @property
    def url(self) -> str:
        return self.location.name_url(self.name)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
        self._file, self._it = None, None


# ---------------------------------------------------------------- what a worker runs
class _SlotDataset(IterableDataset):
    """The slots of one rank; dataloader worker ``w`` reads slot ``(w + offset) % workers``."""

    def __init__(
        self,
        location: Location,
        slots: list[Slot],
        positions: dict[str, int],
        offset: int,
        decoder: Decoder,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        strict: bool,
        batch_size: int,
    ):
        self.location, self.slots, self.positions, self.offset = location, slots, positions, offset
        self.decoder, self.seed, self.epoch, self.shuffle = decoder, seed, epoch, shuffle
        self.strict, self.batch_size = strict, batch_size

    def __iter__(self):
        info = get_worker_info()
        local = ((info.id if info else 0) + self.offset) % len(self.slots)
        # a worker process builds its own filesystem client; in-process reading reuses the loader's
        loc = Location.from_dict(self.location.to_dict()) if info else self.location
        return self._batches(self.slots[local], local, loc)

    def _entries(self, slot: Slot, loc: Location):
        """(shard, index, sample or None, reason, notes) for every sample the slot has left to read.

        ``notes`` lists ``(stat, count, message)`` of index mismatches found at that sample.
        """
        for group in slot.groups():
            order = group_order(
                group, seed=self.seed, epoch=self.epoch, slot_id=slot.slot_id, shuffle=self.shuffle
            )
            done = [
                min(max(self.positions.get(r.name, 0), r.start), r.stop) - r.start for r in group
            ]
            consumed = sum(done)
            if consumed >= len(order):
                continue
            if np.bincount(order[:consumed], minlength=len(group)).tolist() != done:
                raise RuntimeError(
                    f"reader state does not match the epoch plan of slot {slot.slot_id} "
                    "(was it saved with another seed or shard index?)"
                )
            nxt = [r.start + d for r, d in zip(group, done)]
            streams: dict[int, ShardStream | None] = {}
            broken: dict[int, str] = {}
            try:
                for j in order[consumed:].tolist():
                    r, idx = group[j], nxt[j]
                    nxt[j] += 1
                    if j in broken:
                        yield r.name, idx, None, broken[j], ()
                        continue
                    notes: list = []
                    try:
                        if j not in streams:
                            streams[j] = ShardStream(loc, r.name)
                            streams[j].skip(idx)
                        sample = streams[j].next()
                        if sample is None:
                            broken[j] = "missing"
                            notes.append(
                                (
                                    "index_mismatch",
                                    1,
                                    (
                                        f"{loc.name_url(r.name)}: the tar ends after {streams[j].read} "
                                        f"samples but the shard index lists {r.stop}; the missing "
                                        f"{r.stop - idx} are skipped"
                                    ),
                                )
                            )
                        elif idx + 1 == r.stop:
                            extra = self._unlisted(streams[j])
                            if extra:
                                notes.append(
                                    (
                                        "index_mismatch",
                                        1,
                                        (
                                            f"{loc.name_url(r.name)}: the tar holds {extra} sample(s) "
                                            f"past the {r.stop} its shard index lists; they are not read"
                                        ),
                                    )
                                )
                                notes.append(("skipped", extra, ""))
                                notes.append(("skipped_unindexed", extra, ""))
                    except DataError as e:
                        if self.strict:
                            raise
                        broken[j] = "unreadable_tar"
                        log.warning("%s (the rest of this shard is skipped)", e)
                        yield r.name, idx, None, "unreadable_tar", ()
                        continue
                    yield r.name, idx, sample, None if sample is not None else "missing", notes
            finally:
                for s in streams.values():
                    s.close()

    def _unlisted(self, stream: ShardStream) -> int:
        """Samples left in ``stream`` after the last one the index lists (read, not decoded)."""
        extra = 0
        try:
            while stream.next() is not None:
                extra += 1
        except DataError:
            pass  # a broken tail past the listed samples: what could be read is counted
        return extra

    def _batches(self, slot: Slot, local: int, loc: Location):
        batch: list = []
        positions: dict[str, int] = {}
        stats: Counter = Counter()
        skips: list[str] = []
        template = self.decoder.blank()
        for name, idx, sample, reason, notes in self._entries(slot, loc):
            for stat, count, msg in notes:
                stats[stat] += count
                if msg:
                    if self.strict:
                        raise DataError(msg)
                    skips.append(msg)
            key = sample.get("__key__", "") if sample is not None else ""
            item = None
            if sample is not None:
                rng = np.random.default_rng([self.seed, self.epoch, name_hash(name), idx])
                try:
                    item = self.decoder(sample, rng)
                    template = item
                except BadSample as e:
                    reason = e.reason
                    msg = f"{loc.name_url(name)} key {key!r}: {e}"
                    if self.strict:
                        raise DataError(msg) from None
                    skips.append(msg)
            elif self.strict:
                raise DataError(
                    f"{loc.name_url(name)}: sample {idx} is missing (the tar holds fewer "
                    "samples than its index says)"
                )
            if item is None:
                stats["skipped"] += 1
                stats[f"skipped_{reason}"] += 1
            else:
                stats["samples"] += 1
            batch.append((key, item))
            positions[name] = idx + 1
            if len(batch) == self.batch_size:
                yield self._collate(batch, template, local, positions, stats, skips)
                batch, positions, stats, skips = [], {}, Counter(), []
        if batch:
            yield self._collate(batch, template, local, positions, stats, skips)

    def _collate(self, batch, template, local, positions, stats, skips) -> dict[str, Any]:
        if template is None:
            raise DataError(
                "no sample of this worker's shards could be decoded, so a masked batch "
                "has no shape; check the shard set"
            )
        blank_x, blank_y = torch.zeros_like(template[0]), torch.zeros_like(template[1])
        pad = self.batch_size - len(batch)
        items = [it if it is not None else (blank_x, blank_y) for _k, it in batch] + [
            (blank_x, blank_y)
        ] * pad
        valid = [it is not None for _k, it in batch] + [False] * pad
        if pad:
            stats["padding"] += pad
        return {
            "input": torch.stack([x for x, _ in items]),
            "target": torch.stack([y for _, y in items]),
            "valid": torch.tensor(valid, dtype=torch.bool),
            "key": [k for k, _ in batch] + [""] * pad,
            "_slot": local,
            "_positions": dict(positions),
            "_stats": dict(stats),
            "_skips": list(skips),
        }


class _GlobalSliceDataset(_SlotDataset):
    """``global_order`` mode: one stream per epoch for the whole job, cut into global batches of
    ``batch_size * world_size``; this rank takes entries ``[rank * batch_size, (rank + 1) * batch_size)``
    of each. Every rank (and dataloader worker) reads the whole stream and decodes only its slice;
    dataloader worker ``w`` yields global batches ``w, w + workers, ...`` counted from where this
    iteration starts, which is the order the DataLoader hands them out in."""

    def __init__(
        self,
        location: Location,
        slot: Slot,
        positions: dict[str, int],
        decoder: Decoder,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        strict: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
    ):
        super().__init__(
            location,
            [slot],
            positions,
            0,
            decoder,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            strict=strict,
            batch_size=batch_size,
        )
        self.rank, self.world_size, self.workers = rank, world_size, workers

    def __iter__(self):
        info = get_worker_info()
        loc = Location.from_dict(self.location.to_dict()) if info else self.location
        return self._slices(self.slots[0], info.id if info else 0, loc)

    def _slices(self, slot: Slot, worker: int, loc: Location):
        global_batch = self.batch_size * self.world_size
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        batch: list = []
        positions: dict[str, int] = {}
        stats: Counter = Counter()
        skips: list[str] = []
        template = self.decoder.blank()
        k = p = 0  # global batch (counted from this iteration's start) and the entry's place in it
        for name, idx, sample, reason, notes in self._entries(slot, loc):
            ours = k % self.workers == worker
            for stat, count, msg in notes:
                if msg and self.strict:
                    raise DataError(msg)
                if ours and self.rank == 0:  # every rank reads the same stream: one of them reports
                    stats[stat] += count
                    if msg:
                        skips.append(msg)
            positions[name] = idx + 1
            if ours and lo <= p < hi:
                item, reason = self._decode(loc, name, idx, sample, reason, skips)
                template = item if item is not None else template
                stats["samples" if item is not None else "skipped"] += 1
                if item is None:
                    stats[f"skipped_{reason}"] += 1
                batch.append((sample.get("__key__", "") if sample is not None else "", item))
            p += 1
            if p == global_batch:
                if ours:
                    yield self._collate(batch, template, 0, positions, stats, skips)
                batch, positions, stats, skips = [], {}, Counter(), []
                k, p = k + 1, 0
        if p and k % self.workers == worker and (batch or template is not None):
            yield self._collate(batch, template, 0, positions, stats, skips)

    def _decode(self, loc: Location, name: str, idx: int, sample, reason, skips: list[str]):
        """(decoded item or None, reason it is None) for one entry of this rank's slice."""
        if sample is None:
            if self.strict:
                raise DataError(
                    f"{loc.name_url(name)}: sample {idx} is missing (the tar holds fewer "
                    "samples than its index says)"
                )
            return None, reason
        rng = np.random.default_rng([self.seed, self.epoch, name_hash(name), idx])
        try:
            return self.decoder(sample, rng), None
        except BadSample as e:
            msg = f"{loc.name_url(name)} key {sample.get('__key__', '')!r}: {e}"
            if self.strict:
                raise DataError(msg) from None
            skips.append(msg)
            return None, e.reason


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------- the loader
class ShardLoader:
    """Batches ``dict(input, target, valid, key)`` of one split of a shard set, for one rank.

    ``len(loader)`` is the number of batches the next iteration yields (equal on every rank).
    Iterating to the end finishes the epoch and moves to the next; ``set_epoch(e)`` with another
    epoch starts that epoch from its beginning (with the current one it keeps the position).
    ``decoder_factory(train, meta)``, when it returns a decoder, replaces the one ``make_decoder``
    picks for the task's shard format (a task's own format; ``image_size``, ``route_length`` and
    ``max_pixels`` then do not apply).
    """

    def __init__(
        self,
        location: Location | str,
        split: str,
        task: str | None = None,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        train: bool = True,
        strict: bool = False,
        image_size: int | None = None,
        route_length: int | None = None,
        max_pixels: int | None = None,
        shuffle: bool | None = None,
        window: int = 4,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        multiprocessing_context=None,
        global_order: bool = False,
        decoder_factory: Callable[[bool, dict], Decoder | None] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.location = Location.parse(location)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train, self.strict = train, strict
        self.shuffle = train if shuffle is None else shuffle
        self.window, self.prefetch_factor = window, prefetch_factor
        self.multiprocessing_context, self.pin_memory = multiprocessing_context, pin_memory
        self.global_order = global_order
        self.location.check()
        self.index: ShardIndex = read_index(self.location, split)
        self.task = task or self.index.task
        self._check_shards()
        own = decoder_factory(train, self.index.meta) if decoder_factory else None
        self.decoder = own or make_decoder(
            self.task,
            train,
            self.index.meta,
            image_size=image_size,
            route_length=route_length,
            max_pixels=max_pixels,
        )
        self.counts = {s.name: s.samples for s in self.index.shards}
        self.stats: Counter = Counter()
        self.skip_log: list[str] = []
        self._template = None
        self._start_epoch(0)

    # ------------------------------------------------------------ epochs and plans
    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._positions: dict[str, int] = {}
        self._base: dict[str, int] = {}
        self._batches = 0
        self._next_slot = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start_epoch(epoch)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _make_plan(self, base: dict[str, int], epoch: int) -> list[Slot]:
        """The epoch plan; with ``global_order`` one slot for the whole job, whatever its topology."""
        world, workers = (1, 1) if self.global_order else (self.world_size, self.workers)
        return make_plan(
            self.counts,
            base,
            seed=self.seed,
            epoch=epoch,
            world_size=world,
            workers=workers,
            shuffle=self.shuffle,
            window=self.window,
        )

    def _plan(self) -> list[Slot]:
        key = (self.epoch, tuple(sorted(self._base.items())))
        if getattr(self, "_plan_cache", (None,))[0] != key:
            self._plan_cache = (key, self._make_plan(self._base, self.epoch))
        return self._plan_cache[1]

    def _total_batches(self, plan: list[Slot]) -> int:
        if self.global_order:
            return plan[0].num_batches(self.global_batch)
        return max(batches_per_rank(plan, self.world_size, self.workers, self.batch_size))

    def __len__(self) -> int:
        left = self._total_batches(self._plan()) - self._batches
        if left <= 0:  # the epoch is done: iterating starts the next one
            return self._total_batches(self._make_plan({}, self.epoch + 1))
        return left

    @property
    def num_samples(self) -> int:
        """Samples of the split (one epoch over all ranks)."""
        return self.index.num_samples

    def _check_shards(self) -> None:
        """Every listed shard exists and is large enough for the samples the index gives it."""
        try:
            sizes = self._object_sizes()
        except StorageNotFound:
            sizes = {}
        missing = [s.name for s in self.index.shards if s.name not in sizes]
        if missing:
            raise StorageNotFound(
                f"{self.location.url}: {len(missing)} shard(s) of split {self.split!r} "
                f"are missing, e.g. {', '.join(missing[:3])}"
            )
        for s in self.index.shards:
            most = sizes[s.name] // TAR_BLOCK
            if s.samples > most:
                raise DataError(
                    f"{self.location.name_url(s.name)}: the shard index of split {self.split!r} "
                    f"lists {s.samples} samples, but the tar's {sizes[s.name]} bytes hold at most "
                    f"{most}; the index is wrong, write the shard set again"
                )

    def _object_sizes(self) -> dict[str, int]:
        loc = self.location
        extra = {"refresh": True} if loc.protocol != "file" else {}
        entries = loc.call(lambda: loc.fs.ls(loc.join(""), detail=True, **extra), "")
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") != "directory"
        }

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._plan()
        total = self._total_batches(plan)
        if self._batches >= total:  # resumed right after an epoch's last batch: go on with the next
            self._start_epoch(self.epoch + 1)
            plan = self._plan()
            total = self._total_batches(plan)
        if self.global_order:
            dataset = _GlobalSliceDataset(
                self.location,
                plan[0],
                dict(self._positions),
                self.decoder,
                seed=self.seed,
                epoch=self.epoch,
                shuffle=self.shuffle,
                strict=self.strict,
                batch_size=self.batch_size,
                rank=self.rank,
                world_size=self.world_size,
                workers=self.workers,
            )
        else:
            mine = plan[self.rank * self.workers : (self.rank + 1) * self.workers]
            dataset = _SlotDataset(
                self.location,
                mine,
                dict(self._positions),
                self._next_slot,
                self.decoder,
                seed=self.seed,
                epoch=self.epoch,
                shuffle=self.shuffle,
                strict=self.strict,
                batch_size=self.batch_size,
            )
        if self._batches < total:
            if self.num_workers > 0:
                source = DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    worker_init_fn=_worker_init,
                    prefetch_factor=self.prefetch_factor,
                    pin_memory=self.pin_memory,
                    multiprocessing_context=self.multiprocessing_context,
                )
            else:
                source = dataset
            for raw in source:
                for name, pos in raw.pop("_positions").items():
                    self._positions[name] = max(self._positions.get(name, 0), pos)
                self.stats.update(raw.pop("_stats"))
                for msg in raw.pop("_skips"):
                    if len(self.skip_log) < MAX_LOGGED_SKIPS:
                        self.skip_log.append(msg)
                        log.warning("skipped sample: %s", msg)
                self._next_slot = (
                    (raw.pop("_slot") + 1) % self.workers if not self.global_order else 0
                )
                self._batches += 1
                self._template = raw
                yield raw
        while self._batches < total:  # this rank ran out: masked batches keep ranks in step
            pad = self._padding_batch()
            self.stats["padding"] += self.batch_size
            self._batches += 1
            yield pad
        self._start_epoch(self.epoch + 1)

    def _padding_batch(self) -> dict[str, Any]:
        if self._template is None:
            blank = self.decoder.blank() or self._probe()
            x, y = blank
            self._template = {
                "input": x.expand(self.batch_size, *x.shape),
                "target": y.expand(self.batch_size, *y.shape),
            }
        t = self._template
        return {
            "input": torch.zeros_like(t["input"]),
            "target": torch.zeros_like(t["target"]),
            "valid": torch.zeros(self.batch_size, dtype=torch.bool),
            "key": [""] * self.batch_size,
        }

    def _probe(self):
        """Decode the split's first good sample, only to learn the shapes of padding batches."""
        stream = ShardStream(self.location, self.index.shards[0].name)
        try:
            while (sample := stream.next()) is not None:
                try:
                    return self.decoder(sample, np.random.default_rng(0))
                except BadSample:
                    continue
        finally:
            stream.close()
        raise DataError(f"{self.location.url}: no decodable sample to shape padding batches")

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's position; merge all ranks' with ``merge_states`` before saving."""
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "seed": self.seed,
            "epoch": self.epoch,
            "positions": dict(self._positions),
            "plan": {
                "world_size": self.world_size,
                "num_workers": self.workers,
                "batch_size": self.batch_size,
                "shuffle": self.shuffle,
                "window": self.window,
                "base": dict(self._base),
                "global_order": self.global_order,
            },
            "ranks": {str(self.rank): {"batches": self._batches, "next_slot": self._next_slot}},
            "stats": {str(self.rank): dict(self.stats)},
        }

    def global_state_dict(self) -> dict[str, Any]:
        """``merge_states`` over every rank (a collective when torch.distributed is initialised)."""
        local = self.state_dict()
        if (
            self.world_size == 1
            or not torch.distributed.is_available()
            or not torch.distributed.is_initialized()
        ):
            return merge_states([local])
        states: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, local)
        return merge_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a reader state of format {STATE_FORMAT!r}")
        if state["split"] != self.split:
            raise ValueError(f"reader state is for split {state['split']!r}, not {self.split!r}")
        plan = state["plan"]
        if len(state["ranks"]) < plan["world_size"]:
            raise ValueError(
                f"reader state holds ranks {sorted(state['ranks'])} of a {plan['world_size']}-rank "
                "job: merge the states of all ranks with merge_states() before loading"
            )
        unknown = [n for n in state["positions"] if n not in self.counts]
        over = [n for n, p in state["positions"].items() if n in self.counts and p > self.counts[n]]
        if unknown or over:
            raise ValueError(
                f"reader state does not fit the shard index of {self.location.url}/{self.split}: "
                f"unknown shards {unknown[:3]}, positions past the end {over[:3]}"
            )
        self._start_epoch(int(state["epoch"]))
        self._positions = {n: int(p) for n, p in state["positions"].items()}
        same_order = (
            state["seed"] == self.seed
            and plan.get("shuffle", self.shuffle) == self.shuffle
            and plan.get("window", self.window) == self.window
            and plan.get("global_order", False) == self.global_order
        )
        if self.global_order:  # the order depends on the global batch only, not on the topology
            same = same_order and plan["batch_size"] * plan["world_size"] == self.global_batch
        else:
            same = (
                same_order
                and plan["world_size"] == self.world_size
                and plan["num_workers"] == self.workers
                and plan["batch_size"] == self.batch_size
            )
        if same:  # continue the interrupted plan: same order, same batches
            self._base = {n: int(p) for n, p in plan["base"].items()}
            mine = state["ranks"].get(str(self.rank)) or next(iter(state["ranks"].values()))
            self._batches, self._next_slot = (
                int(mine["batches"]),
                int(mine["next_slot"]) % self.workers,
            )
        else:  # another topology: a fresh plan over what is left of the epoch
            self._base = dict(self._positions)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One world-size independent state from the ``state_dict()`` of every rank."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    first = states[0]
    if first.get("format") == PARITY_STATE_FORMAT:
        return merge_parity_states(states)
    for s in states[1:]:
        for field in ("format", "split", "seed", "epoch"):
            if s[field] != first[field]:
                raise ValueError(
                    f"reader states disagree on {field}: {s[field]!r} vs {first[field]!r}"
                )
        if s["plan"] != first["plan"]:
            raise ValueError("reader states come from different epoch plans")
    positions: dict[str, int] = {}
    ranks: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for s in states:
        for name, pos in s["positions"].items():
            positions[name] = max(positions.get(name, 0), int(pos))
        ranks.update(s["ranks"])
        stats.update(s.get("stats", {}))
    batches = {r["batches"] for r in ranks.values()}
    if len(batches) > 1:
        raise ValueError(
            f"ranks consumed different numbers of batches {sorted(batches)}: "
            "take every rank's state at the same step"
        )
    return {**first, "positions": positions, "ranks": ranks, "stats": stats}
