"""Small models and data shared by the evaluation, export and plot tests."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ctm_dist.model import CTM, preset


TINY = dict(iterations=5, d_model=32, d_input=16, heads=2, n_synch_out=16, n_synch_action=16,
            memory_length=3, memory_hidden_dims=4)


def tiny_config(**overrides):
    values = {**TINY, **overrides}
    return preset("demo", **values)


def tiny_ctm(seed: int = 0, **overrides) -> CTM:
    torch.manual_seed(seed)
    return CTM(tiny_config(**overrides)).eval()


def write_digit_shards(location, split: str = "val", n: int = 40, seed: int = 0, size: int = 16):
    """A small classification shard set (demo task): random coloured images, labels 0..9."""
    from ctm_dist.data.writer import write_shard_set

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})
    meta = {"num_classes": 10, "classes": [f"c{d}" for d in range(10)], "image_size": size}
    return write_shard_set(location, split, "demo", samples, samples_per_shard=16, meta=meta, total=n)
