"""Typed configuration of the CTM and named presets.

Field names follow the reference constructor's keyword arguments so that a reference run's
arguments map one to one. These fields are ours:

* ``in_channels``: channels of the input (the reference infers them lazily on the first call;
  we build every layer eagerly so that optimisers and DeepSpeed see all parameters at once).
* ``variant``: which CTM the config describes (``VARIANTS``). ``"ctm"`` is the reference's
  ``ContinuousThoughtMachine``; ``"sort"`` its ``ContinuousThoughtMachineSORT``, which feeds the raw
  input vector to the synapses at every tick instead of attending over backbone features, and so
  has no backbone, no attention and no action synchronisation: there ``heads`` and
  ``n_synch_action`` are 0 and ``d_input`` is the input's length (``model/sort.py``).
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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config_base import (
    ConfigDict,
    check_heads,
    check_input_path,
    check_positive_ints,
    check_prediction_reshaper,
    preset_config,
    requirement,
)

NEURON_SELECT_TYPES = ("first-last", "random", "random-pairing")
ATTENTION_IMPLS = ("sdpa", "reference")
VARIANTS = ("ctm", "sort")
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
OUR_FIELDS = (
    "in_channels",
    "variant",
) + EXECUTION_FIELDS  # not among the reference constructor's arguments


@dataclass
class CTMConfig(ConfigDict):
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
    variant: str = "ctm"
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
        need = requirement("CTMConfig")
        need(
            self.variant in VARIANTS,
            f"variant must be one of {VARIANTS}, got {self.variant!r}",
        )
        attends = self.variant == "ctm"  # the sort variant reads its input without attention
        check_positive_ints(
            need,
            self,
            ("iterations", "d_model", "d_input", "memory_length", "out_dims", "n_synch_out")
            + ("synapse_depth",)
            + (("heads", "n_synch_action") if attends else ()),
        )
        if attends:
            check_heads(need, self)
        else:
            need(
                self.heads == 0 and self.n_synch_action == 0,
                f"the {self.variant} variant has no attention: heads and n_synch_action must be 0, "
                f"got {self.heads} and {self.n_synch_action}",
            )
            need(
                self.backbone_type == "none",
                f"the {self.variant} variant has no backbone: backbone_type must be 'none', "
                f"got {self.backbone_type!r}",
            )
        need(
            not self.deep_nlms or self.memory_hidden_dims >= 1,
            f"memory_hidden_dims must be >= 1 with deep_nlms, got {self.memory_hidden_dims}",
        )
        need(
            self.neuron_select_type in NEURON_SELECT_TYPES,
            f"neuron_select_type must be one of {NEURON_SELECT_TYPES}, got {self.neuron_select_type!r}",
        )
        check_input_path(need, self)
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
            synch_sizes = (
                (self.n_synch_out, self.n_synch_action) if attends else (self.n_synch_out,)
            )
            need(
                0 <= self.n_random_pairing_self < min(synch_sizes),
                f"n_random_pairing_self ({self.n_random_pairing_self}) must be >= 0 and smaller than "
                + (" and ".join(("n_synch_out", "n_synch_action")[: len(synch_sizes)])),
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
        check_prediction_reshaper(need, self)


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


def _parity_small(sequence_length: int = 16) -> dict[str, Any]:
    # parity at a scale two CPU cores train in minutes: 16 positions, 16 ticks, 128 neurons
    return dict(
        _parity(sequence_length),
        iterations=16,
        d_model=128,
        d_input=64,
        heads=4,
        n_synch_out=32,
        n_synch_action=32,
        memory_length=8,
        memory_hidden_dims=8,
    )


def _mazes_small(route_length: int = 4) -> dict[str, Any]:
    # small mazes (19x19 pixels) and the first moves of their routes, in minutes on two CPU cores
    return dict(
        _mazes(route_length),
        iterations=12,
        d_model=128,
        d_input=64,
        heads=4,
        n_synch_out=32,
        n_synch_action=16,
        synapse_depth=1,
        memory_length=8,
        memory_hidden_dims=8,
        dropout=0.0,
        backbone_type="resnet18-1",
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


def _sort(sequence_length: int = 30) -> dict[str, Any]:
    # tasks/sort/train.py defaults (N_to_sort=30); the model takes the N numbers as its input
    # vector and emits one of N indices or a blank (the last class) per tick
    return dict(
        variant="sort",
        iterations=50,
        d_model=512,
        d_input=sequence_length,
        heads=0,
        n_synch_out=32,
        n_synch_action=0,
        neuron_select_type="random-pairing",
        n_random_pairing_self=0,
        synapse_depth=4,
        memory_length=25,
        deep_nlms=True,
        memory_hidden_dims=4,
        dropout=0.0,
        dropout_nlm=None,
        do_layernorm_nlm=False,
        positional_embedding_type="none",
        backbone_type="none",
        out_dims=sequence_length + 1,
        prediction_reshaper=[-1],
    )


def _sort_small(sequence_length: int = 10) -> dict[str, Any]:
    # Sorts 10 numbers well above chance (1/10 per position) within minutes on two CPU cores.
    return dict(
        _sort(sequence_length),
        iterations=16,
        d_model=128,
        n_synch_out=64,
        synapse_depth=1,
        memory_length=8,
        memory_hidden_dims=4,
    )


_PRESETS = {
    "imagenet": _imagenet,
    "mazes": _mazes,
    "mazes-small": _mazes_small,
    "parity": _parity,
    "parity-small": _parity_small,
    "cifar10": _cifar10,
    "demo": _demo,
    "sort": _sort,
    "sort-small": _sort_small,
}
PRESET_NAMES = tuple(_PRESETS)
# Presets of model variants whose config extends CTMConfig (name -> builder taking the overrides),
# filled by the variant's module when ``ctm_dist.model`` is imported (``qamnist.py``).
VARIANT_PRESETS: dict[str, Callable[..., CTMConfig]] = {}


def preset(name: str, **overrides: Any) -> CTMConfig:
    """A named configuration with fields overridden.

    ``mazes`` also takes ``route_length``, ``parity`` and the ``sort`` presets take
    ``sequence_length``; they set ``out_dims`` and ``prediction_reshaper`` (for sorting,
    ``d_input``) together. A variant's preset (``VARIANT_PRESETS``) returns the variant's config.
    """
    if name in VARIANT_PRESETS:
        return VARIANT_PRESETS[name](**overrides)
    return preset_config(
        CTMConfig,
        _PRESETS,
        name,
        overrides,
        builder_args=("route_length", "sequence_length"),
        choices=PRESET_NAMES + tuple(VARIANT_PRESETS),
    )
