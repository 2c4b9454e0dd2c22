"""Multi-head attention from the CTM's action synchronisation into the input tokens.

The parameters are those of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``out_proj``) so reference checkpoints load, but the computation is split in two: keys and
values depend only on the input, so ``project_kv`` runs once per forward, and each tick only
projects its single query. Without requested weights the fused ``scaled_dot_product_attention``
kernel does the rest.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .weight_grads import TickLinear


class TickAttention(nn.Module):
    def __init__(self, d_input: int, heads: int, dropout: float = 0.0, impl: str = "sdpa"):
        super().__init__()
        self.d_input, self.heads, self.dropout, self.impl = d_input, heads, dropout, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_input, d_input))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_input))
        self.out_proj = TickLinear(d_input, d_input)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, E] -> [B, heads, L, E / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the input tokens [B, L, E], each [B, heads, L, E / heads]."""
        e = self.d_input
        k = F.linear(tokens, self.in_proj_weight[e:2 * e], self.in_proj_bias[e:2 * e])
        v = F.linear(tokens, self.in_proj_weight[2 * e:], self.in_proj_bias[2 * e:])
        return self._split_heads(k), self._split_heads(v)

    def forward(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One query per sample [B, E] -> output [B, E] and, if asked, weights [B, heads, 1, L]."""
        e = self.d_input
        q = self._split_heads(F.linear(query, self.in_proj_weight[:e], self.in_proj_bias[:e]).unsqueeze(1))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights or self.impl == "reference":
            scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).flatten(1)                       # [B, 1, heads, hd] -> [B, E]
        return self.out_proj(out), (weights if need_weights else None)
