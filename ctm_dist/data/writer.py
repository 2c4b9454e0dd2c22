"""Writing shard sets: tars of ``samples_per_shard`` samples each, then the index, last.

Tars are reproducible: members are written in sample order with their fields sorted, with a fixed
mtime, owner and mode. Each shard is built in a local temporary file and uploaded whole through
``ctm_dist.storage.Location`` (so an upload can be retried and never leaves half an object), and the
index ``{split}.json`` is written after every shard, so a partial shard set has no index.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from ctm_dist.storage import Location, StorageError

from .index import ShardIndex, ShardInfo, index_name, shard_name

TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
TAR_OWNER = "ctm"


def as_location(location: Location | str | os.PathLike) -> Location:
    return Location.parse(location)


def encode_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_image(image, fmt: str, quality: int = 95) -> bytes:
    """PIL image -> PNG or JPEG bytes (deterministic for a given Pillow)."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


class ShardSetWriter:
    """Append samples (dicts with ``__key__`` and byte fields); ``close()`` writes the index.

    Use as a context manager: on an exception the index is not written.
    """

    def __init__(
        self,
        location,
        split: str,
        task: str,
        samples_per_shard: int,
        meta: dict[str, Any] | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.location = as_location(location)
        self.index = ShardIndex(task=task, split=split, meta=dict(meta or {}))
        self.samples_per_shard = samples_per_shard
        self._tmpdir = tempfile.TemporaryDirectory(prefix="ctm-shards-")
        self._tar = None  # webdataset.TarWriter of the shard being filled
        self._tar_path = ""
        self._in_shard = 0
        self._keys: set[str] = set()
        self.written = 0  # samples written so far
        self._existing = self._list_existing()
        # An old index would describe shards we are about to replace: remove it first.
        if index_name(split) in self._existing:
            self.location.rm(index_name(split))

    def _list_existing(self) -> set[str]:
        try:
            return set(self.location.list())
        except FileNotFoundError:
            return set()

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        if "." in key:
            raise ValueError(
                f"sample key {key!r} contains a dot (webdataset splits field names on it)"
            )
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in split {self.index.split!r}")
        self._keys.add(key)
        if self._tar is None:
            self._open_shard()
        self._tar.write(sample)
        self._in_shard += 1
        self.written += 1
        if self._in_shard == self.samples_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        import webdataset as wds  # imports torch: only where tars are written, not in sample workers

        self._tar_path = os.path.join(self._tmpdir.name, "shard.tar")
        self._tar = wds.TarWriter(
            self._tar_path,
            user=TAR_OWNER,
            group=TAR_OWNER,
            mtime=TAR_MTIME,
            encoder=False,
            compress=False,
        )
        self._in_shard = 0

    def _close_shard(self) -> None:
        self._tar.close()
        self._tar = None
        name = shard_name(self.index.split, len(self.index.shards))
        self.location.put_file(self._tar_path, name)
        os.remove(self._tar_path)
        self.index.shards.append(ShardInfo(name=name, samples=self._in_shard))

    def close(self) -> ShardIndex:
        if self._tar is not None:
            self._close_shard()
        if not self.index.shards:
            raise ValueError(f"no samples were written for split {self.index.split!r}")
        self._remove_stale_shards()
        self.location.write_bytes(
            index_name(self.index.split), self.index.to_json().encode("utf-8")
        )
        self._tmpdir.cleanup()
        return self.index

    def _remove_stale_shards(self) -> None:
        """Shards of an earlier, larger run of the same split would linger beside the new index."""
        number = len(self.index.shards)
        while shard_name(self.index.split, number) in self._existing:
            self.location.rm(shard_name(self.index.split, number))
            number += 1

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._tmpdir.cleanup()

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard_set(
    location,
    split: str,
    task: str,
    samples: Iterable[dict[str, Any]],
    *,
    samples_per_shard: int,
    meta: dict[str, Any] | None = None,
    total: int | None = None,
    progress: bool = True,
) -> ShardIndex:
    """Write every sample of ``samples`` as a shard set; returns its index (already stored)."""
    with ShardSetWriter(location, split, task, samples_per_shard, meta) as writer:
        for sample in tqdm(
            samples,
            total=total,
            desc=f"{task}/{split}",
            unit="sample",
            disable=not progress,
            dynamic_ncols=True,
        ):
            writer.write(sample)
    return writer.index


def parallel_map(fn: Callable, items: list, workers: int, chunksize: int = 16) -> Iterator:
    """``map(fn, items)`` in order, over ``workers`` processes when ``workers > 1``.

    At most ``2 * workers`` chunks are in flight, so a slow consumer (an upload) holds memory bounded.
    The pool starts here, before the caller opens storage clients or progress bars (their threads
    must not be forked); ``fn`` must be picklable (a top-level function or a partial of one).
    """
    if workers <= 1 or len(items) <= 1:
        return map(fn, items)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers)
    chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
    return _results(pool, fn, chunks, ahead=2 * workers)


def _map_chunk(fn: Callable, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _results(pool, fn: Callable, chunks: list[list], ahead: int) -> Iterator:
    try:
        pending: deque = deque()
        remaining = iter(chunks)
        for chunk in itertools.islice(remaining, ahead):
            pending.append(pool.apply_async(_map_chunk, (fn, chunk)))
        while pending:
            done = pending.popleft().get()
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.apply_async(_map_chunk, (fn, following)))
            yield from done
    finally:
        pool.terminate()
        pool.join()


def add_common_args(
    parser: argparse.ArgumentParser,
    default_split: str = "train",
    default_samples_per_shard: int = 1000,
    workers: bool = True,
) -> None:
    """Options every shard-writing script takes. Endpoint and keys come from the AWS_* variables."""
    parser.add_argument(
        "--out",
        required=True,
        help="where the shard set goes: s3://bucket/prefix, file:///dir or a path "
        "(S3 endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
    )
    parser.add_argument(
        "--split",
        default=default_split,
        help="split name: shards {split}-000000.tar, index {split}.json",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every random choice (shuffle order, generation)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=default_samples_per_shard)
    if workers:
        parser.add_argument("--workers", type=int, default=1, help="processes that prepare samples")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def print_summary(index: ShardIndex, location: Location, skipped: int = 0) -> None:
    extra = f", {skipped} skipped (see warnings above)" if skipped else ""
    print(
        f"wrote {index.num_samples} samples in {len(index.shards)} shards to {location.url}/"
        f"{index_name(index.split)}{extra}"
    )


def run_script(main: Callable[[], int]) -> None:
    """Run a dataset script's ``main``; bad input and storage errors end it with one clear line, no traceback."""
    try:
        sys.exit(main())
    except (ValueError, OSError, StorageError) as e:
        sys.exit(f"error: {e}")
