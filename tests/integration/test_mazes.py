"""Maze generator and maze shard writers: perfect mazes, shortest valid routes, reference folders."""

from __future__ import annotations

import os
from collections import deque

import numpy as np
import pytest
from PIL import Image
from writers_fixtures import decode, doc, load_script, read_shard_set, shard_bytes

from ctm_dist.data.mazes_gen import (
    SIZES,
    draw_solution,
    generate_maze,
    pad_route,
    pixels_for,
    trace_solution,
)
from ctm_dist.data.mazes_writer import maze_seed, write_maze_folder_shards, write_maze_shards
from ctm_dist.storage import Location

MOVES = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}


def colour_mask(image, rgb):
    return (image == np.array(rgb, np.uint8)).all(axis=2)


def corridor_graph(image):
    """Open pixels (anything not black) and their 4-neighbour edges."""
    open_ = ~colour_mask(image, (0, 0, 0))
    nodes = {tuple(p) for p in np.argwhere(open_)}
    edges = {
        (a, (a[0] + dy, a[1] + dx))
        for a in nodes
        for dy, dx in ((1, 0), (0, 1))
        if (a[0] + dy, a[1] + dx) in nodes
    }
    return nodes, edges


def bfs_distance(nodes, start, end):
    dist = {start: 0}
    queue = deque([start])
    while queue:
        y, x = queue.popleft()
        for dy, dx in MOVES.values():
            n = (y + dy, x + dx)
            if n in nodes and n not in dist:
                dist[n] = dist[(y, x)] + 1
                queue.append(n)
    return dist[end], len(dist)


def check_maze(image, route, route_length):
    """The maze is a spanning tree of its corridors; the route is the shortest valid walk red -> green."""
    p = image.shape[0]
    assert image.shape == (p, p, 3) and p % 2 == 1
    assert not colour_mask(image, (0, 0, 255)).any(), "solution must not be drawn"
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours <= {(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0)}
    reds, greens = (
        np.argwhere(colour_mask(image, (255, 0, 0))),
        np.argwhere(colour_mask(image, (0, 255, 0))),
    )
    assert len(reds) == 1 and len(greens) == 1
    start, end = tuple(reds[0]), tuple(greens[0])
    assert start != end and all(v % 2 == 1 for v in start + end), "start and end sit on cells"
    # walls: the border and every even-even pixel; cells: every odd-odd pixel
    assert (
        colour_mask(image[[0, -1]], (0, 0, 0)).all()
        and colour_mask(image[:, [0, -1]], (0, 0, 0)).all()
    )
    assert colour_mask(image[::2, ::2], (0, 0, 0)).all()
    assert not colour_mask(image[1::2, 1::2], (0, 0, 0)).any()
    nodes, edges = corridor_graph(image)
    shortest, reached = bfs_distance(nodes, start, end)
    assert reached == len(nodes), "corridors are connected"
    assert len(edges) == len(nodes) - 1, "connected with |E| = |V| - 1: a tree, no cycles"
    # the route: valid steps inside corridors, ending on green, as long as the BFS distance
    assert len(route) == route_length
    moves = [m for m in route if m != 4]
    assert route[len(moves) :] == [4] * (route_length - len(moves)), "Wait only as padding"
    y, x = start
    for m in moves:
        y, x = y + MOVES[m][0], x + MOVES[m][1]
        assert (y, x) in nodes, "route leaves the corridors"
    if shortest <= route_length:
        assert (y, x) == end and len(moves) == shortest
    else:
        assert len(moves) == route_length
    return shortest


@pytest.mark.parametrize("pixels", [5, 19, 39, 99])
def test_generated_mazes_are_perfect_with_shortest_routes(pixels):
    lengths = []
    for seed in range(12 if pixels < 99 else 3):
        maze = generate_maze(pixels, seed)
        route = pad_route(maze.moves, 1000)
        lengths.append(check_maze(maze.image, route, 1000))
        # generation is a pure function of (pixels, seed)
        again = generate_maze(pixels, seed)
        assert np.array_equal(again.image, maze.image) and again.moves == maze.moves
    assert len(set(lengths)) > 1 or pixels == 5


def test_routes_move_pixel_by_pixel_and_truncate():
    maze = generate_maze(39, 7)
    assert len(maze.moves) % 2 == 0, "one cell step is two pixel moves"
    assert pad_route(maze.moves, 3) == maze.moves[:3]
    assert pad_route([0, 3], 5) == [0, 3, 4, 4, 4]


def test_sizes_and_bad_sizes():
    assert (SIZES["small"], SIZES["medium"], SIZES["large"]) == (19, 39, 99)
    assert pixels_for("medium") == 39 and pixels_for(21) == 21
    for bad in (20, 3, "huge"):
        with pytest.raises(ValueError):
            pixels_for(bad)


