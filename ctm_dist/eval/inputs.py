"""A model's input pipeline and the inputs built with it: image files or the first samples of a shard
set, as model tensors, and back to displayable RGB.

The input pipeline (:class:`InputSpec`: task transform, image size, normalisation, channels) is part
of what a model was trained with. For a run it follows from the COMMIT marker's training config
(``data.image_size``, else the shard set's or the task's default, as the trainer's decoder chose);
an export keeps it in ``config.json`` under ``inputs``. Every evaluation tool uses it unless told
otherwise, so that a model sees at evaluation the images it saw in training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ctm_dist.data import transforms as T
from ctm_dist.data.decode import BadSample, ClassificationDecoder, make_decoder
from ctm_dist.data.reader import ShardLoader

CLASSIFICATION_TASKS = ("imagenet", "demo", "cifar10")


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model input: the evaluation transform of ``task`` at ``image_size``
    (None: the image's own size, mazes), then ``(x - mean) / std`` per channel."""

    task: str
    image_size: int | None
    mean: tuple
    std: tuple
    channels: int = 3

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        size = d.get("image_size")
        return cls(
            d["task"],
            int(size) if size else None,
            tuple(d["mean"]),
            tuple(d["std"]),
            int(d.get("channels", 3)),
        )


def task_inputs(
    task: str | None, meta: dict | None = None, image_size: int | None = None
) -> InputSpec | None:
    """The pipeline the trainer's decoder uses for ``task`` (sizes from ``image_size``, else the shard
    set's ``meta``, else the task's default); None for tasks without images (parity)."""
    if task not in (*CLASSIFICATION_TASKS, "mazes"):
        return None
    decoder = make_decoder(task, False, meta or {}, image_size=image_size)
    if task == "mazes":  # maze_to_tensor: [0, 1] -> [-1, 1]
        return InputSpec(task, decoder.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return InputSpec(task, decoder.image_size, tuple(decoder.mean), tuple(decoder.std))


def trained_inputs(commit: dict, meta: dict | None = None) -> dict | None:
    """The input pipeline recorded by a run's COMMIT marker (its training config), as a dict."""
    data = (commit.get("config") or {}).get("data") or {}
    task, size = commit.get("task") or data.get("task"), int(data.get("image_size") or 0) or None
    if task in ("demo", "cifar10") and not size and not (meta or {}).get("image_size"):
        return None  # sized by a shard set that cannot be read now: unknown, not guessed
    spec = task_inputs(task, meta, size)
    return spec.to_dict() if spec else None


def trained_data(commit: dict) -> str | None:
    """The URL of the shard set a run trained on (its validation split is the default evaluation data)."""
    data = (commit.get("config") or {}).get("data") or {}
    return data.get("url") or None


def model_meta(meta: dict, inputs: dict | None) -> dict:
    """Shard-set metadata as a model's: ``image_size`` is the model's input size, not the stored one."""
    if inputs and inputs.get("image_size"):
        return {**meta, "image_size": inputs["image_size"]}
    return dict(meta)


def input_spec(loaded, task: str | None = None, image_size: int | None = None) -> InputSpec | None:
    """The pipeline a tool feeds ``loaded`` with: the one saved with the model, or (reference
    checkpoints, exports without one, or another ``task``) the task's default; ``image_size`` overrides."""
    saved = InputSpec.from_dict(loaded.inputs) if getattr(loaded, "inputs", None) else None
    task = task or (saved.task if saved else None) or loaded.task
    if saved is not None and task == saved.task:
        return replace(saved, image_size=image_size or saved.image_size)
    return task_inputs(task, loaded.meta, image_size)


def norm_stats(task: str) -> tuple[tuple, tuple]:
    return (
        (T.CIFAR10_MEAN, T.CIFAR10_STD) if task == "cifar10" else (T.IMAGENET_MEAN, T.IMAGENET_STD)
    )


def image_file_tensor(path: str | os.PathLike, spec: InputSpec) -> torch.Tensor:
    """One image file through the model's evaluation transform ([3, H, W]); ValueError if it is no image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image file") from None
    if spec.task == "mazes":
        try:
            with Image.open(path) as img:
                return T.maze_to_tensor(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except Exception as e:  # PIL raises many types for files it cannot read
            raise ValueError(f"{path}: not an image ({type(e).__name__})") from None
    decoder = ClassificationDecoder(
        train=False, task=spec.task, image_size=spec.image_size, mean=spec.mean, std=spec.std
    )
    try:  # the trainer's own evaluation decoder, fed the file as a sample
        x, _ = decoder(
            {"__key__": os.fspath(path), "jpg": data, "cls": b"0"}, np.random.default_rng(0)
        )
    except BadSample:
        raise ValueError(f"{path}: not an image that can be decoded") from None
    return x


def image_files(
    paths: list[str], spec: InputSpec | str, image_size: int | None = None
) -> torch.Tensor:
    """Image files as a batch; ``spec`` may be a task name (its default pipeline at ``image_size``)."""
    if isinstance(spec, str):
        spec = task_inputs(spec, image_size=image_size)
    return torch.stack([image_file_tensor(p, spec) for p in paths])


def shard_samples(
    url: str,
    split: str,
    count: int,
    task: str | None = None,
    image_size: int | None = None,
    route_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(inputs, targets, task) of the first ``count`` valid samples of a split, evaluation transform."""
    loader = ShardLoader(
        url,
        split,
        task=task,
        batch_size=count,
        train=False,
        shuffle=False,
        image_size=image_size,
        route_length=route_length,
    )
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
        raise ValueError(
            f"cannot lay {L} attention tokens on a grid of the image's shape {image_hw}"
        )
    return att.reshape(att.shape[0], att.shape[1], h, L // h)
