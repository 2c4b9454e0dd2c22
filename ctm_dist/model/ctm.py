"""The Continuous Thought Machine (Darlow et al. 2025, arXiv:2505.05522), read top to bottom.

A CTM thinks for ``iterations`` internal ticks. Each tick:

1. the *action* synchronisation (how pairs of neurons co-fire over time) forms a query that
   attends over the input tokens;
2. the synapses mix [attention output, current post-activations] into new pre-activations,
   which are pushed onto each neuron's history of the last ``memory_length`` pre-activations;
3. every neuron's private model (NLM) turns its history into its new post-activation;
4. the *out* synchronisation is projected to a prediction, whose certainty is 1 - normalised entropy.

Nothing in step 4 feeds back into the next tick, so ``forward`` runs steps 1-3 tick by tick and
then reads out all ticks at once (``read_out``): one projection over ``T x B`` rows instead of
``T`` small ones, and tick checkpointing never recomputes it. Adaptive inference reads out tick
by tick with the same function.

How the ticks run depends on the device and the config (``execution.py``): compiled, the tick is
one region compiled once and reused; eager on CPU, weight gradients are summed over ticks
(``tick_grads.py``). Under autocast, the per-forward weights the ticks read (the NLMs', the
attention query's) are cast once in ``start`` (``casts.py``).

``forward`` returns predictions ``[B, out_dims, T]``, certainties ``[B, 2, T]`` (normalised entropy,
1 - it) and the last out synchronisation, like the reference implementation, whose
``state_dict`` keys this module shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .attention import TickAttention
from .backbones import backbone_channels, build_backbone
from .casts import autocast_dtype, cast_once, per_tick
from .config import CTMConfig
from .execution import uses_channels_last, uses_cpu_kernels
from .nlm import NeuronLevelModels, recomputed_nlms
from .positional import build_positional_embedding
from .synapses import build_synapses
from .synchronisation import pair_indices, select_neurons, update_synchronisation, upper_triangle
from .tick_checkpoint import run_ticks
from .tick_grads import Bank, TickLinear, new_banks, using_banks

DECAY_CLAMP = (0.0, 15.0)


def _clamped(decay: torch.Tensor) -> torch.Tensor:
    """Decays clamped to [0, 15] with the gradient passed straight through.

    The reference clamps the stored parameters in place before every forward; the values used
    here are the same, but the parameters are never mutated, so a bf16 working copy can never
    disagree with DeepSpeed's fp32 master and a checkpoint does not depend on when it was taken.
    """
    return decay + (decay.clamp(*DECAY_CLAMP) - decay).detach()


class TickState(NamedTuple):
    """What one tick hands to the next."""

    trace: torch.Tensor  # [D, M, B] pre-activation history (neuron-major, see nlm.py)
    activated: torch.Tensor  # [B, D] post-activations
    alpha_action: torch.Tensor | None  # [B, pairs] running sums of the action synchronisation
    beta_action: torch.Tensor | None  # [pairs]: the same for every sample (None: no attention)
    columns: tuple | None = (
        None  # trace's M columns [D, B] while the NLMs are recomputed in backward
    )


class ReadoutState(NamedTuple):
    """Running sums of the out synchronisation, carried between calls of ``read_out``."""

    alpha: torch.Tensor  # [B, pairs] (or [pairs] before the first tick)
    beta: torch.Tensor  # [pairs]


class TickContext(NamedTuple):
    """What every tick reads but never changes."""

    keys: torch.Tensor  # [B, heads, L, d_input / heads]
    values: torch.Tensor
    r_action: torch.Tensor  # per-pair decay factors exp(-decay)
    r_out: torch.Tensor
    action_left: torch.Tensor  # neuron index on each side of every tracked pair
    action_right: torch.Tensor
    out_left: torch.Tensor
    out_right: torch.Tensor
    nlm_weights: tuple  # (weight, bias) per NLM layer, permuted and scaled once per forward
    query_weight: tuple  # (weight, bias) of the attention's query projection
    casts: (
        tuple | None
    )  # (nlm_weights, query_weight) cast once under autocast (casts.py), else None
    kv_banks: tuple[Bank, Bank] | None = None  # gradient banks of keys and values (tick_grads.py)


class TickOutput(NamedTuple):
    sync_action: torch.Tensor | None  # [B, synch_size_action]; None without attention
    pre_activation: torch.Tensor  # [B, D]
    post_activation: torch.Tensor  # [B, D]
    attention: torch.Tensor | None


class Readout(NamedTuple):
    """The out side of ``ticks`` ticks, ticks first."""

    predictions: torch.Tensor  # [ticks, B, out_dims]
    certainties: torch.Tensor  # [ticks, B, 2]
    sync_out: torch.Tensor  # [ticks, B, synch_size_out]
    state: ReadoutState


@dataclass
class Tracking:
    """Per-tick internals (``forward(x, track=True)``), detached, stacked over ticks first."""

    sync_out: torch.Tensor  # [T, B, synch_size_out]
    sync_action: torch.Tensor | None  # [T, B, synch_size_action]; None without attention
    pre_activations: torch.Tensor  # [T, B, D]
    post_activations: torch.Tensor  # [T, B, D]
    attention: torch.Tensor | None  # [T, B, heads, 1, L]; None without attention


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim / log(classes), averaged over the other non-batch dims."""
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1) / math.log(logits.size(-1))
    return entropy.flatten(1).mean(-1) if entropy.dim() > 1 else entropy


