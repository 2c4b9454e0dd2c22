"""Gradient checkpointing over ticks.

The tick loop keeps every tick's activations for backward; with long thought (T = 50..75) and
wide neuron-level models that dominates memory. ``run_ticks`` runs the loop in segments of
``segment`` ticks under ``torch.utils.checkpoint`` (non-reentrant: it works when weights are
reused across ticks and under DeepSpeed ZeRO). Only each segment's input state is kept; the
segment is recomputed during backward with the RNG state restored, so dropout masks and
gradients are those of the plain loop.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def _run_segment(tick: Callable, state: Any, context: Any, n_ticks: int) -> tuple[Any, list]:
    outputs = []
    for _ in range(n_ticks):
        state, out = tick(state, context)
        outputs.append(out)
    return state, outputs


def run_ticks(tick: Callable, state: Any, context: Any, n_ticks: int, segment: int = 0) -> tuple[Any, list]:
    """Apply ``tick(state, context) -> (state, output)`` ``n_ticks`` times; return final state, outputs."""
    if segment <= 0 or not torch.is_grad_enabled():
        return _run_segment(tick, state, context, n_ticks)
    outputs: list = []
    for start in range(0, n_ticks, segment):
        state, segment_outputs = checkpoint(_run_segment, tick, state, context, min(segment, n_ticks - start),
                                            use_reentrant=False)
        outputs.extend(segment_outputs)
    return state, outputs
