"""Task plug-ins: each task says where its data comes from, which loss it trains and what it measures.

A task gives the trainer a model config (preset + overrides + what the data says, e.g. the number
of classes), a resumable training loader, an evaluation loader, the loss, and metric sums that
the trainer reduces over ranks and turns into numbers with ``summarise``.
"""

from __future__ import annotations

import torch

from ctm_dist.data.decode import DEFAULT_ROUTE_LENGTH
from ctm_dist.data.index import read_index
from ctm_dist.data.parity import ParityLoader
from ctm_dist.data.reader import ShardLoader
from ctm_dist.losses import (
    accuracy_at_most_certain,
    as_sequence_predictions,
    image_classification_loss,
    maze_loss,
    maze_route_accuracy,
    maze_step_accuracy,
    parity_accuracy,
    parity_loss,
    per_tick_accuracy,
    sequence_all_correct,
    topk_accuracy,
)
from ctm_dist.model import model_config
from ctm_dist.storage import Location
from ctm_dist.train.config import TrainConfig


class Task:
    """Base plug-in. Batches are dicts with ``input``, ``target`` and ``valid`` (0 = padding)."""

    name = ""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size

    @classmethod
    def preflight(cls, cfg: TrainConfig) -> None:
        """Run by the driver before any worker starts: raise a clear error for data that cannot work."""

    # --- model
    def data_overrides(self) -> dict:
        """CTMConfig fields the data decides (classes, route length...)."""
        return {}

    def model_config(self):
        values = self.data_overrides()
        values.update(self.cfg.model.overrides)
        return model_config(self.cfg.model.kind, self.cfg.model.preset, **values)

    # --- data
    def train_loader(self, batch_size: int, seed: int):
        raise NotImplementedError

    def eval_loader(self, batch_size: int):
        raise NotImplementedError

    def to_device(self, batch: dict, device: torch.device, dtype: torch.dtype):
        x = batch["input"].to(device, non_blocking=True)
        if x.is_floating_point():
            x = x.to(dtype)
        target = batch["target"].to(device, non_blocking=True)
        valid = batch.get("valid")
        valid = torch.ones(x.size(0), device=device) if valid is None else valid.to(device).float()
        return x, target, valid

    # --- objective and metrics
    def loss(self, predictions, certainties, target, valid):
        """(loss over valid samples, most-certain tick [B])."""
        raise NotImplementedError

    def accumulate(self, sums, predictions, target, valid, tick, eval: bool = False) -> None:
        raise NotImplementedError

    def summarise(self, reduced: dict, prefix: str) -> dict:
        raise NotImplementedError


# ---------------------------------------------------------------- shard-backed tasks


class ShardTask(Task):
    """A task whose data is a shard set (``{url}/{split}-*.tar`` + ``{split}.json``)."""

    train_split, eval_split = "train", "val"

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        self.location = self.data_location(cfg)
        self.meta = read_index(self.location, self.train_split).meta

    @staticmethod
    def data_location(cfg):
        return Location.parse(cfg.data.url, retry_deadline=cfg.run.storage_retry_deadline)

    @classmethod
    def preflight(cls, cfg):
        """Both splits' indexes must be readable (reachable store, right keys, shards written)."""
        location = cls.data_location(cfg)
        for split in (cls.train_split, cls.eval_split):
            read_index(location, split)

    def _loader(self, split: str, batch_size: int, train: bool, seed: int):
        image_size = self.cfg.data.image_size or None
        return ShardLoader(
            self.location,
            split,
            task=self.cfg.data.task,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            train=train,
            seed=seed,
            num_workers=self.cfg.data.num_workers,
            image_size=image_size,
            global_order=self.cfg.data.global_order,
        )

    def train_loader(self, batch_size, seed):
        return self._loader(self.train_split, batch_size, train=True, seed=seed)

    def eval_loader(self, batch_size):
        """The validation split from its start (the loader is built once and rewound)."""
        if getattr(self, "_eval", None) is None:
            self._eval = self._loader(
                self.eval_split, batch_size, train=False, seed=self.cfg.run.seed
            )
        self._eval.set_epoch(self._eval.epoch + 1)
        return self._eval


class Classification(ShardTask):
    """imagenet, cifar10, demo: certainty loss; top-1/top-5 at the most-certain tick, per-tick accuracy."""

    def data_overrides(self):
        out = {}
        if self.meta.get("num_classes"):
            out["out_dims"] = int(self.meta["num_classes"])
        return out

    def loss(self, predictions, certainties, target, valid):
        return image_classification_loss(predictions, certainties, target, weight=valid)

    def accumulate(self, sums, predictions, target, valid, tick, eval=False):
        sums.add(
            "correct",
            accuracy_at_most_certain(predictions, target, tick, weight=valid, reduction="sum"),
        )
        sums.add(
            "per_tick_correct",
            per_tick_accuracy(predictions, target, weight=valid, reduction="sum"),
        )
        if eval:
            sums.add(
                "top5", topk_accuracy(predictions, target, tick, k=5, weight=valid, reduction="sum")
            )

    def summarise(self, reduced, prefix):
        n = max(float(reduced["samples"][0]), 1.0)
        key = "top1" if prefix == "eval/" else "accuracy"
        out = {
            prefix + key: float(reduced["correct"][0]) / n,
            prefix + "per_tick_accuracy": [float(v) / n for v in reduced["per_tick_correct"]],
        }
        if "top5" in reduced:
            out[prefix + "top5"] = float(reduced["top5"][0]) / n
        return out


