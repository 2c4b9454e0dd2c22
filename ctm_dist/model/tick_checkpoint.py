"""Gradient checkpointing over ticks.

The tick loop keeps every tick's activations for backward; with long thought (T = 50..75) and
wide neuron-level models that dominates memory. ``run_ticks`` runs the loop in segments of
``segment`` ticks under ``torch.utils.checkpoint`` (non-reentrant: it works when weights are
reused across ticks and under DeepSpeed ZeRO). It keeps each segment's input state and the
outputs of the matrix multiplications (small: batch x layer width), and recomputes the rest
during backward: the neuron-level models, whose per-neuron hidden activations are what fill
memory, and the cheap elementwise work. The RNG state is restored for the recomputation, so
dropout masks and gradients are those of the plain loop.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

# matmul outputs are kept (cheap to hold, expensive to recompute); everything else is recomputed
SAVED_OPS = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default]


def _run_segment(tick: Callable, state: Any, context: Any, n_ticks: int,
                 around: Callable[[], ContextManager]) -> tuple[Any, list]:
    outputs = []
    with around():
        for _ in range(n_ticks):
            state, out = tick(state, context)
            outputs.append(out)
    return state, outputs


def run_ticks(tick: Callable, state: Any, context: Any, n_ticks: int, segment: int = 0,
              around_segment: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[Any, list]:
    """Apply ``tick(state, context) -> (state, output)`` ``n_ticks`` times; return final state, outputs.

    ``around_segment()`` is entered around every run of a segment, recomputations included.
    """
    if segment <= 0 or not torch.is_grad_enabled():
        return _run_segment(tick, state, context, n_ticks, around_segment)
    outputs: list = []
    keep_matmuls = functools.partial(create_selective_checkpoint_contexts, SAVED_OPS)
    for start in range(0, n_ticks, segment):
        state, segment_outputs = checkpoint(_run_segment, tick, state, context, min(segment, n_ticks - start),
                                            around_segment, use_reentrant=False, context_fn=keep_matmuls)
        outputs.extend(segment_outputs)
    return state, outputs
