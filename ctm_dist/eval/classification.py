"""Classification metrics over ticks, kept as sums so that workers' results merge by addition.

For every tick t the CTM's answer can be read four ways, each using only ticks 0..t:
``instant`` (the logits of tick t), ``most_certain`` (the tick of highest certainty so far),
``mean_logits`` (logits averaged over ticks) and ``certainty_weighted`` (logits weighted by
certainty). Each is scored top-1 and top-5. Calibration is the expected calibration error
of the softmax confidence at each tick and at the most-certain tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

READOUTS = ("instant", "most_certain", "mean_logits", "certainty_weighted")
TOPK = (1, 5)


def readout_logits(predictions: torch.Tensor, certainties: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits [B, C, T] for each readout, where column t uses ticks 0..t only."""
    B, C, T = predictions.shape
    ticks = torch.arange(1, T + 1, device=predictions.device, dtype=predictions.dtype)
    cumsum = predictions.cumsum(-1)
    certainty = certainties[:, 1, :].to(predictions.dtype)  # [B, T]
    weighted = (predictions * certainty[:, None, :]).cumsum(-1)
    running_best = torch.cummax(certainty, dim=-1).indices  # [B, T]: most certain tick within 0..t
    most_certain = torch.gather(predictions, 2, running_best[:, None, :].expand(B, C, T))
    return {
        "instant": predictions,
        "most_certain": most_certain,
        "mean_logits": cumsum / ticks,
        "certainty_weighted": weighted,
    }


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T] booleans: the target is among the k largest logits at each tick."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # [B, k, T]
    return (top == targets[:, None, None]).any(1)


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> np.ndarray:
    """[n_bins, 3] rows of (count, sum of confidence, sum of correct) for one tick."""
    idx = (confidence.clamp(0, 1) * n_bins).long().clamp(max=n_bins - 1)
    out = torch.zeros(n_bins, 3, dtype=torch.float64)
    out[:, 0].index_add_(0, idx, torch.ones_like(confidence, dtype=torch.float64))
    out[:, 1].index_add_(0, idx, confidence.double())
    out[:, 2].index_add_(0, idx, correct.double())
    return out.numpy()


def expected_calibration_error(bins: np.ndarray) -> float:
    """ECE from [n_bins, 3] (count, sum confidence, sum correct) rows."""
    total = bins[:, 0].sum()
    if total == 0:
        return float("nan")
    return float(np.abs(bins[:, 1] - bins[:, 2]).sum() / total)


