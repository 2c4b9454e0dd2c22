"""The demo shard set: scikit-learn's 8x8 digits (shipped inside the package, no download) as 32x32 RGB.

Each digit is upscaled bilinearly, shifted by up to two pixels and tinted, all drawn from a per-image
seed, and split by seed into ``train`` (~80%) and ``val``. ImageNet shard format (``.png``, ``.cls``,
``.json``), meta ``image_size=32``, ``num_classes=10``. Writing both splits takes about a second.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .index import ShardIndex
from .writer import as_location, encode_image, encode_json, write_shard_set

IMAGE_SIZE = 32
VAL_FRACTION = 0.2


def digit_image(pixels8: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit (values 0..16) as a 32x32 RGB image with a random shift and tint."""
    grey = Image.fromarray((pixels8 * (255.0 / 16.0)).astype(np.uint8), "L")
    big = np.asarray(grey.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    dy, dx = rng.integers(0, IMAGE_SIZE - 28 + 1, size=2)
    canvas[dy:dy + 28, dx:dx + 28] = big
    ink = rng.uniform(0.6, 1.0, size=3)
    paper = rng.uniform(0.0, 0.25, size=3)
    rgb = paper + canvas[..., None] * (ink - paper)
    return Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def demo_samples(seed: int = 0, splits: tuple[str, ...] = ("train", "val")) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]} samples (those of ``splits``), fixed by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = int(round(len(order) * VAL_FRACTION))
    parts = {"train": order[n_val:], "val": order[:n_val]}
    image_seeds = rng.integers(0, 2**63 - 1, size=len(order))
    out: dict[str, list[dict]] = {}
    for split, indices in parts.items():
        if split not in splits:
            continue
        out[split] = [
            {"__key__": f"{n:08d}",
             "png": encode_image(digit_image(digits.images[i], np.random.default_rng(int(image_seeds[i]))), "png"),
             "cls": str(int(digits.target[i])).encode("ascii"),
             "json": encode_json({"source": f"sklearn-digits/{int(i)}"})}
            for n, i in enumerate(indices)
        ]
    return out


def write_demo_shards(location, seed: int = 0, samples_per_shard: int = 256, progress: bool = False,
                      splits: tuple[str, ...] = ("train", "val")) -> dict[str, ShardIndex]:
    """Write the ``train`` and ``val`` demo shard sets (or some of them) to ``location``; returns their indexes."""
    location = as_location(location)
    meta = {"num_classes": 10, "classes": [str(d) for d in range(10)], "image_size": IMAGE_SIZE,
            "source": "sklearn load_digits", "seed": seed}
    return {split: write_shard_set(location, split, "demo", samples, samples_per_shard=samples_per_shard,
                                   meta=meta, total=len(samples), progress=progress)
            for split, samples in demo_samples(seed, splits).items()}
