"""Adaptive compute: a sweep over certainty thresholds.

A sample halts at the first tick whose certainty reaches the threshold (or at the last tick)
and answers with that tick's prediction, the rule ``ctm_dist.inference.predict`` follows.
Accuracy and ticks used per threshold come from full-length runs (``HaltingStats``, sums that
merge across workers); the wall-time saving is measured by running ``predict``, which drops
finished samples from the batch, against running every tick (``time_halting``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ctm_dist.inference import predict

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)


def halting_ticks(certainty: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B] index of the first tick with certainty >= threshold, else the last tick."""
    reached = certainty >= threshold  # [B, T]
    T = certainty.shape[-1]
    first = torch.where(
        reached.any(-1),
        reached.float().argmax(-1),
        torch.full_like(reached[:, 0], T - 1, dtype=torch.long),
    )
    return first.long()


@dataclass
class HaltingStats:
    ticks: int
    thresholds: tuple = DEFAULT_THRESHOLDS
    n: int = 0
    correct: np.ndarray | None = None  # [n_thr]
    ticks_sum: np.ndarray | None = None  # [n_thr]
    ticks_hist: np.ndarray | None = None  # [n_thr, T]
    full_correct: float = 0.0  # at the last tick, all ticks used

    def __post_init__(self):
        self.thresholds = tuple(float(t) for t in self.thresholds)
        k = len(self.thresholds)
        if self.correct is None:
            self.correct = np.zeros(k)
        if self.ticks_sum is None:
            self.ticks_sum = np.zeros(k)
        if self.ticks_hist is None:
            self.ticks_hist = np.zeros((k, self.ticks))

    @torch.no_grad()
    def update(
        self, predictions: torch.Tensor, certainties: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """Classification outputs [B, C, T], [B, 2, T] and targets [B]."""
        predictions = predictions.float().cpu()
        certainty = certainties[:, 1].float().cpu()
        targets = targets.long().cpu().view(-1)
        B = predictions.shape[0]
        answers = predictions.argmax(1)  # [B, T]
        rows = torch.arange(B)
        for i, thr in enumerate(self.thresholds):
            t = halting_ticks(certainty, thr)
            self.correct[i] += float((answers[rows, t] == targets).sum())
            self.ticks_sum[i] += float((t + 1).sum())
            self.ticks_hist[i] += np.bincount(t.numpy(), minlength=self.ticks)
        self.full_correct += float((answers[:, -1] == targets).sum())
        self.n += B

    def merge(self, other: HaltingStats) -> HaltingStats:
        if other.thresholds != self.thresholds or other.ticks != self.ticks:
            raise ValueError("cannot merge halting sweeps over different thresholds or ticks")
        self.correct = self.correct + other.correct
        self.ticks_sum = self.ticks_sum + other.ticks_sum
        self.ticks_hist = self.ticks_hist + other.ticks_hist
        self.full_correct += other.full_correct
        self.n += other.n
        return self

    def summary(self) -> dict:
        n = max(self.n, 1)
        full = self.full_correct / n
        rows = []
        for i, thr in enumerate(self.thresholds):
            mean_ticks = self.ticks_sum[i] / n
            rows.append(
                {
                    "threshold": thr,
                    "top1": float(self.correct[i] / n),
                    "top1_drop_points": float(100 * (full - self.correct[i] / n)),
                    "mean_ticks": float(mean_ticks),
                    "tick_saving": float(1 - mean_ticks / self.ticks),
                    "ticks_histogram": self.ticks_hist[i].astype(int).tolist(),
                }
            )
        return {
            "samples": self.n,
            "ticks": self.ticks,
            "top1_all_ticks": float(full),
            "sweep": rows,
        }


def best_threshold(summary: dict, max_drop_points: float = 1.0) -> dict | None:
    """The sweep row with the largest tick saving whose top-1 drop is within ``max_drop_points``."""
    ok = [r for r in summary["sweep"] if r["top1_drop_points"] <= max_drop_points]
    return max(ok, key=lambda r: r["tick_saving"]) if ok else None


def time_halting(
    model, batches: list[torch.Tensor], thresholds, max_ticks: int | None = None, repeats: int = 1
) -> dict:
    """Wall time of full runs versus ``predict`` at each threshold on the same batches.

    Settings are timed in rounds (each round runs them all) and the best of ``repeats`` rounds is
    kept, so that load changes hit every setting alike. The process CPU time is kept too: on a
    shared machine it is the steadier measure (equal to wall time when the process runs alone on
    its threads). ``start`` is what every run pays before the first tick (backbone and key/value
    projection, ``model.start``); ``tick_loop_saving`` is the saving on the rest.
    Returns {"full_s", "start_s", "full_cpu_s", "start_cpu_s", "repeats", "per_threshold": [{"threshold",
    "seconds", "saving", "tick_loop_saving", "cpu_seconds", "cpu_saving", "cpu_tick_loop_saving"}]}.
    """

    def once(fn) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for x in batches:
                fn(x)
        return time.perf_counter() - wall, time.process_time() - cpu

    runs = {"full": lambda x: model(x), "start": lambda x: model.start(x)}
    for thr in thresholds:
        runs[float(thr)] = lambda x, thr=thr: predict(
            model, x, certainty_threshold=thr, max_ticks=max_ticks
        )
    with torch.inference_mode():  # warm-up: allocator, kernels
        model(batches[0][:2])
    wall = {name: float("inf") for name in runs}
    cpu = dict(wall)
    for _ in range(repeats):  # rounds over all settings
        for name, fn in runs.items():
            w, c = once(fn)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)

    def saving(t: dict, name) -> tuple[float, float]:
        loop = max(t["full"] - t["start"], 1e-9)
        return 1 - t[name] / t["full"], 1 - (t[name] - t["start"]) / loop

    rows = []
    for thr in runs:
        if thr in ("full", "start"):
            continue
        (s, ls), (cs, cls) = saving(wall, thr), saving(cpu, thr)
        rows.append(
            {
                "threshold": thr,
                "seconds": wall[thr],
                "saving": s,
                "tick_loop_saving": ls,
                "cpu_seconds": cpu[thr],
                "cpu_saving": cs,
                "cpu_tick_loop_saving": cls,
            }
        )
    return {
        "full_s": wall["full"],
        "start_s": wall["start"],
        "full_cpu_s": cpu["full"],
        "start_cpu_s": cpu["start"],
        "repeats": repeats,
        "per_threshold": rows,
    }
