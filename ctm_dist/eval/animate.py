"""Animated GIFs (PIL): attention over the input tick by tick, and a maze route as it unfolds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .mazes import route_cells


def _u8(rgb01: np.ndarray) -> np.ndarray:
    return (np.clip(rgb01, 0, 1) * 255).round().astype(np.uint8)


def upscale(rgb: np.ndarray, size: int) -> Image.Image:
    """Nearest-neighbour upscale of an [H, W, 3] image in [0, 1] so that its longer side is ``size``."""
    H, W = rgb.shape[:2]
    f = max(1, size // max(H, W))
    return Image.fromarray(_u8(rgb)).resize((W * f, H * f), Image.NEAREST)


def heat_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend an attention map [h, w] (resized bilinearly to the image) over an image [H, W, 3] in [0, 1]."""
    H, W = image.shape[:2]
    a = attention.astype(np.float32)
    a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    a = np.asarray(Image.fromarray(a).resize((W, H), Image.BILINEAR))
    heat = colormaps["inferno"](a)[..., :3]
    w = alpha * a[..., None]
    return image * (1 - w) + heat * w


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0, optimize=False)
    return path


def label(frame: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (frame.width, frame.height + 14), "white")
    out.paste(frame, (0, 14))
    ImageDraw.Draw(out).text((2, 1), text, fill="black")
    return out


def attention_frames(image: np.ndarray, attention: np.ndarray, size: int = 192,
                     captions: list[str] | None = None) -> list[Image.Image]:
    """One frame per tick: the image with that tick's attention [T, h, w] laid over it."""
    frames = []
    for t in range(attention.shape[0]):
        frame = upscale(heat_overlay(image, attention[t]), size).convert("RGB")
        frames.append(label(frame, captions[t] if captions else f"tick {t + 1}"))
    return frames


def maze_route_image(maze_rgb: np.ndarray, route, colour=(0.2, 0.4, 1.0)) -> np.ndarray:
    """The maze [H, W, 3] with the cells a route walks through painted (start and goal kept)."""
    img = maze_rgb.astype(np.float32).copy()
    cells = route_cells(maze_rgb, route, stop_at_goal=True)
    for y, x in cells[1:]:
        if not ((maze_rgb[y, x] == (1, 0, 0)).all() or (maze_rgb[y, x] == (0, 1, 0)).all()):
            img[y, x] = colour
    return img


def maze_route_frames(maze_rgb: np.ndarray, moves_per_tick: np.ndarray, size: int = 256,
                      target=None) -> list[Image.Image]:
    """One frame per tick: the route predicted at that tick ([T, L] moves) drawn on the maze;
    with ``target`` a first frame shows the true route."""
    frames = []
    if target is not None:
        frames.append(label(upscale(maze_route_image(maze_rgb, target, (0.3, 0.8, 0.3)), size), "true route"))
    for t, moves in enumerate(np.asarray(moves_per_tick)):
        frames.append(label(upscale(maze_route_image(maze_rgb, moves), size), f"tick {t + 1}"))
    return frames


def reapplication_frames(result: dict, size: int = 256) -> list[Image.Image]:
    """Frames of a maze solved by re-application (``solve_by_reapplication(..., keep_frames=True)``)."""
    frames = []
    for i, app in enumerate(result["applications"]):
        for t, moves in enumerate(app["moves"]):
            img = maze_route_image(app["maze"], moves)
            frames.append(label(upscale(img, size), f"application {i + 1} tick {t + 1}"))
    return frames
