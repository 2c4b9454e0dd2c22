"""Image transforms in PIL/numpy/torch (torchvision is not a dependency).

Randomness comes from an explicit ``numpy.random.Generator`` so that every augmentation is a
function of (seed, epoch, shard, sample): a resumed run augments exactly as the interrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


# ---------------------------------------------------------------- geometry
def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random area fraction in ``scale`` with aspect ratio in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fall back to a central crop with the ratio clamped into range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draft(img: Image.Image, reduce: float) -> tuple[float, float]:
    """Let the JPEG decoder scale down by up to ``reduce`` (DCT scaling: far cheaper than decoding
    full size and resizing). Returns the (width, height) factors it actually applied (1.0 for
    non-JPEGs); they differ when a side is not a multiple of the DCT scale."""
    if getattr(img, "format", None) != "JPEG" or reduce < 2:
        return 1.0, 1.0
    width, height = img.size
    img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
    return width / img.size[0], height / img.size[1]


def random_resized_crop(
    img: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to size x size.
    ``img`` may be a lazily opened JPEG: it is then decoded at the smallest sufficient scale."""
    left, top, w, h = random_resized_crop_box(*img.size, rng, scale, ratio)
    fx, fy = draft(img, min(w, h) / size)
    img = img.convert("RGB") if img.mode != "RGB" else img
    box = (left / fx, top / fy, min((left + w) / fx, img.size[0]), min((top + h) / fy, img.size[1]))
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio (JPEGs: see ``draft``)."""
    draft(img, min(img.size) / size)
    img = img.convert("RGB") if img.mode != "RGB" else img
    width, height = img.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    if new == img.size:
        return img
    return img.resize(new, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """uint8 HWC image -> normalised float CHW tensor (numpy: no torch thread pool per sample)."""
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    offset = -np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) * scale + offset
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ---------------------------------------------------------------- AutoAugment (CIFAR-10 policy)
# The learned CIFAR-10 policy of Cubuk et al., "AutoAugment" (2019): 25 sub-policies of two
# (operation, probability, magnitude bin) steps; magnitudes are bins of 10.
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.4, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
_BINS = 10
_SIGNED = {
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
}


def _magnitude(op: str, level: int, width: int, height: int) -> float:
    frac = level / (_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * frac
    if op == "TranslateX":
        return 150.0 / 331.0 * width * frac
    if op == "TranslateY":
        return 150.0 / 331.0 * height * frac
    if op == "Rotate":
        return 30.0 * frac
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * frac
    if op == "Posterize":
        return float(8 - int(round(level / ((_BINS - 1) / 4))))
    if op == "Solarize":
        return 255.0 * (1.0 - frac)
    return 0.0


def _apply(img: Image.Image, op: str, m: float) -> Image.Image:
    affine = Image.Transform.AFFINE
    if op == "ShearX":
        return img.transform(
            img.size, affine, (1, m, 0, 0, 1, 0), Image.Resampling.NEAREST, fillcolor=0
        )
    if op == "ShearY":
        return img.transform(
            img.size, affine, (1, 0, 0, m, 1, 0), Image.Resampling.NEAREST, fillcolor=0
        )
    if op == "TranslateX":
        return img.transform(
            img.size, affine, (1, 0, -int(m), 0, 1, 0), Image.Resampling.NEAREST, fillcolor=0
        )
    if op == "TranslateY":
        return img.transform(
            img.size, affine, (1, 0, 0, 0, 1, -int(m)), Image.Resampling.NEAREST, fillcolor=0
        )
    if op == "Rotate":
        return img.rotate(m, resample=Image.Resampling.NEAREST, fillcolor=0)
    if op == "Brightness":
        return ImageEnhance.Brightness(img).enhance(1.0 + m)
    if op == "Color":
        return ImageEnhance.Color(img).enhance(1.0 + m)
    if op == "Contrast":
        return ImageEnhance.Contrast(img).enhance(1.0 + m)
    if op == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(1.0 + m)
    if op == "Posterize":
        return ImageOps.posterize(img, int(m))
    if op == "Solarize":
        return ImageOps.solarize(img, m)
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    raise ValueError(f"unknown AutoAugment operation {op!r}")


def autoaugment_cifar10(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One randomly chosen sub-policy of the CIFAR-10 AutoAugment policy."""
    policy = CIFAR10_POLICY[int(rng.integers(len(CIFAR10_POLICY)))]
    for op, prob, level in policy:
        if rng.random() < prob:
            m = _magnitude(op, level or 0, *img.size)
            if op in _SIGNED and rng.random() < 0.5:
                m = -m
            img = _apply(img, op, m)
    return img


# ---------------------------------------------------------------- mazes
UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
_DIRS = {UP: (-1, 0), DOWN: (1, 0), LEFT: (0, -1), RIGHT: (0, 1)}
_BY_VECTOR = {v: k for k, v in _DIRS.items()}


def _remap(route: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn`` (a map of (dy, dx) move vectors) to every move of ``route``; Wait stays."""
    table = np.arange(5)
    for code, vec in _DIRS.items():
        table[code] = _BY_VECTOR[fn(*vec)]
    return table[route]


def maze_augment(image: np.ndarray, route: np.ndarray, rng: np.random.Generator, p: float = 0.5):
    """Random quarter turn, left-right and up-down flips of an HWC maze, with the route remapped
    so that it still leads from the red start to the green end."""
    if rng.random() < p:
        k = 1 if rng.random() < 0.5 else -1
        image = np.rot90(image, k=k, axes=(0, 1))
        # np.rot90 with k=1 turns counter-clockwise: a move (dy, dx) becomes (-dx, dy).
        route = _remap(route, (lambda dy, dx: (-dx, dy)) if k == 1 else (lambda dy, dx: (dx, -dy)))
    if rng.random() < p:
        image = np.fliplr(image)
        route = _remap(route, lambda dy, dx: (dy, -dx))
    if rng.random() < p:
        image = np.flipud(image)
        route = _remap(route, lambda dy, dx: (-dy, dx))
    return np.ascontiguousarray(image), route


def maze_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 maze -> CHW float in [-1, 1], any drawn (blue) solution turned into corridor."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    blue = (x[0] == 0) & (x[1] == 0) & (x[2] == 1)
    x[:, blue] = 1.0
    return x.mul_(2.0).sub_(1.0)
