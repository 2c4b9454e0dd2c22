"""The checkpoint format, in one place: layout, the COMMIT marker, its checks, safe loading, errors.

Layout: ``{run}/checkpoints/step-{step:09d}/`` holds DeepSpeed's files for tag ``step-{step:09d}``
(``mp_rank_*_model_states.pt``, ``*_optim_states.pt``), one ``extra-rank-{rank:05d}.pt`` per rank
(data position, RNG states: plain tensors and dicts) and, written last, the ``COMMIT`` marker::

    {"format": "ctm-dist-checkpoint/2", "step": 100, "world_size": 2, "zero_stage": 2,
     "files": {"mp_rank_00_model_states.pt": 3417, ...},
     "sha256": {"mp_rank_00_model_states.pt": "9f86d0...", ...}, "config": {...}, "time": "..."}

A step is committed when its COMMIT parses, every listed file name is a plain file name, and the
store holds every listed file with the listed size. A file whose SHA-256 differs from the one in
COMMIT (checked when it is downloaded) makes the step unusable (:class:`NotACheckpoint`).
Markers of format ``ctm-dist-checkpoint/1`` (no checksums) are still read, with sizes checked only.

Every file is opened with ``torch.load(weights_only=True)`` (:func:`safe_load`) before DeepSpeed's
own loader, which unpickles without that restriction, sees it.

The trainer (``ctm_dist.train.checkpointer``) writes this format; the evaluation side
(``ctm_dist.eval``) reads it through the same functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .location import Location

FORMAT = "ctm-dist-checkpoint/2"
READABLE_FORMATS = ("ctm-dist-checkpoint/1", FORMAT)
COMMIT = "COMMIT"
STEP_DIR = re.compile(r"step-(\d{9})")
RANK_FILE = re.compile(r"(?:^|_)(?:zero_pp_rank|bf16_zero_pp_rank|fp16_zero_pp_rank)_(\d+)_")
# A file of a checkpoint is one path component: no separators, no "." or "..", no leading dot.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint could not be saved, read or loaded; the message says which and why.

    A ``ValueError`` (the input is unusable) and a ``RuntimeError`` (the operation failed), so
    callers catching either keep working."""


class NoCheckpoint(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists where one was asked for."""


class ConfigMismatch(CheckpointError):
    """The checkpoint was written for another model configuration."""


class NotACheckpoint(CheckpointError):
    """A file in the checkpoint is not what a checkpoint holds (corrupt, foreign, truncated, changed)."""


class UnsafeCheckpoint(CheckpointError):
    """A file would need to run code to unpickle, or would be written outside its directory; refused."""


class RunLocked(CheckpointError):
    """Another job holds the run's writer lease."""


def step_name(step: int) -> str:
    return f"step-{int(step):09d}"


def extra_name(rank: int) -> str:
    return f"extra-rank-{int(rank):05d}.pt"


def check_file_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name; :class:`UnsafeCheckpoint` for paths (``..``, ``/x``, ``a/b``)."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise UnsafeCheckpoint(
            f"{where}: refused the file name {str(name)[:120]!r}: a checkpoint file must "
            "be a plain name (no '/', '..' or leading '.'), else it could be written "
            "outside the checkpoint directory"
        )
    return name


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- safe loading


