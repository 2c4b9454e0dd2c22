"""Parity: the cumulative parity of +-1 sequences, generated on the fly (no shard set).

The model answers every position with 2 logits per tick; training scores per-position and
whole-sequence accuracy at the judged tick, offline evaluation per position and per tick.
"""

from __future__ import annotations

import torch

from ctm_dist.data.parity import ParityLoader
from ctm_dist.losses import (
    as_sequence_predictions,
    parity_accuracy,
    parity_loss,
    per_tick_accuracy,
    sequence_all_correct,
)
from ctm_dist.model import PARITY_SEQUENCE_LENGTH, model_config

from .base import GeneratedTask, sequence_loss_per_tick
from .sums import Measure


class ParityStats(Measure):
    """Accuracy per position and per tick, and at the most certain tick, as sums."""

    shape = ("ticks", "length")

    def __init__(self, ticks: int, length: int):
        super().__init__()
        self.ticks, self.length = ticks, length

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        B, D, T = predictions.shape
        answers = predictions.float().cpu().reshape(B, D // 2, 2, T).argmax(2)  # [B, L, T]
        targets = targets.long().cpu().reshape(B, -1)
        if answers.shape[1:] != (self.length, self.ticks):
            raise ValueError(
                f"expected {self.length} positions x {self.ticks} ticks, "
                f"got {tuple(answers.shape[1:])}"
            )
        correct = answers == targets[:, :, None]
        self.sums.add("hits", correct.sum(0))  # [L, T]
        best = certainties[:, 1].float().cpu().argmax(-1)
        chosen = correct[torch.arange(B), :, best]
        self.sums.add("hits_certain", chosen.sum(0))  # [L]
        self.sums.add("sequences_certain", chosen.all(1).sum())
        self.sums.add("samples", B)

    def summary(self) -> dict:
        n = max(self.n, 1)
        per = self.sums["hits"] / n
        return {
            "samples": self.n,
            "ticks": self.ticks,
            "length": self.length,
            "accuracy_per_position_per_tick": per.tolist(),
            "accuracy_per_tick": per.mean(0).tolist(),
            "accuracy_per_position": (self.sums["hits_certain"] / n).tolist(),
            "accuracy": float(self.sums["hits_certain"].mean() / n),
            "sequence_accuracy": float(self.sums["sequences_certain"][0] / n),
        }


def _preset_length(cfg) -> int:
    """The sequence length of the model preset (the reference's default where it has no [L, 2] output)."""
    shape = model_config(cfg.model.kind, cfg.model.preset).prediction_reshaper
    return (
        shape[0] if len(shape) == 2 and shape[1] == 2 and shape[0] > 0 else PARITY_SEQUENCE_LENGTH
    )


class Parity(GeneratedTask):
    """Parity loss; per-position and whole-sequence accuracy, per-tick accuracy."""

    name = "parity"
    loader_class = ParityLoader
    headline = {"train": "accuracy", "eval": "step_accuracy"}
    rates = {"sequence_accuracy": "all_correct", "per_tick_accuracy": "per_tick_correct"}
    launch_defaults = {
        "run": {"name": "parity", "max_steps": 200_000, "log_every": 100},
        "data": {"task": "parity", "batch_size": 64, "eval_batch_size": 256},
        "model": {"preset": "parity"},
        "optim": {"lr": 1e-4, "warmup_steps": 500, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "deepspeed": {"gradient_clipping": 0.9},
        "checkpoint": {"every": 10_000},
        "eval": {"every": 1000, "batches": 20},
    }
    run_presets = {
        # 16 positions: learns on two CPU cores in minutes (docs/small-presets.md)
        "parity-small": {
            "run": {"name": "parity-small", "max_steps": 1500, "log_every": 50},
            "data": {"batch_size": 64, "eval_batch_size": 256},
            "model": {"preset": "parity-small"},
            "optim": {"lr": 1e-3, "warmup_steps": 100, "min_lr": 1e-5, "warmup_start_lr": 1e-6},
            "deepspeed": {"gradient_clipping": 1.0},
            "checkpoint": {"every": 500},
            "eval": {"every": 250, "batches": 4},
        },
    }

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        length = cfg.model.overrides.get("sequence_length") or _preset_length(cfg)
        self.sequence_length = int(length)

    def data_overrides(self):
        return {"sequence_length": self.sequence_length}

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

    @classmethod
    def target_length(cls, model_cfg):
        length = model_cfg.prediction_reshaper[0]
        return length if length > 0 else model_cfg.out_dims // 2

    @classmethod
    def evaluation_loader(cls, model_cfg, data, req, rank, world_size):
        """``req.parity_samples`` sequences of ``req.parity_seed``, split over the workers."""
        return ParityLoader(
            cls.target_length(model_cfg),
            batch_size=req.batch_size,
            rank=rank,
            world_size=world_size,
            seed=req.parity_seed,
            samples_per_epoch=req.parity_samples,
        )

    @classmethod
    def evaluation_measures(cls, model_cfg, req):
        return {"parity": ParityStats(model_cfg.iterations, cls.target_length(model_cfg))}

    @classmethod
    def per_tick_loss(cls, predictions, targets):
        return sequence_loss_per_tick(predictions, targets, 2)
