"""What the model configs (CTM, LSTM baseline, Q&A MNIST, RL agent) have in common.

* ``ConfigDict``: the dict round trip (``to_dict``, ``from_dict`` that names unknown fields,
  ``replace``) of a config dataclass.
* ``requirement`` and the checks built on it: the validity rules that more than one config
  states (positive integer sizes, the backbone / positional embedding / attention input path,
  a prediction shape that fits the output), each raising ``ValueError("<Config>: <message>")``.
* ``preset_config``: a named preset's fields with overrides, as every config's ``preset`` builds
  it.

The backbone and positional embedding names the input-path check accepts are defined here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

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

Need = Callable[[bool, str], None]
C = TypeVar("C")


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


class ConfigDict:
    """The dict round trip of a config dataclass (mixed into each config class)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        unknown = sorted(set(values) - field_names(cls))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def requirement(owner: str) -> Need:
    """``need(ok, message)``: raise ``ValueError("<owner>: <message>")`` unless ``ok``."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"{owner}: {message}")

    return need


def check_positive_ints(need: Need, cfg: Any, names: Iterable[str]) -> None:
    """Each named field is an integer (not a bool) >= 1."""
    for name in names:
        value = getattr(cfg, name)
        need(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"{name} must be a positive integer, got {value!r}",
        )


def check_heads(need: Need, cfg: Any) -> None:
    need(
        cfg.d_input % cfg.heads == 0,
        f"d_input ({cfg.d_input}) must be divisible by heads ({cfg.heads})",
    )


def check_input_path(need: Need, cfg: Any) -> None:
    """A known backbone and positional embedding, and an embedding only over a backbone."""
    need(
        cfg.backbone_type in BACKBONE_TYPES,
        f"backbone_type must be one of {BACKBONE_TYPES}, got {cfg.backbone_type!r}",
    )
    need(
        cfg.positional_embedding_type in POSITIONAL_EMBEDDING_TYPES,
        f"positional_embedding_type must be one of {POSITIONAL_EMBEDDING_TYPES}, "
        f"got {cfg.positional_embedding_type!r}",
    )
    need(
        not (cfg.backbone_type == "none" and cfg.positional_embedding_type != "none"),
        "a positional embedding needs a backbone "
        "(backbone_type='none' takes positional_embedding_type='none')",
    )


def check_prediction_reshaper(need: Need, cfg: Any) -> None:
    """``prediction_reshaper`` is a shape of positive sizes (at most one -1) of ``out_dims``."""
    shape = cfg.prediction_reshaper
    need(
        len(shape) >= 1 and shape.count(-1) <= 1,
        f"prediction_reshaper must be a non-empty shape with at most one -1, got {shape}",
    )
    product = 1
    for v in shape:
        if v != -1:
            need(v >= 1, f"prediction_reshaper entries must be positive or -1, got {shape}")
            product *= v
    need(
        cfg.out_dims % product == 0 if -1 in shape else product == cfg.out_dims,
        f"out_dims ({cfg.out_dims}) does not fit prediction_reshaper {shape}",
    )


def preset_config(
    cls: type[C],
    builders: Mapping[str, Callable[..., dict[str, Any]]],
    name: str,
    overrides: dict[str, Any],
    *,
    builder_args: Iterable[str] = (),
    label: str = "unknown preset",
    choices: Iterable[str] | None = None,
) -> C:
    """``cls`` with the fields of preset ``name`` (``builders[name]``) and ``overrides``.

    The overrides named in ``builder_args`` (``sequence_length``, ...) are the builder's
    arguments, not fields. ``label`` starts the error for an unknown name, which lists
    ``choices`` (by default the builders' names).
    """
    if name not in builders:
        names = tuple(builders) if choices is None else tuple(choices)
        raise ValueError(f"{label} {name!r}; choose one of {names}")
    arguments = {key: overrides.pop(key) for key in builder_args if key in overrides}
    try:
        values = builders[name](**arguments)
    except TypeError as err:
        raise ValueError(f"preset {name!r} does not take {sorted(arguments)}") from err
    unknown = sorted(set(overrides) - field_names(cls))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown} for preset {name!r}")
    return cls(**{**values, **overrides})
