"""The Q&A MNIST variant of the CTM and its LSTM baseline (the paper's QAMNIST task).

A question is shown in three phases, one input per tick:

1. **digits**: ``x`` is ``[B, n_digits * repeats, C, H, W]``, each digit image repeated for
   ``iterations_per_digit`` ticks. A small convolutional backbone (``DigitBackbone``) turns the
   image into tokens that the CTM attends over, as the image CTM does.
2. **question**: ``z`` is ``[B, n_parts * repeats]`` of integers, each part repeated for
   ``iterations_per_question_part`` ticks: a digit index (``>= 0``), then an operator (``-1`` for
   ``+``, ``-2`` for ``-``) and another index, and so on. Indices get fixed sinusoidal
   embeddings, operators learned ones; the embedding goes straight into the synapses in place of
   the attention output (no attention on these ticks).
3. **answer**: ``iterations_for_answering`` ticks with a zero input, in which the answer forms.

The number of ticks is therefore set by the input (digits + question + answer), not by
``iterations``, which is kept only because the reference's constructor takes it. Module and
parameter names are the reference's, so its checkpoints load (``ctm_dist.compat``). Both models
are called ``m(x, z)`` and return predictions ``[B, out_dims, ticks]``, certainties
``[B, 2, ticks]`` and the last out synchronisation (the LSTM: ``None``).

The variant runs eager, tick by tick (the input changes every few ticks, so there is no fixed
key/value set to compile or bank gradients over); of the execution fields only
``attention_impl`` applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .casts import autocast_dtype, cast_once, per_tick
from .config import VARIANT_PRESETS, CTMConfig
from .config_base import check_positive_ints, preset_config, requirement
from .ctm import CTM, Tracking, _clamped, normalised_entropy
from .synchronisation import update_synchronisation

MAX_DIGITS = 50  # rows of the index embedding table (the reference's)
OPERATORS = ("+", "-")  # encoded in questions as -1, -2
MODEL_KINDS = ("ctm", "lstm")


class DigitBackbone(nn.Module):
    """Two conv-BN-ReLU-maxpool blocks of ``d_input`` channels: [B, C, H, W] -> [B, d_input, H/4, W/4]."""

    def __init__(self, d_input: int, in_channels: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, d_input, kernel_size=3, padding=1),
            nn.BatchNorm2d(d_input),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(d_input, d_input, kernel_size=3, padding=1),
            nn.BatchNorm2d(d_input),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class IndexEmbedding(nn.Module):
    """Fixed sinusoidal embedding of a digit's position in the sequence (a stored buffer)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        position = torch.arange(rows, dtype=torch.float).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
        table = torch.zeros(rows, dim)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
        self.register_buffer("embedding", table)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.embedding[index]


