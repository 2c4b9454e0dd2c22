"""The demo shard set: scikit-learn's 8x8 digits (shipped inside the package, no download) as 32x32 RGB.

Each digit is upscaled bilinearly to 28x28, placed at a random offset in the 32x32 frame and tinted
(ink and paper colours), all drawn from ``seed``, and split by seed into ``train`` (~80%) and ``val``.
ImageNet shard format (``.png``, ``.cls``, ``.json``), meta ``image_size=32``, ``num_classes=10``.
Writing both splits takes a few seconds at most.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .index import ShardIndex
from .writer import as_location, encode_image, encode_json, write_shard_set

IMAGE_SIZE = 32
VAL_FRACTION = 0.2


def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of bilinear interpolation (pixel centres aligned, edges clamped)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(matrix, (np.arange(n_out), hi), pos - lo)
    return matrix


def digit_images(digits8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, 8, 8] digits (values 0..16) -> [N, 32, 32, 3] uint8: upscaled to 28x28, shifted, tinted."""
    n = len(digits8)
    up = _bilinear(8, 28)
    big = np.einsum("oi,nij,pj->nop", up, digits8 / 16.0, up)
    shifts = rng.integers(0, IMAGE_SIZE - 28 + 1, size=(n, 2))
    ink = rng.uniform(0.6, 1.0, size=(n, 1, 1, 3))
    paper = rng.uniform(0.0, 0.25, size=(n, 1, 1, 3))
    canvas = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE))
    for k, (dy, dx) in enumerate(shifts):
        canvas[k, dy : dy + 28, dx : dx + 28] = big[k]
    rgb = paper + canvas[..., None] * (ink - paper)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def demo_samples(
    seed: int = 0, splits: tuple[str, ...] = ("train", "val")
) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]} samples (those of ``splits``), fixed by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = int(round(len(order) * VAL_FRACTION))
    parts = {"train": order[n_val:], "val": order[:n_val]}
    images = digit_images(digits.images, rng)
    out: dict[str, list[dict]] = {}
    for split, indices in parts.items():
        if split not in splits:
            continue
        out[split] = [
            {
                "__key__": f"{n:08d}",
                "png": encode_image(Image.fromarray(images[i], "RGB"), "png"),
                "cls": str(int(digits.target[i])).encode("ascii"),
                "json": encode_json({"source": f"sklearn-digits/{int(i)}"}),
            }
            for n, i in enumerate(indices)
        ]
    return out


def write_demo_shards(
    location,
    seed: int = 0,
    samples_per_shard: int = 256,
    progress: bool = False,
    splits: tuple[str, ...] = ("train", "val"),
) -> dict[str, ShardIndex]:
    """Write the ``train`` and ``val`` demo shard sets (or some of them) to ``location``; returns their indexes."""
    location = as_location(location)
    meta = {
        "num_classes": 10,
        "classes": [str(d) for d in range(10)],
        "image_size": IMAGE_SIZE,
        "source": "sklearn load_digits",
        "seed": seed,
    }
    return {
        split: write_shard_set(
            location,
            split,
            "demo",
            samples,
            samples_per_shard=samples_per_shard,
            meta=meta,
            total=len(samples),
            progress=progress,
        )
        for split, samples in demo_samples(seed, splits).items()
    }