def certainty(prediction: torch.Tensor, prediction_reshaper: list[int]) -> torch.Tensor:
    """[N, out_dims] -> [N, 2]: (normalised entropy, 1 - normalised entropy), the entropy over
    the last axis of the prediction shaped as ``[N, *prediction_reshaper]``."""
    entropy = normalised_entropy(prediction.reshape([prediction.size(0)] + prediction_reshaper))
    return torch.stack((entropy, 1 - entropy), dim=-1)


def with_banks(ctx: TickContext) -> TickContext:
    """The context with keys and values read through gradient banks (tick_grads.py)."""
    k_bank, v_bank = Bank(ctx.keys), Bank(ctx.values)
    return ctx._replace(keys=k_bank.tensor, values=v_bank.tensor, kv_banks=(k_bank, v_bank))


@torch.compiler.nested_compile_region
def compiled_tick(model: CTM, state: TickState, ctx: TickContext) -> tuple[TickState, TickOutput]:
    """``model.tick``; under ``torch.compile`` traced and compiled once, then reused for every tick."""
    return model.tick(state, ctx)


class FeatureInput(nn.Module):
    """The input side and certainty of a model that attends to backbone features each tick.

    The CTM and the LSTM baseline share it: an image (or sequence) goes through ``initial_rgb``
    (a 1x1 convolution to 3 channels before a ResNet), the backbone and the positional
    embedding, and becomes the key/value tokens (``kv_proj``); the modules carry the
    reference's names, so its checkpoints load. A tick's certainty is 1 - the normalised
    entropy of its prediction, shaped by ``cfg.prediction_reshaper``.
    """

    cfg: Any  # a CTMConfig or LSTMConfig: the input fields and prediction_reshaper

    def build_input(self, cfg: Any) -> None:
        """Backbone features -> tokens -> attention keys/values (``compute_features``)."""
        d_backbone = backbone_channels(cfg.backbone_type, cfg.d_input, cfg.in_channels)
        is_resnet = cfg.backbone_type.startswith("resnet")
        self.initial_rgb = (
            nn.Conv2d(cfg.in_channels, 3, kernel_size=1) if is_resnet else nn.Identity()
        )
        self.backbone = build_backbone(cfg.backbone_type, cfg.d_input, cfg.in_channels)
        self.positional_embedding = build_positional_embedding(
            cfg.positional_embedding_type, d_backbone
        )
        self.kv_proj = nn.Sequential(nn.Linear(d_backbone, cfg.d_input), nn.LayerNorm(cfg.d_input))

    def compute_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> key/value tokens [B, L, d_input]."""
        features = self.backbone(self.initial_rgb(x))
        if self.positional_embedding is not None:
            features = features + self.positional_embedding(features)
        return self.kv_proj(features.flatten(2).transpose(1, 2))

    def compute_certainty(self, prediction: torch.Tensor) -> torch.Tensor:
        return certainty(prediction, self.cfg.prediction_reshaper)


class CTM(FeatureInput):
    def __init__(self, cfg: CTMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tick_region = (
            True  # compiled, the tick is one region reused by every tick (execution.py)
        )
        d_model, d_input = cfg.d_model, cfg.d_input

        self.build_input(cfg)
        self.q_proj = TickLinear(cfg.synch_size_action, d_input)
        self.attention = TickAttention(d_input, cfg.heads, cfg.dropout, cfg.attention_impl)
        self.build_core(cfg)

        # --- synchronisation: neuron indices (action drawn first) and learned decays
        for kind, n_synch, size in (
            ("action", cfg.n_synch_action, cfg.synch_size_action),
            ("out", cfg.n_synch_out, cfg.synch_size_out),
        ):
            left, right = select_neurons(
                cfg.neuron_select_type, kind, d_model, n_synch, cfg.n_random_pairing_self
            )
            self.register_buffer(f"{kind}_neuron_indices_left", left)
            self.register_buffer(f"{kind}_neuron_indices_right", right)
            self.register_parameter(f"decay_params_{kind}", nn.Parameter(torch.zeros(size)))
            rows, cols = upper_triangle(n_synch)
            self.register_buffer(f"_{kind}_triangle", torch.stack((rows, cols)), persistent=False)

        # --- output
        self.output_projector = nn.Sequential(nn.Linear(cfg.synch_size_out, cfg.out_dims))

    def build_core(self, cfg: CTMConfig) -> None:
        """Synapses, neuron-level models and the learned start state (the sort variant's too)."""
        d_model = cfg.d_model
        self.synapses = build_synapses(
            cfg.d_input + d_model, d_model, cfg.synapse_depth, cfg.dropout
        )
        self.trace_processor = NeuronLevelModels(
            d_model,
            cfg.memory_length,
            cfg.deep_nlms,
            cfg.memory_hidden_dims,
            cfg.do_layernorm_nlm,
            cfg.nlm_dropout,
        )

        # --- learned start state
        bound = math.sqrt(1 / d_model)
        self.start_activated_state = nn.Parameter(torch.empty(d_model).uniform_(-bound, bound))
        bound = math.sqrt(1 / (d_model + cfg.memory_length))
        self.start_trace = nn.Parameter(
            torch.empty(d_model, cfg.memory_length).uniform_(-bound, bound)
        )

    # --- the tick ------------------------------------------------------------------------------

    def tick(
        self, state: TickState, ctx: TickContext, need_weights: bool = False
    ) -> tuple[TickState, TickOutput]:
        """Steps 1-3 of one tick (the read-out is ``read_out``)."""
        sync_action, alpha_action, beta_action = update_synchronisation(
            state.activated,
            state.alpha_action,
            state.beta_action,
            ctx.r_action,
            ctx.action_left,
            ctx.action_right,
        )

        nlm_weights, query_weight = per_tick((ctx.nlm_weights, ctx.query_weight), ctx.casts)
        attended, weights = self.attention(
            self.q_proj(sync_action), ctx.keys, ctx.values, query_weight, need_weights, ctx.kv_banks
        )
        pre_activation = self.synapses(torch.cat((attended, state.activated), dim=-1))
        trace, activated, columns = self.neurons(state, pre_activation, nlm_weights)
        return (
            TickState(trace, activated, alpha_action, beta_action, columns),
            TickOutput(sync_action, pre_activation, activated, weights),
        )

    def neurons(
        self, state: TickState, pre_activation: torch.Tensor, nlm_weights: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Push the pre-activations onto the history and run the NLMs: (trace, activated, columns)."""
        if state.columns is None:
            trace = torch.cat((state.trace[:, 1:], pre_activation.t().unsqueeze(1)), dim=1)
            return trace, self.trace_processor(trace, nlm_weights), None
        column = pre_activation.t().contiguous()
        trace = torch.cat((state.trace[:, 1:], column.unsqueeze(1)), dim=1)
        columns = state.columns[1:] + (column,)
        return trace, recomputed_nlms(self.trace_processor, trace, columns, nlm_weights), columns

    def read_out(
        self, activations: torch.Tensor, ctx: TickContext, state: ReadoutState | None = None
    ) -> Readout:
        """Out synchronisation, predictions and certainties of post-activations ``[ticks, B, D]``.

        ``state`` is what the previous call returned (``None``: start after the learned start state).
        """
        if state is None:
            start = self.start_activated_state
            state = ReadoutState(
                start[ctx.out_left] * start[ctx.out_right], torch.ones_like(ctx.r_out)
            )
        products = (
            activations[..., ctx.out_left] * activations[..., ctx.out_right]
        )  # [ticks, B, pairs]
        alpha, beta = state
        alphas, betas = [], []
        for product in products.unbind(0):
            alpha = ctx.r_out * alpha + product
            beta = ctx.r_out * beta + 1
            alphas.append(alpha)
            betas.append(beta)
        sync_out = torch.stack(alphas) / torch.sqrt(torch.stack(betas)).unsqueeze(1)
        predictions = self.output_projector(sync_out)
        certainties = self.compute_certainty(predictions.flatten(0, 1)).unflatten(
            0, predictions.shape[:2]
        )
        return Readout(predictions, certainties, sync_out, ReadoutState(alpha, beta))

    # --- set-up shared by forward and adaptive inference ----------------------------------------------

    def with_banks(self, ctx: TickContext) -> TickContext:
        """The context with its per-forward tensors that every tick reads put behind gradient banks."""
        return with_banks(ctx)

    def _pairs(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = getattr(self, f"_{kind}_triangle")
        return pair_indices(
            self.cfg.neuron_select_type,
            getattr(self, f"{kind}_neuron_indices_left"),
            getattr(self, f"{kind}_neuron_indices_right"),
            rows,
            cols,
        )

    def start(self, x: torch.Tensor) -> tuple[TickState, TickContext]:
        """Featurise the input and build the state before the first tick."""
        if uses_channels_last(self.cfg, x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        keys, values = self.attention.project_kv(self.compute_features(x))
        b = keys.size(0)
        nlm_weights, query_weight = (
            self.trace_processor.neuron_major_weights(),
            self.attention.query_weight(),
        )
        action_left, action_right = self._pairs("action")
        out_left, out_right = self._pairs("out")
        ctx = TickContext(
            keys,
            values,
            torch.exp(-_clamped(self.decay_params_action)),
            torch.exp(-_clamped(self.decay_params_out)),
            action_left,
            action_right,
            out_left,
            out_right,
            nlm_weights,
            query_weight,
            cast_once((nlm_weights, query_weight), autocast_dtype(x.device)),
        )

        activated = self.start_activated_state.unsqueeze(0).expand(b, -1)
        trace = self.start_trace.unsqueeze(-1).expand(-1, -1, b)
        # zero running sums make the first action update exactly the reference's fresh start
        alpha_action = activated.new_zeros(b, action_left.numel())
        columns = None
        if self.cfg.recompute_nlms and torch.is_grad_enabled():
            columns = tuple(column.detach().contiguous() for column in trace.unbind(1))
        return TickState(
            trace, activated, alpha_action, alpha_action.new_zeros(action_left.numel()), columns
        ), ctx

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, track: bool = False):
        state, ctx = self.start(x)
        if track:

            def tick(s, c):
                return self.tick(s, c, need_weights=True)

            state, outputs = run_ticks(tick, state, ctx, self.cfg.iterations, segment=0)
        elif torch.compiler.is_compiling() and not (
            self.cfg.tick_checkpointing or self.cfg.recompute_nlms
        ):
            outputs = []
            tick = compiled_tick if self.tick_region else CTM.tick
            for _ in range(self.cfg.iterations):
                state, output = tick(self, state, ctx)
                outputs.append(output)
        else:
            use_banks = uses_cpu_kernels(self.cfg, x.device) and torch.is_grad_enabled()
            banks = new_banks(self, autocast_dtype(x.device)) if use_banks else None
            if use_banks:
                ctx = self.with_banks(ctx)
            state, outputs = run_ticks(
                self.tick,
                state,
                ctx,
                self.cfg.iterations,
                self.cfg.tick_checkpointing,
                around_segment=lambda: using_banks(banks),
            )

        readout = self.read_out(torch.stack([o.post_activation for o in outputs]), ctx)
        predictions = readout.predictions.permute(1, 2, 0).float().contiguous()
        certainties = readout.certainties.permute(1, 2, 0).float().contiguous()
        sync_out = readout.sync_out[-1]
        if not track:
            return predictions, certainties, sync_out

        def stacked(name: str) -> torch.Tensor | None:
            if getattr(outputs[0], name) is None:  # a variant without attention (model/sort.py)
                return None
            return torch.stack([getattr(o, name).detach() for o in outputs])

        tracking = Tracking(
            sync_out=readout.sync_out.detach(),
            sync_action=stacked("sync_action"),
            pre_activations=stacked("pre_activation"),
            post_activations=stacked("post_activation"),
            attention=stacked("attention"),
        )
        return predictions, certainties, sync_out, tracking
