"""Weights the ticks read, cast once per forward under autocast, their gradients summed at full precision.

Under autocast every matmul casts its inputs to the autocast dtype. Autocast caches its casts of
parameters for the length of its region, but the weights the ticks read that are computed once
per forward (the NLMs' permuted, temperature-scaled weights; the attention's query slice of its
packed projection) are not parameters, so autocast would cast each of them again at every tick.
``cast_once`` casts them once, in ``CTM.start``. Each tick reads the cast copies through
``per_tick``: an alias whose backward hands that tick's gradient back in the full-precision
tensor's dtype, so the sum over ticks is taken in fp32, as with a cast at every tick (one copy read
by every tick would sum its gradients in bf16).
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``device``, or ``None`` when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def cast_once(tensors: tuple, dtype: torch.dtype | None) -> tuple | None:
    """``tensors`` (nested tuples) detached and cast to ``dtype``; ``None`` when ``dtype`` is."""
    if dtype is None:
        return None
    return tuple(
        cast_once(t, dtype) if isinstance(t, tuple) else t.detach().to(dtype) for t in tensors
    )


class _TickAlias(Function):
    """``cast`` in forward; in backward the gradient goes to ``tensor``, in its dtype."""

    @staticmethod
    def forward(ctx, tensor, cast):
        ctx.dtype = tensor.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def per_tick(tensors: tuple, casts: tuple | None) -> tuple:
    """What one tick reads: ``tensors`` themselves, or their copies from ``cast_once`` (same nesting)."""
    if casts is None:
        return tensors
    return tuple(
        per_tick(t, c) if isinstance(t, tuple) else _TickAlias.apply(t, c)
        for t, c in zip(tensors, casts)
    )
