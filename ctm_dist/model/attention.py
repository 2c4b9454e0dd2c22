"""Multi-head attention from the CTM's action synchronisation into the input tokens.

The parameters are those of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``out_proj``) so reference checkpoints load, but the computation is split in two: keys and
values depend only on the input, so ``project_kv`` runs once per forward, and each tick only
projects its single query. Without requested weights the fused ``scaled_dot_product_attention``
kernel does the rest. While the CTM routes gradients through banks (``tick_grads.py``), the fused
attention runs in a custom function whose backward records the key and value gradient factors
instead of adding a full ``[B, heads, L, E / heads]`` gradient per tick.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

from .tick_checkpoint import replayable
from .tick_grads import Bank, TickLinear, banked_linear


class _BankedSingleQuery(Function):
    """Fused attention of one query per (sample, head); k and v gradients go to their banks.

    The forward is ``scaled_dot_product_attention`` itself, so outputs do not depend on whether
    gradients are recorded; the backward recomputes the (small) attention weights."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, k_bank, v_bank):
        ctx.save_for_backward(q, k, v)
        ctx.banks = (k_bank, v_bank)
        return replayable(lambda: F.scaled_dot_product_attention(q, k, v))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        k_bank, v_bank = ctx.banks
        scale = 1.0 / math.sqrt(q.size(-1))
        scaled = q * scale  # [B, H, 1, hd]
        weights = torch.softmax(scaled @ k.transpose(-2, -1), dim=-1)  # [B, H, 1, L]
        grad_w = grad_out @ v.transpose(-2, -1)
        grad_scores = weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))
        v_bank.add(weights, grad_out)  # dV = sum_t w_t^T g_t
        k_bank.add(grad_scores, scaled)  # dK = sum_t ds_t^T (q_t * scale)
        return (grad_scores @ k) * scale, None, None, None, None


class TickAttention(nn.Module):
    _bank: Bank | None = None  # for the query projection, set by ``using_banks``

    def __init__(self, d_input: int, heads: int, dropout: float = 0.0, impl: str = "sdpa"):
        super().__init__()
        self.d_input, self.heads, self.dropout, self.impl = d_input, heads, dropout, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_input, d_input))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_input))
        self.out_proj = TickLinear(d_input, d_input)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def bank_weight(self) -> torch.Tensor:
        return self.in_proj_weight[: self.d_input]

    def query_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the query projection: the first third of the packed projection."""
        return self.in_proj_weight[: self.d_input], self.in_proj_bias[: self.d_input]

    def _split_heads(
        self, x: torch.Tensor
    ) -> torch.Tensor:  # [B, L, E] -> [B, heads, L, E / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the input tokens [B, L, E], each [B, heads, L, E / heads] and contiguous
        (the ticks' matmuls would otherwise copy them every time)."""
        e = self.d_input
        k = F.linear(tokens, self.in_proj_weight[e : 2 * e], self.in_proj_bias[e : 2 * e])
        v = F.linear(tokens, self.in_proj_weight[2 * e :], self.in_proj_bias[2 * e :])
        return self._split_heads(k).contiguous(), self._split_heads(v).contiguous()

    def forward(
        self,
        query: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_weights: bool = False,
        kv_banks: tuple[Bank, Bank] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One query per sample [B, E] -> output [B, E] and, if asked, weights [B, heads, 1, L].

        ``query_weight`` is ``query_weight()`` taken once per forward (cast, under autocast). With
        ``kv_banks``, ``k`` and ``v`` must be those banks' tensors."""
        q = banked_linear(query, self._bank, *(query_weight or self.query_weight()))
        q = self._split_heads(q.unsqueeze(1))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if (
            kv_banks is not None
            and not need_weights
            and dropout == 0.0
            and not torch.compiler.is_compiling()
        ):
            out = _BankedSingleQuery.apply(q, k, v, *kv_banks)
        elif need_weights or self.impl == "reference":
            scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).flatten(1)  # [B, 1, heads, hd] -> [B, E]
        return self.out_proj(out), (weights if need_weights else None)
