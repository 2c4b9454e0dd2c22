"""Inputs for pictures and predictions: image files or the first samples of a shard set, as model tensors,
and back to displayable RGB."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ctm_dist.data import transforms as T

CLASSIFICATION_TASKS = ("imagenet", "demo", "cifar10")


def norm_stats(task: str) -> tuple[tuple, tuple]:
    return (T.CIFAR10_MEAN, T.CIFAR10_STD) if task == "cifar10" else (T.IMAGENET_MEAN, T.IMAGENET_STD)


def image_file_tensor(path: str | os.PathLike, task: str, image_size: int) -> torch.Tensor:
    """One image file as the evaluation transform of ``task`` makes it ([3, H, W])."""
    img = Image.open(path)
    if task == "mazes":
        return T.maze_to_tensor(np.asarray(img.convert("RGB"), dtype=np.uint8))
    img = img.convert("RGB")
    if task in ("demo", "cifar10"):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    else:
        img = T.center_crop(T.resize_shorter(img, int(image_size * 256 / 224)), image_size)
    mean, std = norm_stats(task)
    return T.to_tensor(img, mean, std)


def image_files(paths: list[str], task: str, image_size: int) -> torch.Tensor:
    return torch.stack([image_file_tensor(p, task, image_size) for p in paths])


def shard_samples(url: str, split: str, count: int, task: str | None = None, image_size: int | None = None,
                  route_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, targets, task) of the first ``count`` valid samples of a split, evaluation transform."""
    from ctm_dist.data.reader import ShardLoader

    loader = ShardLoader(url, split, task=task, batch_size=count, train=False, shuffle=False,
                         image_size=image_size, route_length=route_length)
    xs, ys = [], []
    for batch in loader:
        valid = batch["valid"].bool()
        xs.append(batch["input"][valid])
        ys.append(batch["target"][valid])
        if sum(len(x) for x in xs) >= count:
            break
    return torch.cat(xs)[:count], torch.cat(ys)[:count], loader.task


def display_rgb(x: torch.Tensor, task: str) -> np.ndarray:
    """A model input [3, H, W] back to RGB [H, W, 3] in [0, 1]."""
    arr = x.detach().float().cpu().numpy().transpose(1, 2, 0)
    if task == "mazes":
        return np.clip((arr + 1) / 2, 0, 1)
    if task in CLASSIFICATION_TASKS:
        mean, std = norm_stats(task)
        return np.clip(arr * np.asarray(std) + np.asarray(mean), 0, 1)
    lo, hi = arr.min(), arr.max()
    return (arr - lo) / (hi - lo + 1e-12)


def attention_maps(attention: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Tracked attention [T, B, heads, 1, L] -> [T, B, h, w] (heads averaged), the token grid
    taken with the image's aspect ratio."""
    att = attention.float().mean(2)[:, :, 0]  # [T, B, L]
    L = att.shape[-1]
    H, W = image_hw
    h = max(1, round((L * H / W) ** 0.5))
    if L % h:
        raise ValueError(f"cannot lay {L} attention tokens on a grid of the image's shape {image_hw}")
    return att.reshape(att.shape[0], att.shape[1], h, L // h)
