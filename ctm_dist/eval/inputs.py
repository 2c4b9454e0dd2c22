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

from ctm_dist.data.reader import ShardLoader
from ctm_dist.tasks import TASKS, get_task


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
    if task not in TASKS:
        return None
    pipeline = get_task(task).input_pipeline(meta or {}, image_size)
    return InputSpec(task, *pipeline) if pipeline else None


def trained_inputs(commit: dict, meta: dict | None = None) -> dict | None:
    """The input pipeline recorded by a run's COMMIT marker (its training config), as a dict."""
    data = (commit.get("config") or {}).get("data") or {}
    task, size = commit.get("task") or data.get("task"), int(data.get("image_size") or 0) or None
    sized_by_shards = task in TASKS and get_task(task).image_size_from_shards
    if sized_by_shards and not size and not (meta or {}).get("image_size"):
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


def image_file_tensor(path: str | os.PathLike, spec: InputSpec) -> torch.Tensor:
    """One image file through the model's evaluation transform ([3, H, W]); ValueError if it is no image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not an image file") from None
    return get_task(spec.task).image_tensor(
        os.fspath(path), data, spec.image_size, spec.mean, spec.std
    )


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
        decoder_factory=get_task(task).decoder if task in TASKS else None,
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
    return get_task(task).display_rgb(x)


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