class Mazes(ShardTask):
    """Maze routes: loss with auto-curriculum; per-step and whole-route accuracy at the most-certain tick.

    The route length (a ``model.route_length`` override, else the shard set's, else the default) is
    settled once here, so the model's output and every loader's targets have the same length.
    """

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        length = cfg.model.overrides.get("route_length") or self.meta.get("route_length")
        self.route_length = int(length) if length else DEFAULT_ROUTE_LENGTH

    def data_overrides(self):
        return {"route_length": self.route_length}

    def _loader(self, split, batch_size, train, seed):
        return ShardLoader(
            self.location,
            split,
            task="mazes",
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            train=train,
            seed=seed,
            num_workers=self.cfg.data.num_workers,
            route_length=self.route_length,
            global_order=self.cfg.data.global_order,
        )

    def loss(self, predictions, certainties, target, valid):
        loss, tick, _ = maze_loss(predictions, certainties, target, weight=valid)
        return loss, tick

    def accumulate(self, sums, predictions, target, valid, tick, eval=False):
        seq = as_sequence_predictions(predictions, target)
        sums.add("correct", maze_step_accuracy(seq, target, tick, weight=valid, reduction="sum"))
        sums.add("route", maze_route_accuracy(seq, target, tick, weight=valid, reduction="sum"))
        sums.add("per_tick_correct", per_tick_accuracy(seq, target, weight=valid, reduction="sum"))

    def summarise(self, reduced, prefix):
        n = max(float(reduced["samples"][0]), 1.0)
        return {
            prefix + ("step_accuracy" if prefix == "eval/" else "accuracy"): float(
                reduced["correct"][0]
            )
            / n,
            prefix + "route_accuracy": float(reduced["route"][0]) / n,
            prefix + "per_tick_accuracy": [float(v) / n for v in reduced["per_tick_correct"]],
        }


# ---------------------------------------------------------------- generated data


class Parity(Task):
    """Cumulative parity of +-1 sequences, generated on the fly (no shards)."""

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        length = cfg.model.overrides.get("sequence_length") or _preset_sequence_length(cfg)
        self.sequence_length = int(length)

    def data_overrides(self):
        return {"sequence_length": self.sequence_length}

    def train_loader(self, batch_size, seed):
        return ParityLoader(
            self.sequence_length,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
        )

    def eval_loader(self, batch_size):
        """Held-out sequences (another seed), the same ones at every evaluation."""
        batches = self.cfg.eval.batches or 8
        loader = ParityLoader(
            self.sequence_length,
            batch_size=batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.run.seed + 7919,
            samples_per_epoch=batches * batch_size * self.world_size,
        )
        return loader

    def loss(self, predictions, certainties, target, valid):
        # the reference trains its LSTM baseline on the last tick rather than the most certain one
        most_certain = self.cfg.model.kind == "ctm"
        return parity_loss(
            predictions, certainties, target, use_most_certain=most_certain, weight=valid
        )

    def accumulate(self, sums, predictions, target, valid, tick, eval=False):
        seq = as_sequence_predictions(predictions, target)
        sums.add("correct", parity_accuracy(seq, target, tick, weight=valid, reduction="sum"))
        sums.add(
            "all_correct", sequence_all_correct(seq, target, tick, weight=valid, reduction="sum")
        )
        sums.add("per_tick_correct", per_tick_accuracy(seq, target, weight=valid, reduction="sum"))

    def summarise(self, reduced, prefix):
        n = max(float(reduced["samples"][0]), 1.0)
        return {
            prefix + ("step_accuracy" if prefix == "eval/" else "accuracy"): float(
                reduced["correct"][0]
            )
            / n,
            prefix + "sequence_accuracy": float(reduced["all_correct"][0]) / n,
            prefix + "per_tick_accuracy": [float(v) / n for v in reduced["per_tick_correct"]],
        }


def _preset_sequence_length(cfg: TrainConfig) -> int:
    """The sequence length of the model preset (64 where the preset has no [L, 2] output)."""
    shape = model_config(cfg.model.kind, cfg.model.preset).prediction_reshaper
    return shape[0] if len(shape) == 2 and shape[1] == 2 and shape[0] > 0 else 64


TASKS = {
    "demo": Classification,
    "imagenet": Classification,
    "cifar10": Classification,
    "mazes": Mazes,
    "parity": Parity,
}


def preflight(cfg: TrainConfig) -> None:
    """Fail in the driver, before Ray starts (and retries) workers, on storage or data that cannot work."""
    Location.parse(cfg.run.storage, retry_deadline=cfg.run.storage_retry_deadline).check()
    TASKS[cfg.data.task].preflight(cfg)


def make_task(cfg: TrainConfig, rank: int, world_size: int) -> Task:
    return TASKS[cfg.data.task](cfg, rank, world_size)
