"""Procedural perfect mazes in the reference CTM's image format, and their routes.

Image layout (as the reference's maze PNGs): a square RGB image of odd side ``P``; the maze has
``(P - 1) // 2`` cells per side, cell ``(i, j)`` at pixel ``(2i + 1, 2j + 1)`` and the pixel between two
joined cells opened too. Walls are black, corridors white, the start is one red pixel and the end one
green pixel (both on cells). Released reference mazes also draw the solution in blue.

A route is a list of one-pixel moves (Up=0, Down=1, Left=2, Right=3) from red to green, padded with
Wait=4 to a fixed length and truncated if longer: one move between neighbouring cells is two moves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
STEPS = {UP: (-1, 0), DOWN: (1, 0), LEFT: (0, -1), RIGHT: (0, 1)}

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

SIZES = {"small": 19, "medium": 39, "large": 99}


def pixels_for(size: str | int) -> int:
    """Image side for a size name (small 19, medium 39, large 99) or an odd pixel count >= 5."""
    if isinstance(size, str) and size in SIZES:
        return SIZES[size]
    try:
        pixels = int(size)
    except ValueError:
        raise ValueError(
            f"maze size must be one of {sorted(SIZES)} or an odd pixel count, got {size!r}"
        ) from None
    if pixels < 5 or pixels % 2 == 0:
        raise ValueError(f"maze side in pixels must be odd and >= 5, got {pixels}")
    return pixels


@dataclass
class Maze:
    image: np.ndarray  # [P, P, 3] uint8, the solution not drawn
    start: tuple[int, int]  # pixel (y, x) of the red start
    end: tuple[int, int]  # pixel (y, x) of the green end
    path: list[tuple[int, int]]  # pixels from start to end, both included

    @property
    def moves(self) -> list[int]:
        return moves_along(self.path)


def generate_maze(pixels: int, seed: int) -> Maze:
    """A perfect maze (randomised depth-first search, a spanning tree of the cell grid) of side ``pixels``."""
    pixels = pixels_for(pixels)
    rng = np.random.default_rng(seed)
    n = (pixels - 1) // 2
    open_ = np.zeros((pixels, pixels), dtype=bool)
    visited = np.zeros((n, n), dtype=bool)
    draws = rng.random(2 * n * n + 1)
    d = 0
    root = (int(rng.integers(n)), int(rng.integers(n)))
    visited[root] = True
    open_[2 * root[0] + 1, 2 * root[1] + 1] = True
    stack = [root]
    while stack:
        i, j = stack[-1]
        options = [
            (i + di, j + dj)
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= i + di < n and 0 <= j + dj < n and not visited[i + di, j + dj]
        ]
        if not options:
            stack.pop()
            continue
        ni, nj = options[int(draws[d] * len(options))]
        d += 1
        visited[ni, nj] = True
        open_[2 * ni + 1, 2 * nj + 1] = True
        open_[i + ni + 1, j + nj + 1] = True  # the wall pixel between the two cells
        stack.append((ni, nj))

    first, second = rng.choice(n * n, size=2, replace=False)
    start = (2 * int(first // n) + 1, 2 * int(first % n) + 1)
    end = (2 * int(second // n) + 1, 2 * int(second % n) + 1)

    image = np.zeros((pixels, pixels, 3), dtype=np.uint8)
    image[open_] = WHITE
    image[start] = RED
    image[end] = GREEN
    return Maze(image=image, start=start, end=end, path=shortest_path(open_, start, end))


def shortest_path(
    open_: np.ndarray, start: tuple[int, int], end: tuple[int, int]
) -> list[tuple[int, int]]:
    """Breadth-first search over open pixels; the pixels from ``start`` to ``end`` inclusive."""
    h, w = open_.shape
    parent = {start: None}
    queue = deque([start])
    while queue:
        y, x = queue.popleft()
        if (y, x) == end:
            break
        for dy, dx in STEPS.values():
            nxt = (y + dy, x + dx)
            if 0 <= nxt[0] < h and 0 <= nxt[1] < w and open_[nxt] and nxt not in parent:
                parent[nxt] = (y, x)
                queue.append(nxt)
    if end not in parent:
        raise ValueError(f"no path from {start} to {end}")
    path = [end]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


def moves_along(path: list[tuple[int, int]]) -> list[int]:
    """The moves (0-3) that walk ``path`` pixel by pixel."""
    by_step = {step: move for move, step in STEPS.items()}
    moves = []
    for (y0, x0), (y1, x1) in zip(path, path[1:]):
        step = (y1 - y0, x1 - x0)
        if step not in by_step:
            raise ValueError(f"path jumps from {(y0, x0)} to {(y1, x1)}")
        moves.append(by_step[step])
    return moves


def pad_route(moves: list[int], route_length: int) -> list[int]:
    """Truncate to ``route_length`` moves or pad with Wait (4)."""
    return list(moves[:route_length]) + [WAIT] * max(0, route_length - len(moves))


def draw_solution(maze: Maze) -> np.ndarray:
    """The maze image with its solution drawn in blue, as in the reference's released PNGs."""
    image = maze.image.copy()
    for pixel in maze.path[1:-1]:
        image[pixel] = BLUE
    return image


def _pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.argwhere((image == np.array(colour, dtype=image.dtype)).all(axis=2))


def trace_solution(image: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Read a reference maze PNG (solution in blue): returns (image without the solution, its moves).

    Walks from the red pixel over blue pixels to the green one, trying Up, Down, Left, Right in that
    order as the reference's loader does. Raises ``ValueError`` if the image has not exactly one red and
    one green pixel or the blue path does not reach green.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB uint8 image, got shape {image.shape} dtype {image.dtype}"
        )
    reds, greens = _pixels_of(image, RED), _pixels_of(image, GREEN)
    if len(reds) != 1 or len(greens) != 1:
        raise ValueError(
            f"expected one red and one green pixel, found {len(reds)} red and {len(greens)} green"
        )
    start, end = tuple(int(v) for v in reds[0]), tuple(int(v) for v in greens[0])
    on_path = (image == np.array(BLUE, np.uint8)).all(axis=2)
    on_path[end] = True
    h, w = on_path.shape
    moves: list[int] = []
    y, x = start
    while (y, x) != end:
        on_path[y, x] = False
        for move, (dy, dx) in STEPS.items():
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and on_path[ny, nx]:
                moves.append(move)
                y, x = ny, nx
                break
        else:
            raise ValueError(
                f"the blue solution path stops at pixel {(y, x)} before reaching green at {end}"
            )
    clean = image.copy()
    clean[(image == np.array(BLUE, np.uint8)).all(axis=2)] = WHITE
    return clean, moves
