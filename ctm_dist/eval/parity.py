"""Parity evaluation: accuracy per sequence position and per tick (sums that merge)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ParityStats:
    ticks: int
    length: int
    n: int = 0
    hits: np.ndarray | None = None  # [L, T]
    hits_certain: np.ndarray | None = None  # [L]
    sequences_certain: float = 0.0  # every position right at the most certain tick

    def __post_init__(self):
        if self.hits is None:
            self.hits = np.zeros((self.length, self.ticks))
        if self.hits_certain is None:
            self.hits_certain = np.zeros(self.length)

    @torch.no_grad()
    def update(self, predictions, certainties, targets) -> None:
        B, D, T = predictions.shape
        answers = predictions.float().cpu().reshape(B, D // 2, 2, T).argmax(2)  # [B, L, T]
        targets = targets.long().cpu().reshape(B, -1)
        if answers.shape[1:] != (self.length, self.ticks):
            raise ValueError(
                f"expected {self.length} positions x {self.ticks} ticks, got {tuple(answers.shape[1:])}"
            )
        correct = answers == targets[:, :, None]
        self.hits += correct.sum(0).double().numpy()
        best = certainties[:, 1].float().cpu().argmax(-1)
        chosen = correct[torch.arange(B), :, best]
        self.hits_certain += chosen.sum(0).double().numpy()
        self.sequences_certain += float(chosen.all(1).sum())
        self.n += B

    def merge(self, other: ParityStats) -> ParityStats:
        self.hits = self.hits + other.hits
        self.hits_certain = self.hits_certain + other.hits_certain
        self.sequences_certain += other.sequences_certain
        self.n += other.n
        return self

    def summary(self) -> dict:
        n = max(self.n, 1)
        per = self.hits / n
        return {
            "samples": self.n,
            "ticks": self.ticks,
            "length": self.length,
            "accuracy_per_position_per_tick": per.tolist(),
            "accuracy_per_tick": per.mean(0).tolist(),
            "accuracy_per_position": (self.hits_certain / n).tolist(),
            "accuracy": float(self.hits_certain.mean() / n),
            "sequence_accuracy": float(self.sequences_certain / n),
        }