def deepspeed_safe_globals() -> list:
    """DeepSpeed classes its checkpoint files pickle; plain data, allowed for weights-only loading."""
    found = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def safe_load(path: str | os.PathLike, what: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` with clear errors for foreign files and code-carrying pickles."""
    what = what or os.fspath(path)
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a foreign or hostile file can fail
        lines = str(e).strip().splitlines()
        unsafe = [ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln]
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise UnsafeCheckpoint(
                f"{what}: refused to unpickle (it needs code to load, which could run "
                f"arbitrary commands; nothing was executed): {unsafe[0].strip()[:300]}"
            ) from None
        msg = " ".join(str(e).split())[:200]
        raise NotACheckpoint(
            f"{what}: not a torch checkpoint file ({type(e).__name__}: {msg})"
        ) from None


def check_loadable(directory: str | os.PathLike, what: str | None = None) -> None:
    """Open every file under ``directory`` with :func:`safe_load`: before an unrestricted loader reads them."""
    root = Path(directory)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        safe_load(path, f"{what}/{path.relative_to(root).as_posix()}" if what else None)


# ---------------------------------------------------------------------------------- COMMIT


def parse_commit(raw: bytes, step: int, where: str) -> dict:
    """The COMMIT document of ``step`` with ``files`` ({name: size}) and ``sha256`` ({name: hex} or
    None for the checksum-less format 1); :class:`NotACheckpoint` / :class:`UnsafeCheckpoint` otherwise."""
    try:
        commit = json.loads(raw)
        if not isinstance(commit, dict) or commit.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format is not one of {READABLE_FORMATS}")
        if int(commit["step"]) != step:
            raise ValueError(f"it is for step {commit['step']}")
        files = {str(k): int(v) for k, v in commit["files"].items()}
        sums = commit.get("sha256")
        if commit["format"] != READABLE_FORMATS[0]:
            sums = {str(k): str(v) for k, v in sums.items()}
            if set(sums) != set(files) or not all(_SHA256.fullmatch(v) for v in sums.values()):
                raise ValueError("its sha256 list does not match its file list")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NotACheckpoint(f"{where}: not a ctm-dist commit marker ({e})") from None
    for name in files:
        check_file_name(name, where)
    commit["files"], commit["sha256"] = (
        files,
        (sums if commit["format"] != READABLE_FORMATS[0] else None),
    )
    return commit


def stored_sizes(checkpoints: Location, name: str) -> dict[str, int]:
    """{file name: size} of every object under ``checkpoints/name`` as the store lists it now."""
    base = checkpoints.join(name)

    def find():
        with contextlib.suppress(Exception):
            checkpoints.fs.invalidate_cache(base)
        return checkpoints.fs.find(base, detail=True)

    try:
        found = checkpoints.call(find, name)
    except FileNotFoundError:
        return {}
    return {posixpath.relpath(p, base): int(info.get("size") or 0) for p, info in found.items()}


def read_commit(checkpoints: Location, step: int) -> dict:
    """The checked COMMIT of ``step`` under ``checkpoints`` (a run's ``checkpoints/`` location): it
    parses, names plain files only, and the store holds each listed file with its listed size."""
    name = step_name(step)
    marker = f"{name}/{COMMIT}"
    try:
        raw = checkpoints.read_bytes(marker)
    except FileNotFoundError:
        raise NoCheckpoint(
            f"{checkpoints.name_url(name)} is not committed (no {COMMIT} marker)"
        ) from None
    commit = parse_commit(raw, step, checkpoints.name_url(marker))
    present = stored_sizes(checkpoints, name)
    for fname, size in commit["files"].items():
        if present.get(fname) != size:
            raise NotACheckpoint(
                f"{checkpoints.name_url(name + '/' + fname)}: listed in {COMMIT} "
                f"with {size} bytes but the store has {present.get(fname, 'no file')}"
            )
    return commit


def step_dirs(checkpoints: Location) -> list[int]:
    """Steps that have a ``step-*`` directory (committed or not); ascending."""
    try:
        names = checkpoints.list()
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := STEP_DIR.fullmatch(n)))


def committed_steps(checkpoints: Location, on_invalid=None) -> list[int]:
    """Steps whose COMMIT passes :func:`read_commit`; ascending. ``on_invalid(step, error)`` hears of
    markers that exist but fail the checks."""
    steps = []
    for step in step_dirs(checkpoints):
        try:
            read_commit(checkpoints, step)
            steps.append(step)
        except NoCheckpoint:
            continue
        except CheckpointError as e:
            if on_invalid is not None:
                on_invalid(step, e)
    return steps


def fetch_files(
    checkpoints: Location, commit: dict, names: Iterable[str], dest: str | os.PathLike
) -> list[Path]:
    """Download the listed ``names`` of ``commit``'s step into ``dest`` and check each one's size and
    SHA-256 against COMMIT; a mismatch is :class:`NotACheckpoint` (the step is unusable)."""
    name = step_name(commit["step"])
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for fname in names:
        where = checkpoints.name_url(f"{name}/{fname}")
        if fname not in commit["files"]:
            raise NotACheckpoint(f"{where} is not in the checkpoint")
        target = dest / check_file_name(fname, where)
        checkpoints.get_file(f"{name}/{fname}", target)
        size = target.stat().st_size
        if size != commit["files"][fname]:
            raise NotACheckpoint(
                f"{where}: downloaded {size} bytes, {COMMIT} lists {commit['files'][fname]}"
            )
        if commit.get("sha256") is not None and sha256_file(target) != commit["sha256"][fname]:
            raise NotACheckpoint(
                f"{where}: its SHA-256 differs from the one in {COMMIT} (the file changed "
                "or was damaged after it was committed); this step is unusable"
            )
        out.append(target)
    return out
