"""The Q&A MNIST shard sets: the digit images (grayscale PNG + class) the questions are built from.

Questions are not stored: ``ctm_dist.data.qamnist`` draws them on the fly from these digits, as the
reference draws them from MNIST. Two sources:

* ``mnist_splits``: MNIST's IDX files; ``train`` -> split ``train``, ``t10k`` -> split ``val``
  (the reference evaluates on MNIST's test set). Stored at 28x28; the loader resizes to 32x32
  and normalises with MNIST's mean and deviation, as the reference's transform does.
* ``sklearn_digits_splits``: scikit-learn's bundled 8x8 digits (1797 images, no download), split
  80/20 by ``seed``. Stored as they are, 8x8, their 17 grey levels (0-16) spread over 0-255:
  upsampling adds no information, and at 8x8 the digit backbone's two poolings leave 2x2 tokens,
  which keeps a CPU model small enough to learn the task in minutes. Normalised with their own
  mean and deviation (computed on ``train``, stored in the index meta).

Samples: ``png`` (mode L), ``cls`` (the digit), ``json`` (source and index); task ``qamnist``;
meta ``image_size``, ``num_classes``, ``mean``, ``std``, ``source``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from .idx import read_mnist
from .index import ShardIndex
from .writer import as_location, encode_image, encode_json, write_shard_set

TASK = "qamnist"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the reference's normalisation of MNIST
MNIST_IMAGE_SIZE = 32  # the reference resizes MNIST's 28x28 to 32x32
VAL_FRACTION = 0.2


def mnist_splits(directory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": read_mnist(directory, "train"), "val": read_mnist(directory, "test")}


def sklearn_digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(order) * VAL_FRACTION))
    return {
        "train": (images[order[n_val:]], digits.target[order[n_val:]].astype(np.int64)),
        "val": (images[order[:n_val]], digits.target[order[:n_val]].astype(np.int64)),
    }


def digit_samples(images: np.ndarray, labels: np.ndarray, source: str) -> Iterator[dict]:
    for n, (image, label) in enumerate(zip(images, labels)):
        yield {
            "__key__": f"{n:08d}",
            "png": encode_image(Image.fromarray(image, "L"), "png"),
            "cls": str(int(label)).encode("ascii"),
            "json": encode_json({"source": f"{source}/{n}"}),
        }


def write_qamnist_shards(
    location,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    source: str,
    *,
    samples_per_shard: int = 1000,
    progress: bool = False,
) -> dict[str, ShardIndex]:
    """Write each split's digits; ``source`` is ``mnist`` or ``sklearn-digits``. Returns the indexes."""
    location = as_location(location)
    if source == "mnist":
        mean, std, image_size = MNIST_MEAN, MNIST_STD, MNIST_IMAGE_SIZE
    else:
        pixels = splits["train"][0].astype(np.float64) / 255.0
        mean, std, image_size = float(pixels.mean()), float(pixels.std()), None
    out = {}
    for split, (images, labels) in splits.items():
        meta = {
            "num_classes": 10,
            "source": source,
            "stored_size": list(images.shape[1:]),
            "image_size": image_size or int(images.shape[1]),
            "mean": round(mean, 6),
            "std": round(std, 6),
        }
        out[split] = write_shard_set(
            location,
            split,
            TASK,
            digit_samples(images, labels, source),
            samples_per_shard=samples_per_shard,
            meta=meta,
            total=len(images),
            progress=progress,
        )
    return out
