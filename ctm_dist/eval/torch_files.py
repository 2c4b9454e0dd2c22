"""Which file of a DeepSpeed checkpoint a weights-only load fails on, and why, in one line.

DeepSpeed's merge of ZeRO shards stops with torch's own message, which names no file and, for a
pickle that would run code, suggests loading with ``weights_only=False``. The checkpoint's torch
files are loaded one by one only after such a failure, to name the file and the problem.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

UNREADABLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError)
# torch's weights-only unpickler starts every refusal with this.
_REFUSED = "Weights only load failed"


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is corrupt, truncated, or holds objects a weights-only load refuses."""


def problem(path: str | os.PathLike, error: BaseException) -> str:
    """One line: why loading ``path`` failed (without torch's advice to turn weights-only loading off)."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if _REFUSED in text:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
        except Exception:  # not a zip archive, or unreadable: the unpickler's own words instead
            found = [line for line in lines[1:] if "GLOBAL" in line or "Unsupported" in line][:1]
        what = f" ({', '.join(found[:5])})" if found else ""
        return f"refused to load: it holds Python objects{what} that a weights-only load does not run"
    first = lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__
    return f"corrupt or truncated torch file ({first})"


def unreadable_checkpoint(checkpoint_dir: str | os.PathLike, error: BaseException) -> UnreadableCheckpoint:
    """The error to raise for a checkpoint directory DeepSpeed failed to read with ``error``.

    Must run where the failing load ran (same allowed globals), so the file that fails here is the one."""
    root = Path(checkpoint_dir)
    for path in sorted([*root.rglob("*model_states.pt"), *root.rglob("*optim_states.pt")]):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except UNREADABLE_ERRORS as e:
            return UnreadableCheckpoint(f"{path.relative_to(root)}: {problem(path, e)}")
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return UnreadableCheckpoint(f"DeepSpeed could not read the checkpoint: {type(error).__name__}: {first}")
