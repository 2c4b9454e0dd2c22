"""Adaptive compute: a sweep over certainty thresholds.

A sample halts at the first tick whose certainty reaches the threshold (or at the last tick)
and answers with that tick's prediction, the rule ``ctm_dist.inference.predict`` follows.
Accuracy and ticks used per threshold come from full-length runs
(:class:`ctm_dist.tasks.classification.HaltingStats`, sums that merge across workers); the
wall-time saving is measured by running ``predict``, which drops finished samples from the
batch, against running every tick (``time_halting``).
"""

from __future__ import annotations

import time

import torch

from ctm_dist.inference import predict


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
