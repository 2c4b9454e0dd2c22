"""Per-task decoding of one shard sample into ``(input, target)`` tensors.

``make_decoder(task, train, meta, ...)`` returns a ``Decoder``: ``decoder(sample, rng)`` maps a
webdataset sample dict (``__key__`` plus raw byte fields) to tensors, or raises ``BadSample``
(undecodable image, missing or out-of-range label, malformed route), which the reader skips and
counts or, in strict mode, reports with the shard and key.

Every image is opened lazily and its header's size checked against the task's pixel limit
(``MAX_PIXELS``) before any pixel is decoded: a small file can declare a huge image (a 140 KB PNG
of 12000x12000 pixels inflates to 144 MB in grey, 432 MB in RGB), and Pillow's own limit only warns
below 179 megapixels. Such a sample raises ``ImageTooLarge`` and is skipped as
``skipped_image_too_large``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ctm_dist.model.config import MAZE_ROUTE_LENGTH

from . import transforms as T

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
IMAGE_TASKS = ("imagenet", "demo", "cifar10")
DEFAULT_IMAGE_SIZE = 224
DEFAULT_ROUTE_LENGTH = MAZE_ROUTE_LENGTH
# Pixels (width * height) an image of each task may declare. demo and cifar10 shards hold images
# at the model's input size (32x32); generated mazes are at most 99x99; ImageNet photos are a few
# megapixels, and a 64-megapixel limit still admits an 8000x8000 one.
MAX_PIXELS = {"demo": 2**20, "cifar10": 2**20, "mazes": 2**22, "imagenet": 64_000_000}


class BadSample(ValueError):
    """A sample that cannot be turned into tensors; the message says why, ``reason`` names its counter."""

    reason = "bad_sample"


class ImageTooLarge(BadSample):
    """An image whose declared size is over the task's pixel limit (a decompression bomb or a mistake)."""

    reason = "image_too_large"


def _image_bytes(sample: dict[str, Any]) -> bytes:
    data = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
    if data is None:
        raise BadSample(f"no image field (one of {', '.join(IMAGE_FIELDS)})")
    return data


def _undecodable(e: Exception) -> BadSample:
    return BadSample(f"undecodable image: {type(e).__name__}: {e}")


def _open_lazily(data: bytes, max_pixels: int) -> Image.Image:
    """The image in ``data`` with only its header read, refused if it declares over ``max_pixels``."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit: refused by Pillow
        raise ImageTooLarge(f"image too large: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        raise _undecodable(e) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image of {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} pixels"
        )
    return img


def _open_image(sample: dict[str, Any], max_pixels: int) -> Image.Image:
    """The sample's image, decoded, in RGB."""
    img = _open_lazily(_image_bytes(sample), max_pixels)
    try:
        img.load()
        return img.convert("RGB") if img.mode != "RGB" else img
    except Exception as e:  # PIL raises many types for broken files
        raise _undecodable(e) from None


