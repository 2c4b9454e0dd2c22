"""Reading a training run's checkpoints (read-only): committed steps, their marker, a local copy.

Layout (written by the trainer's checkpointer): ``{run}/checkpoints/step-{step:09d}/`` holding a
DeepSpeed checkpoint directory, visible only once ``COMMIT`` (a JSON document) exists in it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ctm_dist.storage import Location

STEP_DIR = re.compile(r"^step-(\d{9})$")
COMMIT = "COMMIT"


def is_run(location: Location) -> bool:
    return location.exists("checkpoints")


def committed_steps(run: Location) -> list[int]:
    """Steps with a COMMIT marker, oldest first."""
    if not run.exists("checkpoints"):
        return []
    steps = []
    for name in run.list("checkpoints"):
        m = STEP_DIR.match(name)
        if m and run.exists(f"checkpoints/{name}/{COMMIT}"):
            steps.append(int(m.group(1)))
    return sorted(steps)


def step_dir(step: int) -> str:
    return f"checkpoints/step-{step:09d}"


def choose_step(run: Location, step: int | None = None) -> int:
    steps = committed_steps(run)
    if not steps:
        raise FileNotFoundError(f"{run.url}: no committed checkpoint (checkpoints/step-*/COMMIT)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{run.url}: step {step} has no committed checkpoint; committed: {steps}")
    return step


def read_commit(run: Location, step: int) -> dict:
    return json.loads(run.read_bytes(f"{step_dir(step)}/{COMMIT}"))


def download_step(run: Location, step: int, local_dir: str | os.PathLike) -> Path:
    """Copy one committed checkpoint directory to ``local_dir`` (a local run is used in place)."""
    if run.protocol == "file":
        return Path(run.join(step_dir(step)))
    run.get_dir(step_dir(step), local_dir)
    return Path(local_dir)


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
    if not data.get("url") or data.get("task") == "parity":
        return {}
    from ctm_dist.data.index import read_index

    try:
        return dict(read_index(Location.parse(data["url"]), "train").meta)
    except Exception:  # data gone or unreachable: the weights and config still load
        return {}


def model_config_from_commit(commit: dict) -> dict | None:
    """The CTMConfig fields of a COMMIT marker.

    The trainer records them as ``config.model`` (every shape-giving CTMConfig field); a
    ``config.model_config`` wins if present. A ``config.model`` of ``preset`` + ``overrides`` is
    resolved as the trainer's task plug-ins do (classes -> ``out_dims``, maze ``route_length``,
    parity ``sequence_length``)."""
    from ctm_dist.model import CTMConfig, preset

    config = commit.get("config") or {}
    for node in (commit.get("model_config"), config.get("model_config"), config.get("model")):
        if isinstance(node, dict) and "d_model" in node:
            known = {f for f in CTMConfig.__dataclass_fields__}
            return {k: v for k, v in node.items() if k in known}
    model = config.get("model") or {}
    if not model.get("preset"):
        return None
    values = dict(model.get("overrides") or {})
    task = (config.get("data") or {}).get("task")
    meta = data_meta(commit)
    if task == "mazes" and meta.get("route_length"):
        values.setdefault("route_length", int(meta["route_length"]))
    elif task == "parity":
        values.setdefault("sequence_length", 64)
    elif meta.get("num_classes"):
        values.setdefault("out_dims", int(meta["num_classes"]))
    return preset(model["preset"], **values).to_dict()