@dataclass
class ClassificationStats:
    """Running sums for one evaluation; ``update`` per batch, ``merge`` across workers."""

    ticks: int
    n_bins: int = 15
    n: int = 0
    hits: dict = field(default_factory=dict)  # "readout/topk" -> [T] counts
    loss_sum: np.ndarray | None = None  # [T] summed cross-entropy
    certainty_sum: np.ndarray | None = None  # [T]
    most_certain_tick_counts: np.ndarray | None = None  # [T] histogram
    calib_per_tick: np.ndarray | None = None  # [T, n_bins, 3]
    calib_most_certain: np.ndarray | None = None  # [n_bins, 3]

    def __post_init__(self):
        T = self.ticks
        for r in READOUTS:
            for k in TOPK:
                self.hits.setdefault(f"{r}/top{k}", np.zeros(T))
        zeros = lambda *s: np.zeros(s)  # noqa: E731
        self.loss_sum = zeros(T) if self.loss_sum is None else self.loss_sum
        self.certainty_sum = zeros(T) if self.certainty_sum is None else self.certainty_sum
        if self.most_certain_tick_counts is None:
            self.most_certain_tick_counts = zeros(T)
        if self.calib_per_tick is None:
            self.calib_per_tick = zeros(T, self.n_bins, 3)
        if self.calib_most_certain is None:
            self.calib_most_certain = zeros(self.n_bins, 3)

    @torch.no_grad()
    def update(
        self, predictions: torch.Tensor, certainties: torch.Tensor, targets: torch.Tensor
    ) -> None:
        predictions = predictions.float().cpu()
        certainties = certainties.float().cpu()
        targets = targets.long().cpu().view(-1)
        B, C, T = predictions.shape
        if T != self.ticks:
            raise ValueError(f"expected {self.ticks} ticks, got predictions with {T}")
        for name, logits in readout_logits(predictions, certainties).items():
            for k in TOPK:
                self.hits[f"{name}/top{k}"] += topk_hits(logits, targets, k).sum(0).double().numpy()
        loss = F.cross_entropy(
            predictions, targets[:, None].expand(B, T), reduction="none"
        )  # [B, T]
        self.loss_sum += loss.sum(0).double().numpy()
        self.certainty_sum += certainties[:, 1].sum(0).double().numpy()
        best = certainties[:, 1].argmax(-1)
        self.most_certain_tick_counts += np.bincount(best.numpy(), minlength=T)
        probs = predictions.softmax(1)
        conf, pred = probs.max(1)  # [B, T]
        correct = pred == targets[:, None]
        for t in range(T):
            self.calib_per_tick[t] += calibration_bins(conf[:, t], correct[:, t], self.n_bins)
        rows = torch.arange(B)
        self.calib_most_certain += calibration_bins(
            conf[rows, best], correct[rows, best], self.n_bins
        )
        self.n += B

    def merge(self, other: ClassificationStats) -> ClassificationStats:
        if other.ticks != self.ticks or other.n_bins != self.n_bins:
            raise ValueError("cannot merge statistics of different shapes")
        for key in self.hits:
            self.hits[key] = self.hits[key] + other.hits[key]
        self.loss_sum = self.loss_sum + other.loss_sum
        self.certainty_sum = self.certainty_sum + other.certainty_sum
        self.most_certain_tick_counts = (
            self.most_certain_tick_counts + other.most_certain_tick_counts
        )
        self.calib_per_tick = self.calib_per_tick + other.calib_per_tick
        self.calib_most_certain = self.calib_most_certain + other.calib_most_certain
        self.n += other.n
        return self

    def accuracy(self, readout: str, k: int) -> np.ndarray:
        """[T] accuracy of a readout at each tick (using ticks up to that one)."""
        return self.hits[f"{readout}/top{k}"] / max(self.n, 1)

    def summary(self) -> dict:
        n = max(self.n, 1)
        T = self.ticks
        out: dict = {"samples": self.n, "ticks": T}
        for r in READOUTS:
            for k in TOPK:
                acc = self.accuracy(r, k)
                out[f"{r}_top{k}_per_tick"] = acc.tolist()
                out[f"{r}_top{k}"] = float(acc[-1])  # using all ticks
        out["loss_per_tick"] = (self.loss_sum / n).tolist()
        out["certainty_per_tick"] = (self.certainty_sum / n).tolist()
        out["most_certain_tick_histogram"] = self.most_certain_tick_counts.astype(int).tolist()
        out["ece_per_tick"] = [expected_calibration_error(self.calib_per_tick[t]) for t in range(T)]
        out["ece_last_tick"] = out["ece_per_tick"][-1]
        out["ece_most_certain"] = expected_calibration_error(self.calib_most_certain)
        out["reliability_most_certain"] = reliability(self.calib_most_certain)
        return out


def reliability(bins: np.ndarray) -> list[dict]:
    """Per-bin mean confidence and accuracy (bins with samples only), for a reliability plot."""
    n_bins = bins.shape[0]
    rows = []
    for i, (count, conf, corr) in enumerate(bins):
        if count > 0:
            rows.append(
                {
                    "low": i / n_bins,
                    "high": (i + 1) / n_bins,
                    "count": int(count),
                    "confidence": float(conf / count),
                    "accuracy": float(corr / count),
                }
            )
    return rows