def test_trace_solution_reads_the_reference_format():
    maze = generate_maze(39, 11)
    drawn = draw_solution(maze)
    assert colour_mask(drawn, (0, 0, 255)).sum() == len(maze.path) - 2
    clean, moves = trace_solution(drawn)
    assert moves == maze.moves and np.array_equal(clean, maze.image)
    broken = drawn.copy()
    y, x = maze.path[len(maze.path) // 2]
    broken[y, x] = (255, 255, 255)
    with pytest.raises(ValueError, match="stops"):
        trace_solution(broken)
    no_green = drawn.copy()
    no_green[maze.end] = (255, 255, 255)
    with pytest.raises(ValueError, match="one red and one green"):
        trace_solution(no_green)


def test_generated_shard_set_on_s3_round_trips_and_is_deterministic(
    object_store, s3_location, tmp_path
):
    index = write_maze_shards(
        s3_location.child("a"),
        "train",
        23,
        "small",
        route_length=30,
        seed=5,
        samples_per_shard=8,
        progress=False,
    )
    assert [s.samples for s in index.shards] == [8, 8, 7]
    index, samples = read_shard_set(s3_location.child("a"), "train")
    assert (
        index.task == "mazes"
        and index.meta["image_size"] == 19
        and index.meta["route_length"] == 30
    )
    assert sorted(samples) == [f"{i:08d}" for i in range(23)]
    for number, (key, sample) in enumerate(samples.items()):
        assert set(sample) == {"png", "json"}
        d = doc(sample)
        image = np.asarray(decode(sample["png"]))
        assert (
            d["size"] == 19
            and d["route_length"] == 30
            and d["seed"] == maze_seed(5, "train", number)
        )
        check_maze(image, d["route"], 30)
        maze = generate_maze(19, d["seed"])  # the stored seed regenerates the stored maze
        assert np.array_equal(maze.image, image) and d["route"] == pad_route(maze.moves, 30)
        assert d["solution_length"] == len(maze.moves)
    # same inputs, other process count: identical bytes; other split: other mazes
    local = Location.parse(tmp_path)
    write_maze_shards(
        local,
        "train",
        23,
        "small",
        route_length=30,
        seed=5,
        samples_per_shard=8,
        workers=2,
        progress=False,
    )
    assert shard_bytes(s3_location.child("a"), "train") == shard_bytes(local, "train")
    write_maze_shards(
        local, "test", 23, "small", route_length=30, seed=5, samples_per_shard=8, progress=False
    )
    assert local.read_bytes("test-000000.tar") != local.read_bytes("train-000000.tar")


def test_reference_folder_converts_with_counted_skips(object_store, s3_location, tmp_path):
    folder = tmp_path / "mazes" / "train"
    expected = {}
    for i in range(9):
        maze = generate_maze(39, 100 + i)
        os.makedirs(folder / str(i % 2), exist_ok=True)  # ImageFolder layout: class sub-folders
        Image.fromarray(draw_solution(maze)).save(folder / str(i % 2) / f"maze_{i:03d}.png")
        expected[f"{i % 2}/maze_{i:03d}.png"] = maze
    broken = draw_solution(generate_maze(39, 999))
    broken[colour_mask(broken, (0, 255, 0))] = (255, 255, 255)
    Image.fromarray(broken).save(folder / "0" / "broken.png")
    Image.fromarray(draw_solution(generate_maze(19, 1))).save(folder / "1" / "small.png")

    index, skipped = write_maze_folder_shards(
        s3_location,
        "train",
        str(folder),
        route_length=100,
        seed=3,
        samples_per_shard=4,
        progress=False,
    )
    assert (
        len(skipped) == 2
        and any("broken.png" in s for s in skipped)
        and any("small.png" in s for s in skipped)
    )
    index, samples = read_shard_set(s3_location, "train")
    assert index.num_samples == 9 and index.meta["image_size"] == 39
    assert sorted(doc(s)["source"] for s in samples.values()) == sorted(expected)
    for sample in samples.values():
        d = doc(sample)
        maze = expected[d["source"]]
        image = np.asarray(decode(sample["png"]).convert("RGB"))
        assert np.array_equal(image, maze.image), "stored without the blue solution"
        assert d["route"] == pad_route(maze.moves, 100)
        check_maze(image, d["route"], 100)


def test_cli_writes_to_s3_with_env_credentials(object_store, s3_bucket, s3_env, capsys):
    script = load_script("mazes")
    url = f"s3://{s3_bucket}/cli"
    assert (
        script.main(
            [
                "--out",
                url,
                "--split",
                "val",
                "--count",
                "5",
                "--pixels",
                "21",
                "--route-length",
                "12",
                "--seed",
                "9",
                "--samples-per-shard",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "wrote 5 samples in 3 shards" in capsys.readouterr().out
    index, samples = read_shard_set(Location.parse(url), "val")
    assert index.meta["image_size"] == 21
    for sample in samples.values():
        check_maze(np.asarray(decode(sample["png"])), doc(sample)["route"], 12)
