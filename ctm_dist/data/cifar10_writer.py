"""CIFAR-10 shard sets from the python-version pickle batches (``cifar-10-batches-py``).

``train`` = ``data_batch_1`` .. ``data_batch_5``, ``test`` = ``test_batch``; class names from
``batches.meta``. The pickles are read with an unpickler that accepts only plain containers and
numpy arrays. Samples: ``.png`` (32x32 RGB, lossless), ``.cls``, ``.json`` (``source``, ``batch``).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from PIL import Image

from .index import ShardIndex
from .writer import encode_image, encode_json, write_shard_set

PARTS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def load_batch(path: str) -> dict:
    with open(path, "rb") as f:
        doc = _SafeUnpickler(f, encoding="bytes").load()
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (a {type(doc).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in doc.items()}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_part(source: str, part: str) -> tuple[np.ndarray, list[int], list[str], list[str]]:
    """(images [N, 32, 32, 3] uint8, labels, file names, batch names) of ``train`` or ``test``."""
    if part not in PARTS:
        raise ValueError(f"CIFAR-10 part must be one of {sorted(PARTS)}, got {part!r}")
    images, labels, names, batches = [], [], [], []
    for batch in PARTS[part]:
        path = os.path.join(source, batch)
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing CIFAR-10 batch {path}")
        doc = load_batch(path)
        data = np.asarray(doc["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(doc["labels"]) != len(data):
            raise ValueError(
                f"{path}: data {data.shape} and {len(doc['labels'])} labels do not form 32x32 RGB images"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += [int(v) for v in doc["labels"]]
        names += [
            _text(n) for n in doc.get("filenames", [f"{batch}_{i}" for i in range(len(data))])
        ]
        batches += [batch] * len(data)
    return np.concatenate(images), labels, names, batches


def class_names(source: str) -> list[str]:
    return [_text(n) for n in load_batch(os.path.join(source, "batches.meta"))["label_names"]]


def write_cifar10_shards(
    location,
    source: str,
    split: str,
    *,
    part: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> ShardIndex:
    """Write the ``part`` (default: ``train`` for split train, else ``test``) as shard set ``split``."""
    part = part or ("train" if split == "train" else "test")
    classes = class_names(source)
    images, labels, names, batches = read_part(source, part)
    bad = sorted({v for v in labels if not 0 <= v < len(classes)})
    if bad:
        raise ValueError(f"labels {bad} are outside the {len(classes)} classes of batches.meta")
    order = (
        np.random.default_rng(seed).permutation(len(labels)) if shuffle else np.arange(len(labels))
    )

    def samples():
        for number, i in enumerate(order):
            yield {
                "__key__": f"{number:08d}",
                "png": encode_image(Image.fromarray(images[i], "RGB"), "png"),
                "cls": str(labels[i]).encode("ascii"),
                "json": encode_json({"source": names[i], "batch": batches[i]}),
            }

    meta = {
        "num_classes": len(classes),
        "classes": classes,
        "image_size": 32,
        "source": f"cifar-10 {part}",
        "seed": seed,
        "shuffled": shuffle,
    }
    return write_shard_set(
        location,
        split,
        "cifar10",
        samples(),
        samples_per_shard=samples_per_shard,
        meta=meta,
        total=len(labels),
        progress=progress,
    )
