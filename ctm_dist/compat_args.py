"""What the mappings of saved checkpoints to our configs (``compat*.py``, ``hub.py``) share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ctm_dist.storage.checkpoints import CheckpointError

C = TypeVar("C")


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
