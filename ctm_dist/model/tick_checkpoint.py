"""Gradient checkpointing over ticks.

The tick loop keeps every tick's activations for backward; with long thought (T = 50..75) and
wide neuron-level models that dominates memory. ``run_ticks`` runs the loop in segments of
``segment`` ticks under ``torch.utils.checkpoint`` (non-reentrant: it works when weights are
reused across ticks and under DeepSpeed ZeRO) and recomputes each segment during backward,
except for what its :class:`Tape` replays: the outputs of the matrix multiplications and of the
attention (small: batch x layer width, but most of a tick's forward time). What is recomputed
is the neuron-level models, whose per-neuron hidden activations are what fill memory, and the
cheap elementwise work. The RNG state is restored for the recomputation, so dropout masks and
gradients are those of the plain loop.

Ops take part through :func:`replayable`; the tick-summed layers of ``tick_grads.py`` and the
attention do. (A dispatch-mode policy, ``create_selective_checkpoint_contexts``, would do the
same for every op but costs tens of microseconds per op call, about a third of a step here.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

_active = threading.local()


class Tape:
    """The replayable outputs of one segment: recorded in its forward, handed back in its recomputation."""

    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.replaying = False
        self.position = 0

    def rewind(self) -> None:
        """Called at the start of every run of the segment: the second run replays the first."""
        self.replaying, self.position = bool(self.outputs), 0

    def take(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.replaying and self.position < len(self.outputs):
            self.position += 1
            return self.outputs[self.position - 1]
        out = compute()
        self.outputs.append(out.detach())
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.outputs)


def replayable(compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or inside a recomputed segment the tensor it gave the first time.

    Only for results that do not need autograd of their own (inside a custom Function's forward).
    """
    tape = getattr(_active, "tape", None)
    return compute() if tape is None else tape.take(compute)


@contextlib.contextmanager
def _recording(tape: Tape | None):
    previous = getattr(_active, "tape", None)
    _active.tape = tape
    if tape is not None:
        tape.rewind()
    try:
        yield
    finally:
        _active.tape = previous


def _run_segment(
    tick: Callable,
    state: Any,
    context: Any,
    n_ticks: int,
    around: Callable[[], contextlib.AbstractContextManager],
    tape: Tape | None = None,
) -> tuple[Any, list]:
    outputs = []
    with around(), _recording(tape):
        for _ in range(n_ticks):
            state, out = tick(state, context)
            outputs.append(out)
    return state, outputs


@contextlib.contextmanager
def collecting_tapes():
    """Yield a list that receives every segment's tape made while active (to see what they hold)."""
    tapes: list[Tape] = []
    previous = getattr(_active, "collect", None)
    _active.collect = tapes
    try:
        yield tapes
    finally:
        _active.collect = previous


def run_ticks(
    tick: Callable,
    state: Any,
    context: Any,
    n_ticks: int,
    segment: int = 0,
    around_segment: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Any, list]:
    """Apply ``tick(state, context) -> (state, output)`` ``n_ticks`` times; return final state, outputs.

    ``around_segment()`` is entered around every run of a segment, recomputations included.
    """
    if segment <= 0 or not torch.is_grad_enabled():
        return _run_segment(tick, state, context, n_ticks, around_segment)
    outputs: list = []
    for start in range(0, n_ticks, segment):
        tape = Tape()
        if getattr(_active, "collect", None) is not None:
            _active.collect.append(tape)
        state, segment_outputs = checkpoint(
            _run_segment,
            tick,
            state,
            context,
            min(segment, n_ticks - start),
            around_segment,
            tape,
            use_reentrant=False,
        )
        outputs.extend(segment_outputs)
    return state, outputs
