"""Weight gradients of tick layers computed once per backward instead of once per tick.

A linear layer inside the tick loop runs T times per forward with the same weight. Plain
autograd computes a rank-B weight gradient at every tick and adds it into a buffer: with small
batches that is T passes over weight-sized memory for the matmul plus T more for the sums. Here
each tick's backward only records its input and output gradient; the weight gradient is then
one matmul over all ticks (``sum_t g_t^T x_t``), done when autograd reaches the weight.

``TickLinear`` is an ``nn.Linear`` (same parameters and names) that takes part while
``using_banks(banks)`` is active; outside it, or under ``torch.compile``, it is a plain linear
layer. The CTM makes new banks per forward when gradients are needed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F


class _Bank:
    """The (input, output-gradient) pairs of one layer over the ticks of one forward."""

    def __init__(self, weight: torch.Tensor):
        self.inputs: list[torch.Tensor] = []
        self.grad_outputs: list[torch.Tensor] = []
        self.weight = _BankedWeight.apply(weight, self)

    def weight_grad(self) -> torch.Tensor | None:
        if not self.inputs:
            return None
        grad = torch.cat(self.grad_outputs).float().t() @ torch.cat(self.inputs).float()
        self.inputs.clear()
        self.grad_outputs.clear()
        return grad


class _BankedWeight(Function):
    """Identity on the weight; its backward delivers the bank's summed gradient."""

    @staticmethod
    def forward(ctx, weight, bank):
        ctx.bank = bank
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, _unused):
        return ctx.bank.weight_grad(), None


class _BankedLinear(Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, bank):
        ctx.save_for_backward(x, weight)
        ctx.bank = bank
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ctx.bank.inputs.append(x.reshape(-1, x.size(-1)))
        ctx.bank.grad_outputs.append(grad_out.reshape(-1, grad_out.size(-1)))
        grad_x = (grad_out @ weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.size(-1)).sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, None


class TickLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient is batched over ticks inside ``using_banks``."""

    _bank: _Bank | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bank is None or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        return _BankedLinear.apply(x, self._bank.weight, self.bias, self._bank)


def new_banks(module: nn.Module) -> dict[TickLinear, _Bank]:
    """Fresh banks for every ``TickLinear`` in ``module`` (one set per forward).

    Layers whose weights DeepSpeed ZeRO-3 partitions (``ds_id``) are left to plain autograd: their
    full weight exists only inside their own forward.
    """
    return {layer: _Bank(layer.weight) for layer in module.modules()
            if isinstance(layer, TickLinear) and not hasattr(layer.weight, "ds_id")}


@contextlib.contextmanager
def using_banks(banks: dict[TickLinear, _Bank] | None) -> Iterator[None]:
    """Route the layers' weight gradients through ``banks`` while active (``None``: plain autograd).

    Tick checkpointing re-enters this with the same banks when it recomputes a segment, so the
    recomputed layers save the same tensors as the original ones.
    """
    banks = banks or {}
    for layer, bank in banks.items():
        layer._bank = bank
    try:
        yield
    finally:
        for layer in banks:
            layer._bank = None
