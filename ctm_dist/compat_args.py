"""What the mappings of saved checkpoints to our configs (``compat*.py``, ``hub.py``) share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ctm_dist.storage.checkpoints import CheckpointError

C = TypeVar("C")


def ctm_core_fields(args: Any) -> dict[str, Any]:
    """The CTM fields that the reference's CTM train scripts (classification, mazes, parity,
    sort, Q&A MNIST) save under the same option names: the core's sizes and NLMs."""
    return dict(
        iterations=args.iterations,
        d_model=args.d_model,
        n_synch_out=args.n_synch_out,
        synapse_depth=args.synapse_depth,
        memory_length=args.memory_length,
        deep_nlms=bool(args.deep_memory),
        memory_hidden_dims=args.memory_hidden_dims,
        do_layernorm_nlm=bool(getattr(args, "do_normalisation", False)),
        n_random_pairing_self=getattr(args, "n_random_pairing_self", 0),
    )


def require_args(args: Any, names: tuple[str, ...], script: str) -> None:
    """:class:`CheckpointError` unless ``args`` has every option in ``names`` (``script``: whose
    checkpoint it should be, e.g. "a reference LSTM train script")."""
    missing = [name for name in names if not hasattr(args, name)]
    if missing:
        raise CheckpointError(f"checkpoint args lack {missing}; not a checkpoint of {script}")


def config_from_args(
    build: Callable[..., C],
    values: dict[str, Any],
    what: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    source: str = "checkpoint args describe",
) -> C:
    """``build`` from the fields read off a checkpoint (with ``overrides``).

    Fields that do not make a valid config are the checkpoint's fault, so they raise
    :class:`CheckpointError`: "<source> an invalid <what>: <why>".
    """
    try:
        return build(**{**values, **(overrides or {})})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source} an invalid {what}: {err}") from err
