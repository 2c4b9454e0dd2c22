"""Gradients of tensors that every tick reads, summed once per backward instead of once per tick.

The tick loop reads the same weights (synapses, attention and output projections) and the
same attention keys and values T times per forward. Plain autograd computes a small gradient
contribution for each of them at every tick and adds it into a buffer: with small batches that
is T passes over weight-sized memory for the products plus T more for the sums. Here each
tick's backward only records the two factors of its contribution, ``a_t^T @ b_t``; the sum over
ticks is then one matmul over the factors concatenated along their rows, ``cat(a)^T @ cat(b)``,
done when autograd reaches the shared tensor (or earlier, in pieces, when the factors held would
exceed ``Bank.max_bytes``). Row-wise concatenation copies contiguous blocks, which is what keeps
it cheap.

* ``TickLinear`` is an ``nn.Linear`` (same parameters and names) whose weight is banked while
  ``using_banks(banks)`` is active; outside it it is a plain layer.
  Other modules join by defining ``bank_weight()`` and reading ``self._bank`` (the attention's
  query projection, a slice of its packed ``in_proj_weight``).
* Per-forward tensors (the attention keys and values) get a ``Bank(tensor)`` directly and
  use ``bank.tensor`` in its place.

A bank also knows that its weight is fixed for the whole forward, so on CPU (fp32, no autocast)
the banked layers multiply by a copy of the weight, and one of its transpose for backward,
reordered once per forward into oneDNN's blocked layout (the same ops ``torch.compile`` uses for
frozen CPU linears). MKL's plain GEMM re-packs the weight at every call, which at a few rows per
tick is much of its cost. With very few rows MKL does not pack, and reordering two copies of every
weight per forward then costs more than it saves, hence ``REORDER_MIN_ROWS``. Figures (2-core
CPU, 2026-11): the reordered synapse products of the parity preset are 1.15-1.25x faster with one
thread and about 2x with two; whole training steps 1.14-1.17x faster with two threads and the
same with one; the ImageNet preset at batch 2 with one thread would be 0.87x without the
threshold.

All of this is CPU machinery: the model uses it where ``CTMConfig.cpu_kernels`` says
(``execution.py``: by default on CPU in eager mode, never inside a compiled forward). Under
autocast a bank casts its weight once per forward, so the ticks do not cast it again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

from .tick_checkpoint import replayable

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


REORDER_MIN_ROWS = 8


def _reordered(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` should use a weight reordered for oneDNN."""
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.size(0) >= REORDER_MIN_ROWS
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


class Bank:
    """The recorded gradient factors of one shared tensor over the ticks of one forward."""

    max_bytes = 64 * 2**20  # factors held before a partial sum is taken

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype | None = None):
        """``dtype``: the autocast dtype, to cast the tensor once for all ticks (``None``: as it is)."""
        self.a: list[torch.Tensor] = []
        self.b: list[torch.Tensor] = []
        self.held = 0
        self.partial: torch.Tensor | None = None
        self.tensor = _BankedTensor.apply(tensor, self)
        if dtype is not None:
            self.tensor = self.tensor.to(dtype)
        self._reordered: dict[bool, torch.Tensor] = {}

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        transposed: bool = False,
    ) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` (``x @ weight`` with ``transposed``), ``weight`` being this bank's."""
        if not _reordered(x, weight):
            return x @ weight if transposed else F.linear(x, weight, bias)
        if transposed not in self._reordered:
            w = weight.detach()
            self._reordered[transposed] = torch.ops.mkldnn._reorder_linear_weight(
                w.t().contiguous() if transposed else w, x.size(0)
            )
        return torch.ops.mkldnn._linear_pointwise(
            x, self._reordered[transposed], bias, "none", [], ""
        )

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Record one tick's contribution ``a^T @ b`` (both ``[..., rows, *]``, contracted over rows)."""
        self.a.append(a)
        self.b.append(b)
        self.held += a.numel() * a.element_size() + b.numel() * b.element_size()
        if self.held > self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.a:
            return
        a, b = (torch.cat(parts, -2) if len(parts) > 1 else parts[0] for parts in (self.a, self.b))
        part = a.float().transpose(-2, -1) @ b.float()
        self.partial = part if self.partial is None else self.partial.add_(part)
        self.a.clear()
        self.b.clear()
        self.held = 0

    def grad(self) -> torch.Tensor | None:
        self._flush()
        grad, self.partial = self.partial, None
        return grad


class _BankedTensor(Function):
    """Identity on the shared tensor; its backward delivers the bank's sum."""

    @staticmethod
    def forward(ctx, tensor, bank):
        ctx.bank = bank
        ctx.set_materialize_grads(False)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        banked = ctx.bank.grad()
        if grad is None or banked is None:  # ``grad``: from uses that went around the bank
            return (banked if grad is None else grad), None
        return banked.to(grad.dtype) + grad, None


class _BankedLinear(Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, weight, bias, bank):
        ctx.save_for_backward(x, weight)
        ctx.bank = bank
        ctx.has_bias = bias is not None
        return replayable(lambda: bank.linear(x, weight, bias))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.size(-1))
        ctx.bank.add(grad_rows, x.reshape(-1, x.size(-1)))  # dW = g^T x
        grad_x = (
            ctx.bank.linear(grad_out, weight.to(grad_out.dtype), None, transposed=True)
            if ctx.needs_input_grad[0]
            else None
        )
        grad_bias = grad_rows.sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, None


def banked_linear(
    x: torch.Tensor, bank: Bank | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, with the weight gradient through ``bank`` when there is one."""
    if bank is None or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return _BankedLinear.apply(x, bank.tensor, bias, bank)


class TickLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient is summed over ticks inside ``using_banks``."""

    _bank: Bank | None = None

    def bank_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return banked_linear(x, self._bank, self.weight, self.bias)


def new_banks(module: nn.Module, dtype: torch.dtype | None = None) -> dict[nn.Module, Bank]:
    """Fresh banks for every submodule with a ``bank_weight()`` (one set per forward), their
    weights cast to ``dtype`` (autocast's) once.

    Layers whose weights DeepSpeed ZeRO-3 partitions (``ds_id``) are left to plain autograd: their
    full weight exists only inside their own forward.
    """
    banks = {}
    for layer in module.modules():
        if hasattr(layer, "bank_weight") and not any(
            hasattr(p, "ds_id") for p in layer.parameters(recurse=False)
        ):
            banks[layer] = Bank(layer.bank_weight(), dtype)
    return banks


@contextlib.contextmanager
def using_banks(banks: dict[nn.Module, Bank] | None) -> Iterator[None]:
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