def _label(sample: dict[str, Any], num_classes: int | None) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise BadSample("no .cls label")
    try:
        label = int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        raise BadSample(f"label {raw[:20]!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise BadSample(f"label {label} is outside [0, {num_classes})")
    return label


@dataclass
class Decoder:
    """Base: subclasses implement ``__call__`` and ``blank`` (zero tensors of the output shapes)."""

    train: bool

    def __call__(
        self, sample: dict[str, Any], rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def blank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Zero input/target of the right shapes, if known without data (for masked slots)."""
        return None


@dataclass
class ClassificationDecoder(Decoder):
    """ImageNet-format samples (imagenet, demo, cifar10): image + class index."""

    task: str = "imagenet"
    image_size: int = DEFAULT_IMAGE_SIZE
    num_classes: int | None = None
    mean: tuple = T.IMAGENET_MEAN
    std: tuple = T.IMAGENET_STD
    flip: bool = True
    crop_scale: tuple = (0.08, 1.0)
    max_pixels: int = MAX_PIXELS["imagenet"]

    def __call__(self, sample, rng):
        label = _label(sample, self.num_classes)
        size = self.image_size
        img = _open_lazily(
            _image_bytes(sample), self.max_pixels
        )  # crops can pick a cheaper JPEG scale
        try:
            if self.task == "cifar10":
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                if self.train:
                    img = T.autoaugment_cifar10(img, rng)
            elif self.train:
                img = T.random_resized_crop(img, size, rng, scale=self.crop_scale)
                if self.flip and rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                img = T.center_crop(T.resize_shorter(img, int(size * 256 / 224)), size)
            x = T.to_tensor(img, self.mean, self.std)
        except Exception as e:  # PIL raises many types for broken files
            raise _undecodable(e) from None
        return x, torch.tensor(label, dtype=torch.long)

    def blank(self):
        return (torch.zeros(3, self.image_size, self.image_size), torch.tensor(0, dtype=torch.long))


@dataclass
class MazeDecoder(Decoder):
    """Maze samples: ``.png`` + ``.json`` route; training applies turn/flip augmentation."""

    route_length: int = DEFAULT_ROUTE_LENGTH
    image_size: int | None = None
    augment_p: float = 0.5
    max_pixels: int = MAX_PIXELS["mazes"]

    def __call__(self, sample, rng):
        if "json" not in sample:
            raise BadSample("no .json with the route")
        try:
            doc = json.loads(sample["json"])
            route = np.asarray(doc["route"], dtype=np.int64)
        except (ValueError, KeyError, TypeError) as e:
            raise BadSample(f"malformed route json: {type(e).__name__}: {e}") from None
        if route.ndim != 1 or route.size == 0 or route.min() < 0 or route.max() > T.WAIT:
            raise BadSample("route moves must be integers in 0..4")
        route = np.concatenate(
            [
                route[: self.route_length],
                np.full(max(0, self.route_length - route.size), T.WAIT, np.int64),
            ]
        )
        image = np.asarray(_open_image(sample, self.max_pixels), dtype=np.uint8)
        if image.shape[0] != image.shape[1]:
            raise BadSample(f"maze image is not square: {image.shape[:2]}")
        if self.train:
            image, route = T.maze_augment(image, route, rng, self.augment_p)
        return T.maze_to_tensor(image), torch.from_numpy(np.ascontiguousarray(route))

    def blank(self):
        if not self.image_size:
            return None
        return (
            torch.zeros(3, self.image_size, self.image_size),
            torch.full((self.route_length,), T.WAIT, dtype=torch.long),
        )


def make_decoder(
    task: str,
    train: bool,
    meta: dict[str, Any] | None = None,
    *,
    image_size: int | None = None,
    route_length: int | None = None,
    max_pixels: int | None = None,
) -> Decoder:
    """The decoder for ``task`` with sizes from the arguments, else the index meta, else defaults.

    For ``imagenet`` the meta ``image_size`` is the stored (pre-crop) size and is not used as the
    crop size; ``demo`` and ``cifar10`` shards store images at the model's input size.
    ``max_pixels`` overrides the task's ``MAX_PIXELS``.
    """
    meta = meta or {}
    num_classes = meta.get("num_classes")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    limit = max_pixels or MAX_PIXELS.get(task, 0)
    if task in IMAGE_TASKS:
        if image_size is None:
            image_size = meta.get("image_size") if task in ("demo", "cifar10") else None
            image_size = int(image_size or (32 if task == "cifar10" else DEFAULT_IMAGE_SIZE))
        if task == "cifar10":
            return ClassificationDecoder(
                train,
                task,
                image_size,
                num_classes,
                T.CIFAR10_MEAN,
                T.CIFAR10_STD,
                max_pixels=limit,
            )
        if (
            task == "demo"
        ):  # small digits: milder crops and no flip (digits are not mirror-symmetric)
            return ClassificationDecoder(
                train,
                task,
                image_size,
                num_classes,
                flip=False,
                crop_scale=(0.35, 1.0),
                max_pixels=limit,
            )
        return ClassificationDecoder(train, task, image_size, num_classes, max_pixels=limit)
    if task == "mazes":
        length = int(route_length or meta.get("route_length") or DEFAULT_ROUTE_LENGTH)
        return MazeDecoder(train, length, image_size or meta.get("image_size"), max_pixels=limit)
    raise ValueError(
        f"unknown task {task!r} for shard decoding (known: {', '.join(IMAGE_TASKS)}, mazes)"
    )
