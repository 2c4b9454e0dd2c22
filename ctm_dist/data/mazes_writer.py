"""Maze shard sets: procedurally generated perfect mazes, or the reference's released maze folders.

Samples: ``__key__``, ``.png`` (the maze, solution not drawn) and ``.json`` with ``route`` (moves padded
with Wait to ``route_length``), ``route_length``, ``solution_length`` (moves before padding or
truncation), ``size`` (pixels per side), ``seed`` (regenerates the maze with ``generate_maze``; null
for converted folders), ``start`` and ``end`` pixels, and ``source`` for converted folders.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from functools import partial

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ctm_dist.model.config import MAZE_ROUTE_LENGTH

from .index import ShardIndex
from .mazes_gen import generate_maze, pad_route, pixels_for, trace_solution
from .writer import ShardSetWriter, encode_image, encode_json, parallel_map, write_shard_set

DEFAULT_ROUTE_LENGTH = MAZE_ROUTE_LENGTH


def maze_seed(seed: int, split: str, number: int) -> int:
    """Seed of maze ``number`` of ``split``: independent per maze, so generation can run in parallel."""
    sequence = np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8")), number])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _sample(
    key: str, image: np.ndarray, moves: list[int], route_length: int, seed, start, end, **extra
) -> dict:
    doc = {
        "route": pad_route(moves, route_length),
        "route_length": route_length,
        "solution_length": len(moves),
        "size": int(image.shape[0]),
        "seed": seed,
        "start": [int(v) for v in start],
        "end": [int(v) for v in end],
        **extra,
    }
    return {
        "__key__": key,
        "png": encode_image(Image.fromarray(image, "RGB"), "png"),
        "json": encode_json(doc),
    }


def _generated_sample(
    number: int, *, split: str, seed: int, pixels: int, route_length: int
) -> dict:
    sample_seed = maze_seed(seed, split, number)
    maze = generate_maze(pixels, sample_seed)
    return _sample(
        f"{number:08d}", maze.image, maze.moves, route_length, sample_seed, maze.start, maze.end
    )


def write_maze_shards(
    location,
    split: str,
    count: int,
    size: str | int = "medium",
    *,
    route_length: int = DEFAULT_ROUTE_LENGTH,
    seed: int = 0,
    samples_per_shard: int = 1000,
    workers: int = 1,
    progress: bool = True,
) -> ShardIndex:
    """Generate ``count`` perfect mazes of ``size`` (small/medium/large or odd pixels) as a shard set."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    pixels = pixels_for(size)
    make = partial(
        _generated_sample, split=split, seed=seed, pixels=pixels, route_length=route_length
    )
    samples = parallel_map(make, list(range(count)), workers, chunksize=64)
    meta = {"image_size": pixels, "route_length": route_length, "source": "generated", "seed": seed}
    return write_shard_set(
        location,
        split,
        "mazes",
        samples,
        samples_per_shard=samples_per_shard,
        meta=meta,
        total=count,
        progress=progress,
    )


def _folder_sample(item: tuple[int, str], *, folder: str, route_length: int):
    number, relpath = item
    try:
        with Image.open(os.path.join(folder, relpath)) as im:
            image = np.asarray(im.convert("RGB"))
        clean, moves = trace_solution(image)
    except (OSError, ValueError) as e:
        return f"{relpath}: {e}"
    start = np.argwhere((clean == (255, 0, 0)).all(axis=2))[0]
    end = np.argwhere((clean == (0, 255, 0)).all(axis=2))[0]
    return _sample(f"{number:08d}", clean, moves, route_length, None, start, end, source=relpath)


def list_pngs(folder: str) -> list[str]:
    """Every ``*.png`` under ``folder`` (recursively), relative and sorted."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(".png"):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def write_maze_folder_shards(
    location,
    split: str,
    folder: str,
    *,
    route_length: int = DEFAULT_ROUTE_LENGTH,
    seed: int = 0,
    shuffle: bool = True,
    samples_per_shard: int = 1000,
    workers: int = 1,
    progress: bool = True,
) -> tuple[ShardIndex, list[str]]:
    """Convert a folder of reference maze PNGs (solution drawn in blue) into a shard set.

    The solution is read as the reference's loader reads it and removed from the stored image.
    Unreadable mazes, broken solutions and images of another size than the first are skipped with a
    warning; returns the index and the skipped files' messages.
    """
    files = list_pngs(folder)
    if not files:
        raise FileNotFoundError(f"no .png files under {folder}")
    if shuffle:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    make = partial(_folder_sample, folder=folder, route_length=route_length)
    skipped: list[str] = []

    def skip(message: str) -> None:
        skipped.append(message)
        print(f"warning: skipped maze {message}", file=sys.stderr)

    meta = {"image_size": None, "route_length": route_length, "source": "folder", "seed": seed}
    results = parallel_map(make, list(enumerate(files)), workers, chunksize=64)
    with ShardSetWriter(location, split, "mazes", samples_per_shard, meta) as writer:
        for number, result in enumerate(
            tqdm(
                results,
                total=len(files),
                desc=f"mazes/{split}",
                unit="maze",
                disable=not progress,
                dynamic_ncols=True,
            )
        ):
            if isinstance(result, str):
                skip(result)
                continue
            size = int(json.loads(result["json"])["size"])
            if writer.index.meta["image_size"] is None:
                writer.index.meta["image_size"] = size
            elif size != writer.index.meta["image_size"]:
                skip(
                    f"{files[number]}: {size} pixels, the set is {writer.index.meta['image_size']}"
                )
                continue
            result["__key__"] = f"{writer.written:08d}"
            writer.write(result)
    return writer.index, skipped
