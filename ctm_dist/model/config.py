"""Typed configuration of the CTM and named presets.

Field names follow the reference constructor's keyword arguments so that a reference run's
arguments map one to one. These fields are ours:

* ``in_channels``: channels of the input (the reference infers them lazily on the first call;
  we build every layer eagerly so that optimisers and DeepSpeed see all parameters at once).
* ``tick_checkpointing``: recompute ticks in segments of this many during backward (0 = off).
* ``recompute_nlms``: recompute only each tick's neuron-level models during backward, from the
  pre-activations, and keep everything else (less time, a little more memory than segments).
* ``attention_impl``: ``"sdpa"`` (fused kernel) or ``"reference"`` (explicit softmax math).
* ``compile``: run the forward through ``torch.compile`` (``execution.py``); ``"auto"``: on CUDA.
* ``cpu_kernels``: the CPU-only machinery, tick-summed weight gradients and oneDNN-reordered
  weights (``tick_grads.py``); ``"auto"``: on CPU when not compiling.
* ``channels_last``: run a ResNet backbone in channels-last memory format; ``"auto"``: on CUDA.

All but ``in_channels`` change how the model runs, not what it computes (``EXECUTION_FIELDS``):
resume and export ignore them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

NEURON_SELECT_TYPES = ("first-last", "random", "random-pairing")
RESNET_BACKBONES = tuple(
    f"resnet{depth}-{stages}" for depth in (18, 34, 50, 101, 152) for stages in (1, 2, 3, 4)
)
BACKBONE_TYPES = RESNET_BACKBONES + ("shallow-wide", "parity_backbone", "none")
POSITIONAL_EMBEDDING_TYPES = (
    "none",
    "learnable-fourier",
    "multi-learnable-fourier",
    "custom-rotational",
    "custom-rotational-1d",
)
ATTENTION_IMPLS = ("sdpa", "reference")
# output sizes of the task presets when nothing else decides them (the reference's defaults)
MAZE_ROUTE_LENGTH = 100
PARITY_SEQUENCE_LENGTH = 64
EXECUTION_FIELDS = (
    "tick_checkpointing",
    "recompute_nlms",
    "attention_impl",
    "compile",
    "cpu_kernels",
    "channels_last",
)
AUTO_FIELDS = (
    "compile",
    "cpu_kernels",
    "channels_last",
)  # true, false or "auto" (decided per device)
OUR_FIELDS = ("in_channels",) + EXECUTION_FIELDS  # not among the reference constructor's arguments


@dataclass
class CTMConfig:
    iterations: int = 50
    d_model: int = 512
    d_input: int = 128
    heads: int = 4
    n_synch_out: int = 64
    n_synch_action: int = 64
    synapse_depth: int = 1
    memory_length: int = 10
    deep_nlms: bool = True
    memory_hidden_dims: int = 16
    do_layernorm_nlm: bool = False
    backbone_type: str = "resnet18-1"
    positional_embedding_type: str = "none"
    out_dims: int = 10
    prediction_reshaper: list[int] = field(default_factory=lambda: [-1])
    dropout: float = 0.0
    dropout_nlm: float | None = None
    neuron_select_type: str = "random-pairing"
    n_random_pairing_self: int = 0
    # ours
    in_channels: int = 3
    tick_checkpointing: int = 0
    recompute_nlms: bool = False
    attention_impl: str = "sdpa"
    compile: bool | str = "auto"
    cpu_kernels: bool | str = "auto"
    channels_last: bool | str = "auto"

    def __post_init__(self) -> None:
        self.prediction_reshaper = [int(v) for v in self.prediction_reshaper]
        for name in AUTO_FIELDS:  # "true"/"false" as text (a CLI override) become booleans
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
                setattr(self, name, {"true": True, "false": False, "auto": "auto"}[value.lower()])
        self.validate()

    # --- derived sizes -------------------------------------------------------------------

    @property
    def nlm_dropout(self) -> float:
        return self.dropout if self.dropout_nlm is None else self.dropout_nlm

    def synch_size(self, n_synch: int) -> int:
        """Length of the synchronisation vector built from ``n_synch`` selected neurons."""
        if self.neuron_select_type == "random-pairing":
            return n_synch
        return n_synch * (n_synch + 1) // 2

    @property
    def synch_size_out(self) -> int:
        return self.synch_size(self.n_synch_out)

    @property
    def synch_size_action(self) -> int:
        return self.synch_size(self.n_synch_action)

    # --- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"CTMConfig: {message}")

        for name in (
            "iterations",
            "d_model",
            "d_input",
            "heads",
            "memory_length",
            "out_dims",
            "n_synch_out",
            "n_synch_action",
            "synapse_depth",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be a positive integer, got {value!r}",
            )
        need(
            self.d_input % self.heads == 0,
            f"d_input ({self.d_input}) must be divisible by heads ({self.heads})",
        )
        need(
            not self.deep_nlms or self.memory_hidden_dims >= 1,
            f"memory_hidden_dims must be >= 1 with deep_nlms, got {self.memory_hidden_dims}",
        )
        need(
            self.neuron_select_type in NEURON_SELECT_TYPES,
            f"neuron_select_type must be one of {NEURON_SELECT_TYPES}, got {self.neuron_select_type!r}",
        )
        need(
            self.backbone_type in BACKBONE_TYPES,
            f"backbone_type must be one of {BACKBONE_TYPES}, got {self.backbone_type!r}",
        )
        need(
            self.positional_embedding_type in POSITIONAL_EMBEDDING_TYPES,
            f"positional_embedding_type must be one of {POSITIONAL_EMBEDDING_TYPES}, "
            f"got {self.positional_embedding_type!r}",
        )
        need(
            not (self.backbone_type == "none" and self.positional_embedding_type != "none"),
            "a positional embedding needs a backbone (backbone_type='none' takes positional_embedding_type='none')",
        )
        for name in ("n_synch_out", "n_synch_action"):
            need(
                getattr(self, name) <= self.d_model or self.neuron_select_type != "first-last",
                f"{name} must be <= d_model",
            )
        if self.neuron_select_type == "first-last":
            need(
                self.d_model >= self.n_synch_out + self.n_synch_action,
                f"first-last selection needs d_model ({self.d_model}) >= n_synch_out + n_synch_action "
                f"({self.n_synch_out} + {self.n_synch_action})",
            )
        if self.neuron_select_type == "random-pairing":
            need(
                0 <= self.n_random_pairing_self < min(self.n_synch_out, self.n_synch_action),
                f"n_random_pairing_self ({self.n_random_pairing_self}) must be >= 0 and smaller than "
                f"n_synch_out and n_synch_action",
            )
        for name in ("dropout", "dropout_nlm"):
            value = getattr(self, name)
            need(
                value is None
                and name == "dropout_nlm"
                or (value is not None and 0.0 <= value < 1.0),
                f"{name} must be in [0, 1), got {value!r}",
            )
        need(
            isinstance(self.tick_checkpointing, int) and self.tick_checkpointing >= 0,
            f"tick_checkpointing must be an integer >= 0, got {self.tick_checkpointing!r}",
        )
        need(
            isinstance(self.recompute_nlms, bool),
            f"recompute_nlms must be true or false, got {self.recompute_nlms!r}",
        )
        need(
            not (self.recompute_nlms and self.tick_checkpointing),
            "recompute_nlms and tick_checkpointing are two ways to recompute in backward: choose one",
        )
        need(
            self.attention_impl in ATTENTION_IMPLS,
            f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
        )
        for name in AUTO_FIELDS:
            value = getattr(self, name)
            need(
                isinstance(value, bool) or value == "auto",
                f'{name} must be true, false or "auto", got {value!r}',
            )
        need(
            not (self.compile is True and self.cpu_kernels is True),
            "cpu_kernels (Python-side gradient banks) cannot run inside a compiled forward: "
            "set compile or cpu_kernels to false",
        )
        need(
            not (self.compile is True and (self.tick_checkpointing or self.recompute_nlms)),
            'tick_checkpointing and recompute_nlms run eager only: set compile to false or "auto"',
        )
        need(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        need(
            len(self.prediction_reshaper) >= 1 and self.prediction_reshaper.count(-1) <= 1,
            f"prediction_reshaper must be a non-empty shape with at most one -1, got {self.prediction_reshaper}",
        )
        known = [v for v in self.prediction_reshaper if v != -1]
        product = 1
        for v in known:
            need(
                v >= 1,
                f"prediction_reshaper entries must be positive or -1, got {self.prediction_reshaper}",
            )
            product *= v
        if -1 in self.prediction_reshaper:
            need(
                self.out_dims % product == 0,
                f"out_dims ({self.out_dims}) does not fit prediction_reshaper {self.prediction_reshaper}",
            )
        else:
            need(
                product == self.out_dims,
                f"prediction_reshaper {self.prediction_reshaper} has {product} elements, out_dims is {self.out_dims}",
            )

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CTMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CTMConfig: unknown fields {unknown}")
        return cls(**values)

    def replace(self, **changes: Any) -> CTMConfig:
        return dataclasses.replace(self, **changes)


# --- presets -----------------------------------------------------------------------------------


def _imagenet() -> dict[str, Any]:
    # tasks/image_classification/scripts/train_imagenet.sh (the log name says synch=8192)
    return dict(
        iterations=75,
        d_model=4096,
        d_input=1024,
        heads=16,
        n_synch_out=8192,
        n_synch_action=2048,
        n_random_pairing_self=32,
        neuron_select_type="random-pairing",
        synapse_depth=8,
        memory_length=25,
        deep_nlms=True,
        memory_hidden_dims=64,
        dropout=0.2,
        dropout_nlm=0.0,
        do_layernorm_nlm=False,
        positional_embedding_type="none",
        backbone_type="resnet152-4",
        out_dims=1000,
        prediction_reshaper=[-1],
    )


def _mazes(route_length: int = MAZE_ROUTE_LENGTH) -> dict[str, Any]:
    # tasks/mazes/scripts/train_ctm.sh
    return dict(
        iterations=75,
        d_model=2048,
        d_input=512,
        heads=16,
        n_synch_out=64,
        n_synch_action=32,
        neuron_select_type="first-last",
        synapse_depth=8,
        memory_length=25,
        deep_nlms=True,
        memory_hidden_dims=32,
        dropout=0.1,
        do_layernorm_nlm=False,
        positional_embedding_type="none",
        backbone_type="resnet34-2",
        out_dims=route_length * 5,
        prediction_reshaper=[route_length, 5],
    )


def _parity(sequence_length: int = PARITY_SEQUENCE_LENGTH) -> dict[str, Any]:
    # tasks/parity/scripts/train_ctm_75_25.sh
    return dict(
        iterations=75,
        d_model=1024,
        d_input=512,
        heads=8,
        n_synch_out=32,
        n_synch_action=32,
        neuron_select_type="random",
        synapse_depth=1,
        memory_length=25,
        deep_nlms=True,
        memory_hidden_dims=16,
        dropout=0.0,
        do_layernorm_nlm=False,
        positional_embedding_type="custom-rotational-1d",
        backbone_type="parity_backbone",
        out_dims=sequence_length * 2,
        prediction_reshaper=[sequence_length, 2],
    )


def _cifar10() -> dict[str, Any]:
    # tasks/image_classification/scripts/train_cifar10.sh
    return dict(
        iterations=50,
        d_model=256,
        d_input=64,
        heads=16,
        n_synch_out=256,
        n_synch_action=512,
        n_random_pairing_self=0,
        neuron_select_type="random-pairing",
        synapse_depth=5,
        memory_length=15,
        deep_nlms=True,
        memory_hidden_dims=64,
        dropout=0.0,
        dropout_nlm=0.0,
        do_layernorm_nlm=False,
        positional_embedding_type="none",
        backbone_type="resnet18-1",
        out_dims=10,
        prediction_reshaper=[-1],
    )


def _demo() -> dict[str, Any]:
    # Small enough to learn 10-class 32x32 digits on two CPU cores in minutes.
    return dict(
        iterations=8,
        d_model=128,
        d_input=64,
        heads=4,
        n_synch_out=64,
        n_synch_action=64,
        n_random_pairing_self=0,
        neuron_select_type="random-pairing",
        synapse_depth=1,
        memory_length=4,
        deep_nlms=True,
        memory_hidden_dims=8,
        dropout=0.0,
        dropout_nlm=0.0,
        do_layernorm_nlm=False,
        positional_embedding_type="none",
        backbone_type="resnet18-1",
        out_dims=10,
        prediction_reshaper=[-1],
    )


_PRESETS = {
    "imagenet": _imagenet,
    "mazes": _mazes,
    "parity": _parity,
    "cifar10": _cifar10,
    "demo": _demo,
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> CTMConfig:
    """A named configuration with fields overridden.

    ``mazes`` also takes ``route_length`` and ``parity`` takes ``sequence_length``; they set
    ``out_dims`` and ``prediction_reshaper`` together.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")
    builder_args = {}
    for key in ("route_length", "sequence_length"):
        if key in overrides:
            builder_args[key] = overrides.pop(key)
    try:
        values = _PRESETS[name](**builder_args)
    except TypeError as err:
        raise ValueError(f"preset {name!r} does not take {sorted(builder_args)}") from err
    known = {f.name for f in dataclasses.fields(CTMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown CTMConfig fields {unknown} for preset {name!r}")
    values.update(overrides)
    return CTMConfig(**values)
