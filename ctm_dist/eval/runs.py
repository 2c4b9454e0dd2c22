"""Reading a training run's checkpoints (read-only), through the checkpoint format's own checks.

The layout, the COMMIT marker and its checks live in :mod:`ctm_dist.storage.checkpoints`, which
the trainer's checkpointer writes with: a step this module offers is one the trainer would resume
from. Without an explicit step, the newest committed step whose files pass their checks is used;
an older one is taken, with a warning, when the newest is damaged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ctm_dist.data.index import read_index
from ctm_dist.model.kinds import CONFIG_TYPES, kind_of_fields
from ctm_dist.storage import Location
from ctm_dist.storage import checkpoints as fmt
from ctm_dist.storage.checkpoints import (
    NoCheckpoint,  # noqa: F401 - re-exported
    NotACheckpoint,
    UnsafeCheckpoint,
    step_name,
)
from ctm_dist.tasks import TASKS, get_task

log = logging.getLogger(__name__)
T = TypeVar("T")


def checkpoints(run: Location) -> Location:
    return run.child("checkpoints")


def is_run(location: Location) -> bool:
    return location.exists("checkpoints")


def committed_steps(run: Location) -> list[int]:
    """Steps whose COMMIT marker passes the checks the trainer applies, oldest first."""
    return fmt.committed_steps(checkpoints(run))


def _no_usable_step(run: Location) -> NoCheckpoint:
    """The error for a run without a usable step, naming why committed steps were refused."""
    refused: list[str] = []
    fmt.committed_steps(checkpoints(run), on_invalid=lambda step, e: refused.append(str(e)))
    if refused:
        return NoCheckpoint(f"{run.url}: no usable checkpoint: {refused[-1]}")
    return NoCheckpoint(f"{run.url}: no committed checkpoint (checkpoints/step-*/COMMIT)")


def step_dir(step: int) -> str:
    return f"checkpoints/{step_name(step)}"


def choose_step(run: Location, step: int | None = None) -> int:
    steps = committed_steps(run)
    if not steps:
        raise _no_usable_step(run)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise NoCheckpoint(
            f"{run.url}: step {step} has no committed checkpoint; committed: {steps}"
        )
    return step


def read_commit(run: Location, step: int) -> dict:
    """The checked COMMIT marker of ``step`` (see :func:`ctm_dist.storage.checkpoints.read_commit`)."""
    return fmt.read_commit(checkpoints(run), step)


def download_step(
    run: Location, step: int, local_dir: str | os.PathLike, commit: dict | None = None
) -> tuple[Path, str]:
    """Copy the DeepSpeed files of a committed step into ``local_dir``, each checked against COMMIT
    (size, SHA-256) and opened weights-only; returns (DeepSpeed checkpoint dir, tag)."""
    commit = commit or read_commit(run, step)
    tag = step_name(step)
    ds_dir = Path(local_dir) / tag
    names = [f for f in commit["files"] if not f.startswith("extra-rank-")]
    fmt.fetch_files(checkpoints(run), commit, names, ds_dir)
    fmt.check_loadable(ds_dir, run.name_url(step_dir(step)))
    return Path(local_dir), tag


def with_loadable_step(
    run: Location, step: int | None, use: Callable[[int, dict], T]
) -> tuple[int, dict, T]:
    """``use(step, commit)`` on ``step``, or on the newest committed step, falling back to older ones
    (with a warning) while a step's files fail their checks. Returns (step, commit, result)."""
    if step is not None:
        choose_step(run, step)
        commit = read_commit(run, step)
        return step, commit, use(step, commit)
    steps = committed_steps(run)
    if not steps:
        raise _no_usable_step(run)
    for i, candidate in enumerate(reversed(steps)):
        try:
            commit = read_commit(run, candidate)
            return candidate, commit, use(candidate, commit)
        except (NotACheckpoint, UnsafeCheckpoint) as e:
            if i + 1 == len(steps):
                raise
            log.warning(
                "cannot load %s of %s (%s); using the previous committed step %s",
                step_name(candidate),
                run.url,
                e,
                step_name(steps[-i - 2]),
            )
    raise AssertionError("unreachable")


def find_deepspeed_checkpoint(root: str | os.PathLike) -> tuple[Path, str]:
    """(DeepSpeed checkpoint dir, tag): the directory whose sub-directory ``tag`` holds model states."""
    root = Path(root)
    hits = sorted(p.parent for p in root.rglob("*model_states.pt"))
    if not hits:
        raise FileNotFoundError(f"{root}: no DeepSpeed model states (*model_states.pt) inside")
    tag_dir = hits[0]
    return tag_dir.parent, tag_dir.name


def data_meta(commit: dict) -> dict:
    """The training shard set's metadata (class names, image size...), when its index is reachable."""
    data = (commit.get("config") or {}).get("data") or {}
    if (
        not data.get("url")
        or data.get("task") not in TASKS
        or get_task(data["task"]).generated_data
    ):
        return {}

    try:
        return dict(read_index(Location.parse(data["url"]), "train").meta)
    except Exception:  # data gone or unreachable: the weights and config still load
        return {}


def model_config_from_commit(commit: dict) -> dict | None:
    """The config fields (of the CTM or a baseline) of a COMMIT marker: ``config.model`` as the
    trainer records it (every shape-giving field), or None when the marker records no model config."""

    model = (commit.get("config") or {}).get("model")
    if not isinstance(model, dict) or "d_model" not in model:
        return None
    config_type = CONFIG_TYPES[kind_of_fields(model)]
    known = {f.name for f in dataclasses.fields(config_type)}
    return {k: v for k, v in model.items() if k in known}
