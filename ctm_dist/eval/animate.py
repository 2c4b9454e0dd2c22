"""Animated GIFs: attention over the input tick by tick, and a maze route as it unfolds.

Each frame is a matplotlib figure redrawn for one tick (the same panels, colour bar and 1-based tick
numbers as the PNGs); matplotlib's ``PillowWriter`` captures the frames and Pillow writes the GIF.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.animation import PillowWriter  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ctm_dist.tasks.mazes import route_cells  # noqa: E402

from .plots import _np, class_label, tick_title, ticks_axis  # noqa: E402

FPS = 4  # frames (ticks) per second


def write_gif(fig, draw, n_frames: int, path: str | Path, fps: float = FPS, dpi: int = 100) -> Path:
    """Call ``draw(i)`` for each frame i, capture ``fig`` after each call and write the GIF (loops forever).
    The layout is computed on the first frame and kept for the others (frames do not jump, and
    redrawing is about twice as fast)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = PillowWriter(fps=fps)
    try:
        with writer.saving(fig, str(path), dpi):
            for i in range(n_frames):
                draw(i)
                writer.grab_frame()
                if i == 0:
                    fig.set_layout_engine("none")
    finally:
        plt.close(fig)
    return path


def attention_gif(
    image,
    attention,
    path: str | Path,
    predicted=None,
    certainty=None,
    class_names=None,
    target: int | None = None,
    alpha: float = 0.55,
    fps: float = FPS,
    dpi: int = 100,
) -> Path:
    """One frame per tick: the input, the input with that tick's attention [T, h, w] laid over it (one
    colour scale for all ticks, colour bar), and the certainty per tick with the current tick marked.
    The title names the tick (1-based), the class predicted at it (``predicted`` [T]) and its certainty."""
    image, attention = _np(image), _np(attention)
    T = attention.shape[0]
    predicted = None if predicted is None else _np(predicted)
    certainty = None if certainty is None else _np(certainty)
    H, W = image.shape[:2]
    panels = 3 if certainty is not None else 2
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(3.4 * panels, 3.7),
        layout="constrained",
        width_ratios=(1, 1.2, 1.3)[:panels],
    )
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title(
        "input"
        + (f" (label {class_label(int(target), class_names)})" if target is not None else ""),
        fontsize=10,
    )
    axes[1].imshow(image, interpolation="nearest")
    heat = axes[1].imshow(
        attention[0],
        cmap="inferno",
        alpha=alpha,
        vmin=0,
        vmax=float(attention.max()) or 1.0,
        extent=(-0.5, W - 0.5, H - 0.5, -0.5),
        interpolation="bilinear",
    )
    axes[1].set_title("attention", fontsize=10)
    for ax in axes[:2]:
        ax.axis("off")
    bar = fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
    bar.set_label("attention weight", fontsize=9)
    bar.solids.set_alpha(1)
    marker = None
    if certainty is not None:
        ax = axes[2]
        ax.plot(ticks_axis(T), certainty, color="tab:blue", marker="o", ms=3)
        (marker,) = ax.plot([1], [certainty[0]], "o", color="tab:red", ms=9)
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tick")
        ax.set_ylabel("certainty")
        ax.set_title("certainty per tick", fontsize=10)
        ax.grid(alpha=0.3)
    title = fig.suptitle("", fontsize=11)

    def draw(t: int) -> None:
        heat.set_data(attention[t])
        if marker is not None:
            marker.set_data([t + 1], [certainty[t]])
        text = tick_title(t, T, predicted, certainty, class_names)
        title.set_text(text.replace("\n", ": predicted " if predicted is not None else ", ", 1))

    return write_gif(fig, draw, T, path, fps=fps, dpi=dpi)


def maze_route_image(maze_rgb: np.ndarray, route, colour=(0.2, 0.4, 1.0)) -> np.ndarray:
    """The maze [H, W, 3] with the cells a route walks through painted (start and goal kept)."""
    img = maze_rgb.astype(np.float32).copy()
    cells = route_cells(maze_rgb, route, stop_at_goal=True)
    for y, x in cells[1:]:
        if not ((maze_rgb[y, x] == (1, 0, 0)).all() or (maze_rgb[y, x] == (0, 1, 0)).all()):
            img[y, x] = colour
    return img


def _image_gif(
    images: list[np.ndarray], titles: list[str], path: str | Path, fps: float, dpi: int
) -> Path:
    fig, ax = plt.subplots(figsize=(4.8, 5.0), layout="constrained")
    shown = ax.imshow(images[0], interpolation="nearest")
    ax.axis("off")
    title = ax.set_title("", fontsize=12)

    def draw(i: int) -> None:
        shown.set_data(images[i])
        title.set_text(titles[i])

    return write_gif(fig, draw, len(images), path, fps=fps, dpi=dpi)


def maze_route_gif(
    maze_rgb: np.ndarray,
    moves_per_tick: np.ndarray,
    path: str | Path,
    target=None,
    fps: float = FPS,
    dpi: int = 100,
) -> Path:
    """One frame per tick: the route predicted at that tick ([T, L] moves) drawn on the maze; with
    ``target`` a first frame shows the true route (green)."""
    moves_per_tick = np.asarray(moves_per_tick)
    T = len(moves_per_tick)
    images, titles = [], []
    if target is not None:
        images.append(maze_route_image(maze_rgb, target, (0.3, 0.8, 0.3)))
        titles.append("true route")
    for t, moves in enumerate(moves_per_tick):
        images.append(maze_route_image(maze_rgb, moves))
        titles.append(f"predicted route, tick {t + 1}/{T}")
    return _image_gif(images, titles, path, fps, dpi)


def reapplication_gif(result: dict, path: str | Path, fps: float = FPS, dpi: int = 100) -> Path:
    """A maze solved by re-application (``solve_by_reapplication(..., keep_frames=True)``), tick by tick."""
    images, titles = [], []
    for i, app in enumerate(result["applications"]):
        T = len(app["moves"])
        for t, moves in enumerate(app["moves"]):
            images.append(maze_route_image(app["maze"], moves))
            titles.append(f"application {i + 1}, tick {t + 1}/{T}")
    return _image_gif(images, titles, path, fps, dpi)
