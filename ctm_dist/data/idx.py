"""Reading the IDX files MNIST is distributed in (``train-images-idx3-ubyte`` and friends, gzipped or not).

An IDX file is two zero bytes, a type code, the number of dimensions, each dimension as a
big-endian uint32, then the values in row-major order, big-endian. Everything is checked against
the file's length, so a truncated, padded or foreign file fails with one line naming it.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

# IDX type code -> big-endian numpy dtype
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
MAX_BYTES = 2**31  # far above MNIST's 47 MB: a header claiming more is not an MNIST file

# (images, labels) file stems of each MNIST split, as distributed
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IDXError(ValueError):
    """An IDX file that cannot be read; the message names the file and what is wrong."""


def _raw_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(f"{path}: not a readable gzip file ({err})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array an IDX file holds (native byte order); ``IDXError`` if the file is not valid IDX."""
    path = Path(path)
    data = _raw_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise IDXError(f"{path}: not an IDX file (its first bytes are {data[:4].hex() or 'empty'})")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        raise IDXError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise IDXError(f"{path}: IDX header gives no dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise IDXError(
            f"{path}: {what}: header says shape {shape} of {dtype.name} ({expected} bytes), "
            f"the file holds {len(data)}"
        )
    values = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def find_mnist_file(directory: str | os.PathLike, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``directory`` (or its ``MNIST/raw``, torchvision's layout)."""
    directory = Path(directory)
    for folder in (directory, directory / "MNIST" / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (folder / name).is_file():
                return folder / name
    raise IDXError(f"{directory}: no {stem} (or {stem}.gz): is this an MNIST directory?")


def read_mnist(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W] uint8, labels [N] int64) of MNIST's ``train`` or ``test`` split."""
    image_stem, label_stem = MNIST_FILES[split]
    image_path = find_mnist_file(directory, image_stem)
    label_path = find_mnist_file(directory, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXError(
            f"{image_path}: expected unsigned bytes of shape [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IDXError(
            f"{label_path}: expected unsigned bytes of shape [N], got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise IDXError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() > 9:
        raise IDXError(f"{label_path}: labels must be digits 0-9, found {int(labels.max())}")
    return images, labels.astype(np.int64)
