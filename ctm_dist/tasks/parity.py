"""Parity: the cumulative parity of +-1 sequences, generated on the fly (no shard set).

The model answers every position with 2 logits per tick; training scores per-position and
whole-sequence accuracy at the judged tick (the most certain one; the LSTM baseline's last, as the
reference trains it), offline evaluation with the same ``accumulate`` and per position and per tick.
"""

from __future__ import annotations

import torch

from ctm_dist.data.parity import ParityLoader
from ctm_dist.losses import (
    as_sequence_predictions,
    parity_accuracy,
    parity_loss,
    per_position_accuracy,
    per_tick,
    per_tick_accuracy,
    sequence_all_correct,
)
from ctm_dist.model import PARITY_SEQUENCE_LENGTH, kind_of, model_config

from .base import GeneratedTask, sequence_loss_per_tick
from .sums import Measure


class ParityStats(Measure):
    """Accuracy per position and per tick, and at the judged tick, as sums.

    ``Parity.accumulate`` adds the sums training has (per-position mean and whole-sequence
    accuracy at the judged tick, accuracy per tick); ``most_certain`` False judges the last tick.
    """

    shape = ("ticks", "length", "most_certain")

    def __init__(self, ticks: int, length: int, most_certain: bool = True):
        super().__init__()
        self.ticks, self.length, self.most_certain = ticks, length, most_certain

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        B, D, T = predictions.shape
        seq = predictions.float().cpu().reshape(B, D // 2, 2, T)  # [B, L, 2, T]
        targets = targets.long().cpu().reshape(B, -1)
        if (seq.shape[1], T) != (self.length, self.ticks):
            raise ValueError(
                f"expected {self.length} positions x {self.ticks} ticks, got {seq.shape[1]} x {T}"
            )
        # the tick training's loss judges at
        _, tick = parity_loss(
            seq, certainties.float().cpu(), targets, use_most_certain=self.most_certain
        )
        Parity.accumulate(self.sums, seq, targets, torch.ones(B), tick)
        add = self.sums.add
        add("hits", per_tick(per_position_accuracy, seq, targets, reduction="sum"))  # [T, L]
        add("hits_judged", per_position_accuracy(seq, targets, tick, reduction="sum"))  # [L]
        add("samples", B)

    def summary(self) -> dict:
        n = max(self.n, 1)
        s = self.sums
        return {
            "samples": self.n,
            "ticks": self.ticks,
            "length": self.length,
            "accuracy_per_position_per_tick": (s["hits"].T / n).tolist(),
            "accuracy_per_tick": (s["per_tick_correct"] / n).tolist(),
            "accuracy_per_position": (s["hits_judged"] / n).tolist(),
            "accuracy": float(s["correct"][0] / n),
            "sequence_accuracy": float(s["all_correct"][0] / n),
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

    @classmethod
    def accumulate(cls, sums, predictions, target, valid, tick, eval=False):
        """A class method: ``ParityStats`` counts offline with it."""
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
        length, most_certain = cls.target_length(model_cfg), kind_of(model_cfg) == "ctm"
        return {"parity": ParityStats(model_cfg.iterations, length, most_certain)}

    @classmethod
    def per_tick_loss(cls, predictions, targets):
        return sequence_loss_per_tick(predictions, targets, 2)
