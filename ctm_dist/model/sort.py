"""The CTM's sort variant: the input vector itself is what the synapses read at every tick.

The reference sorts N real numbers with ``ContinuousThoughtMachineSORT``. It keeps the CTM's
core (synapses, neuron-level models, learned start state, out synchronisation read out at every
tick) and drops its input side: no backbone, no attention and so no action synchronisation. At
every tick the synapses mix ``[x, post-activations]``, where ``x`` is the raw ``[B, N]`` input.
Trained with CTC over the ticks (``losses/sort.py``), the prediction at each tick is either one
of the N input positions or a blank (the last class), so the sorted order comes out one element
per tick.

Everything else (how ticks run, tick checkpointing, NLM recomputation, CPU kernels, the
read-out) is the CTM's own; the state dict has the reference's keys, with no ``action`` entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .casts import autocast_dtype, cast_once, per_tick
from .config import CTMConfig
from .ctm import CTM, TickOutput, TickState, _clamped
from .synchronisation import select_neurons, upper_triangle


class SortTickContext(NamedTuple):
    """What every tick of the sort variant reads but never changes."""

    input: torch.Tensor  # [B, d_input] the numbers to sort
    r_out: torch.Tensor  # per-pair decay factors exp(-decay) of the out synchronisation
    out_left: torch.Tensor
    out_right: torch.Tensor
    nlm_weights: tuple  # (weight, bias) per NLM layer, permuted and scaled once per forward
    casts: tuple | None  # nlm_weights cast once under autocast (casts.py), else None


class SortCTM(CTM):
    """``forward(x [B, N])`` -> predictions ``[B, N + 1, T]``, certainties ``[B, 2, T]``, last sync."""

    def __init__(self, cfg: CTMConfig):
        nn.Module.__init__(self)  # the CTM's own __init__ would build the attention side
        cfg.validate()
        if cfg.variant != "sort":
            raise ValueError(f"SortCTM needs a config with variant='sort', got {cfg.variant!r}")
        self.cfg = cfg
        self.tick_region = True
        d_model = cfg.d_model

        self.build_core(cfg)

        # only the out side is drawn, so a given NumPy seed gives the reference's index buffers
        left, right = select_neurons(
            cfg.neuron_select_type, "out", d_model, cfg.n_synch_out, cfg.n_random_pairing_self
        )
        self.register_buffer("out_neuron_indices_left", left)
        self.register_buffer("out_neuron_indices_right", right)
        self.decay_params_out = nn.Parameter(torch.zeros(cfg.synch_size_out))
        self.register_buffer(
            "_out_triangle", torch.stack(upper_triangle(cfg.n_synch_out)), persistent=False
        )

        self.output_projector = nn.Sequential(nn.Linear(cfg.synch_size_out, cfg.out_dims))

    def start(self, x: torch.Tensor) -> tuple[TickState, SortTickContext]:
        if x.dim() != 2 or x.size(1) != self.cfg.d_input:
            raise ValueError(
                f"the sort CTM takes [batch, {self.cfg.d_input}] numbers, got {tuple(x.shape)}"
            )
        b = x.size(0)
        nlm_weights = self.trace_processor.neuron_major_weights()
        out_left, out_right = self._pairs("out")
        ctx = SortTickContext(
            x,
            torch.exp(-_clamped(self.decay_params_out)),
            out_left,
            out_right,
            nlm_weights,
            cast_once(nlm_weights, autocast_dtype(x.device)),
        )
        activated = self.start_activated_state.unsqueeze(0).expand(b, -1)
        trace = self.start_trace.unsqueeze(-1).expand(-1, -1, b)
        columns = None
        if self.cfg.recompute_nlms and torch.is_grad_enabled():
            columns = tuple(column.detach().contiguous() for column in trace.unbind(1))
        return TickState(trace, activated, None, None, columns), ctx

    def tick(
        self, state: TickState, ctx: SortTickContext, need_weights: bool = False
    ) -> tuple[TickState, TickOutput]:
        pre_activation = self.synapses(torch.cat((ctx.input, state.activated), dim=-1))
        nlm_weights = per_tick(ctx.nlm_weights, ctx.casts)
        trace, activated, columns = self.neurons(state, pre_activation, nlm_weights)
        return (
            TickState(trace, activated, None, None, columns),
            TickOutput(None, pre_activation, activated, None),
        )

    def with_banks(self, ctx: SortTickContext) -> SortTickContext:
        return ctx  # the input needs no gradient; the synapses' weights are banked by the layers

    def compute_features(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("the sort CTM has no backbone: its input is read by the synapses directly")