class OperatorEmbedding(nn.Module):
    """Learned embedding of an operator code (-1 -> row 0, -2 -> row 1)."""

    def __init__(self, operators: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(operators, dim)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.embedding(-code - 1)


@dataclass
class QAMNISTConfig(CTMConfig):
    """A QAMNIST model: the CTM's fields plus how many ticks each phase takes and which model.

    The digit backbone is built in, so ``backbone_type`` and ``positional_embedding_type`` stay
    ``"none"``; ``in_channels`` (the channels the key/value projection reads) is ``d_input``
    (``0`` sets it so). The variant runs eager: ``compile`` and ``cpu_kernels`` default to false.
    For ``kind="lstm"`` only ``d_model``, ``d_input``, ``heads``, ``out_dims`` and ``dropout`` of
    the CTM's fields are used.
    """

    backbone_type: str = "none"
    in_channels: int = 0
    neuron_select_type: str = "random"
    compile: bool | str = False
    cpu_kernels: bool | str = False
    iterations_per_digit: int = 10
    iterations_per_question_part: int = 10
    iterations_for_answering: int = 10
    kind: str = "ctm"
    image_channels: int = 1
    # the question curriculum: each batch has n +- delta digits and operations, drawn from
    # [n - delta, n + delta) as the reference draws them; kept here so that a preset fixes the
    # whole task and a checkpoint records it (the reference saves them with its model options)
    num_digits: int = 3
    num_digits_delta: int = 2
    num_operations: int = 3
    num_operations_delta: int = 2

    def __post_init__(self) -> None:
        if self.in_channels == 0:
            self.in_channels = self.d_input
        super().__post_init__()

    def validate(self) -> None:
        super().validate()

        need = requirement("QAMNISTConfig")
        check_positive_ints(
            need,
            self,
            ("iterations_per_digit", "iterations_per_question_part", "iterations_for_answering")
            + ("image_channels", "num_digits", "num_operations"),
        )
        for name in ("num_digits", "num_operations"):
            delta = getattr(self, f"{name}_delta")
            need(
                isinstance(delta, int) and 0 <= delta < getattr(self, name),
                f"{name}_delta must be in [0, {name}) so that at least 1 is drawn, got {delta!r}",
            )
        need(
            self.num_digits + self.num_digits_delta <= MAX_DIGITS,
            f"at most {MAX_DIGITS} digits have an index embedding",
        )
        need(self.kind in MODEL_KINDS, f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        need(
            self.backbone_type == "none" and self.positional_embedding_type == "none",
            "the digit backbone is built in: backbone_type and positional_embedding_type "
            "must be 'none'",
        )
        need(self.in_channels == self.d_input, f"in_channels must equal d_input ({self.d_input})")
        need(
            self.prediction_reshaper == [-1],
            f"the answer is one class: prediction_reshaper must be [-1], got {self.prediction_reshaper}",
        )
        need(
            not (self.tick_checkpointing or self.recompute_nlms or self.compile is True),
            "the QAMNIST variant runs eager: tick_checkpointing, recompute_nlms and compile must be off",
        )


def qamnist_config(**fields: Any) -> QAMNISTConfig:
    """A QAMNISTConfig from field values (CTMConfig's and its own)."""
    return QAMNISTConfig(**fields)


@dataclass
class Phases:
    """Which ticks show digits, question parts and nothing (answer), for one input."""

    digit_ticks: int
    question_ticks: int
    answer_ticks: int
    ticks_per_part: int

    @property
    def total(self) -> int:
        return self.digit_ticks + self.question_ticks + self.answer_ticks

    def kind(self, tick: int) -> str:
        """'digit', 'index', 'operator' or 'answer'."""
        if tick < self.digit_ticks:
            return "digit"
        offset = tick - self.digit_ticks
        if offset < self.question_ticks:
            return (
                "index" if offset % (2 * self.ticks_per_part) < self.ticks_per_part else "operator"
            )
        return "answer"


def add_question_inputs(model: nn.Module, d_input: int, image_channels: int) -> None:
    """Give ``model`` the three input modules, under the reference's names: the digit backbone,
    the index embedding and the operator embedding."""
    model.backbone_digit = DigitBackbone(d_input, image_channels)
    model.index_backbone = IndexEmbedding(MAX_DIGITS, d_input)
    model.operator_backbone = OperatorEmbedding(len(OPERATORS), d_input)


def _check_inputs(x: torch.Tensor, z: torch.Tensor) -> None:
    if x.dim() != 5:
        raise ValueError(f"x must be [B, digit ticks, C, H, W], got shape {tuple(x.shape)}")
    if z.dim() == 3 and z.size(-1) == 1:  # the reference's own first call passes [B, L, 1]
        z = z.squeeze(-1)
    if z.dim() != 2 or z.size(0) != x.size(0):
        raise ValueError(f"z must be [B, question ticks], got shape {tuple(z.shape)}")


def _flat_question(z: torch.Tensor) -> torch.Tensor:
    return (z.squeeze(-1) if z.dim() == 3 else z).long()


class QAMNISTCTM(CTM):
    """The CTM of the QAMNIST task: ``m(x, z)``; see the module docstring."""

    def __init__(self, cfg: QAMNISTConfig):
        super().__init__(cfg)
        self.qcfg = cfg
        add_question_inputs(self, cfg.d_input, cfg.image_channels)

    def phases(self, x: torch.Tensor, z: torch.Tensor) -> Phases:
        return Phases(
            x.size(1),
            z.size(1),
            self.qcfg.iterations_for_answering,
            self.qcfg.iterations_per_question_part,
        )

    def digit_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> key/value tokens [B, L, d_input]."""
        return self.kv_proj(self.backbone_digit(image).flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, z: torch.Tensor, track: bool = False):
        _check_inputs(x, z)
        z = _flat_question(z)
        phases = self.phases(x, z)
        b = x.size(0)
        dtype = autocast_dtype(x.device)
        nlm_weights, query_weight = (
            self.trace_processor.neuron_major_weights(),
            self.attention.query_weight(),
        )
        casts = cast_once((nlm_weights, query_weight), dtype)
        r_action = torch.exp(-_clamped(self.decay_params_action))
        action_left, action_right = self._pairs("action")
        out_left, out_right = self._pairs("out")

        activated = self.start_activated_state.unsqueeze(0).expand(b, -1)
        trace = self.start_trace.unsqueeze(-1).expand(-1, -1, b)  # [D, M, B]
        alpha = activated.new_zeros(b, action_left.numel())
        beta = alpha.new_zeros(action_left.numel())

        keys = values = shown = None
        embedding, shown_part = None, None
        posts, pres, syncs, attentions = [], [], [], []
        for tick in range(phases.total):
            kind = phases.kind(tick)
            sync_action, alpha, beta = update_synchronisation(
                activated, alpha, beta, r_action, action_left, action_right
            )
            nlm_w, query_w = per_tick((nlm_weights, query_weight), casts)
            if kind == "digit":
                image = x[:, tick]
                if shown is None or not torch.equal(image, shown):
                    keys, values = self.attention.project_kv(self.digit_tokens(image))
                    shown = image
                attended, weights = self.attention(
                    self.q_proj(sync_action), keys, values, query_w, need_weights=track
                )
                if track:
                    attentions.append(weights.detach())
            elif kind == "answer":
                attended = activated.new_zeros(b, self.cfg.d_input)
            else:
                part = z[:, tick - phases.digit_ticks]
                if shown_part is None or not torch.equal(part, shown_part):
                    backbone = self.index_backbone if kind == "index" else self.operator_backbone
                    embedding, shown_part = backbone(part), part
                attended = embedding
            pre = self.synapses(torch.cat((attended.to(activated.dtype), activated), dim=-1))
            trace = torch.cat((trace[:, 1:], pre.t().unsqueeze(1)), dim=1)
            activated = self.trace_processor(trace, nlm_w)
            posts.append(activated)
            if track:
                pres.append(pre.detach())
                syncs.append(sync_action.detach())

        ctx = _ReadoutContext(torch.exp(-_clamped(self.decay_params_out)), out_left, out_right)
        readout = self.read_out(torch.stack(posts), ctx)
        predictions = readout.predictions.permute(1, 2, 0).float().contiguous()
        certainties = readout.certainties.permute(1, 2, 0).float().contiguous()
        sync_out = readout.sync_out[-1]
        if not track:
            return predictions, certainties, sync_out
        tracking = Tracking(
            sync_out=readout.sync_out.detach(),
            sync_action=torch.stack(syncs),
            pre_activations=torch.stack(pres),
            post_activations=torch.stack(posts).detach(),
            attention=torch.stack(attentions) if attentions else torch.empty(0),
        )
        return predictions, certainties, sync_out, tracking


@dataclass
class _ReadoutContext:
    """The fields of ``TickContext`` that ``CTM.read_out`` reads."""

    r_out: torch.Tensor
    out_left: torch.Tensor
    out_right: torch.Tensor


class QAMNISTLSTM(nn.Module):
    """The paper's LSTM baseline on QAMNIST: an LSTM cell in place of the CTM's synapses and NLMs.

    Digit ticks attend over the digit's tokens with a query from the hidden state; question parts
    pass their embedding through the key/value projection into the cell; answer ticks feed zeros.
    The prediction is read from the hidden state at every tick.
    """

    def __init__(self, cfg: QAMNISTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = self.qcfg = cfg
        c = cfg
        d_model, d_input = c.d_model, c.d_input
        add_question_inputs(self, d_input, cfg.image_channels)
        self.lstm_cell = nn.LSTMCell(d_input, d_model)
        bound = math.sqrt(1 / d_model)
        self.start_hidden_state = nn.Parameter(torch.empty(d_model).uniform_(-bound, bound))
        self.start_cell_state = nn.Parameter(torch.empty(d_model).uniform_(-bound, bound))
        self.q_proj = nn.Linear(d_model, d_input)
        self.kv_proj = nn.Sequential(nn.Linear(d_input, d_input), nn.LayerNorm(d_input))
        self.attention = nn.MultiheadAttention(d_input, c.heads, c.dropout, batch_first=True)
        self.output_projector = nn.Sequential(nn.Linear(d_model, c.out_dims))

    def forward(self, x: torch.Tensor, z: torch.Tensor, track: bool = False):
        _check_inputs(x, z)
        z = _flat_question(z)
        phases = Phases(
            x.size(1),
            z.size(1),
            self.qcfg.iterations_for_answering,
            self.qcfg.iterations_per_question_part,
        )
        b = x.size(0)
        hidden = self.start_hidden_state.unsqueeze(0).expand(b, -1)
        cell = self.start_cell_state.unsqueeze(0).expand(b, -1)
        tokens = shown = embedding = shown_part = None
        hiddens, attentions = [], []
        for tick in range(phases.total):
            kind = phases.kind(tick)
            if kind == "digit":
                image = x[:, tick]
                if shown is None or not torch.equal(image, shown):
                    features = self.backbone_digit(image).flatten(2).transpose(1, 2)
                    tokens, shown = self.kv_proj(features), image
                step_input, weights = self.attention(
                    self.q_proj(hidden).unsqueeze(1),
                    tokens,
                    tokens,
                    need_weights=track,
                    average_attn_weights=False,
                )
                step_input = step_input.squeeze(1)
                if track:
                    attentions.append(weights.detach())
            elif kind == "answer":
                step_input = hidden.new_zeros(b, self.qcfg.d_input)
            else:
                part = z[:, tick - phases.digit_ticks]
                if shown_part is None or not torch.equal(part, shown_part):
                    backbone = self.index_backbone if kind == "index" else self.operator_backbone
                    embedding, shown_part = self.kv_proj(backbone(part)), part
                step_input = embedding
            hidden, cell = self.lstm_cell(step_input, (hidden, cell))
            hiddens.append(hidden)
        states = torch.stack(hiddens)  # [T, B, d_model]
        logits = self.output_projector(states)  # [T, B, out]
        entropy = normalised_entropy(logits.flatten(0, 1)).unflatten(0, logits.shape[:2])
        predictions = logits.permute(1, 2, 0).float().contiguous()
        certainties = torch.stack((entropy, 1 - entropy), -1).permute(1, 2, 0).float().contiguous()
        if not track:
            return predictions, certainties, None
        tracking = Tracking(
            sync_out=torch.empty(0),
            sync_action=torch.empty(0),
            pre_activations=states.detach(),
            post_activations=states.detach(),
            attention=torch.stack(attentions) if attentions else torch.empty(0),
        )
        return predictions, certainties, None, tracking


def build_qamnist_model(cfg: QAMNISTConfig) -> nn.Module:
    """The CTM or LSTM of ``cfg.kind``."""
    return QAMNISTCTM(cfg) if cfg.kind == "ctm" else QAMNISTLSTM(cfg)


# --- presets ---------------------------------------------------------------------------------


def _reference_defaults() -> dict[str, Any]:
    # tasks/qamnist/train.py argument defaults (3 +- 2 digits, 3 +- 2 operations, 10 repeats)
    return dict(
        iterations=50,
        d_model=1024,
        d_input=64,
        heads=4,
        n_synch_out=32,
        n_synch_action=32,
        neuron_select_type="random",
        n_random_pairing_self=256,
        synapse_depth=1,
        memory_length=30,
        deep_nlms=True,
        memory_hidden_dims=4,
        do_layernorm_nlm=False,
        dropout=0.0,
        out_dims=10,
        iterations_per_digit=10,
        iterations_per_question_part=10,
        iterations_for_answering=10,
    )


def _small() -> dict[str, Any]:
    # Learns on scikit-learn's 8x8 digits on two shared CPU cores within 10 minutes
    # (docs/qamnist.md): 64 neurons, each input shown for 1 tick, 2 answer ticks.
    return dict(
        _reference_defaults(),
        iterations=4,
        d_model=64,
        d_input=16,
        heads=2,
        n_synch_out=8,
        n_synch_action=8,
        n_random_pairing_self=0,
        memory_length=3,
        memory_hidden_dims=4,
        iterations_per_digit=1,
        iterations_per_question_part=1,
        iterations_for_answering=2,
        num_digits=2,
        num_digits_delta=1,
        num_operations=2,
        num_operations_delta=1,
    )


QAMNIST_PRESETS = {"qamnist": _reference_defaults, "qamnist-small": _small}


def qamnist_preset(name: str = "qamnist", **overrides: Any) -> QAMNISTConfig:
    """A named QAMNIST configuration with fields overridden."""
    return preset_config(
        QAMNISTConfig, QAMNIST_PRESETS, name, overrides, label="unknown QAMNIST preset"
    )


VARIANT_PRESETS.update({name: partial(qamnist_preset, name) for name in QAMNIST_PRESETS})


__all__ = [
    "MAX_DIGITS",
    "OPERATORS",
    "Phases",
    "QAMNISTCTM",
    "QAMNISTConfig",
    "QAMNISTLSTM",
    "build_qamnist_model",
    "qamnist_config",
    "qamnist_preset",
    "QAMNIST_PRESETS",
]
