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


def model_config_from_commit(commit: dict) -> dict | None:
    """The CTMConfig fields of a COMMIT marker: as recorded (``config.model_config``), else rebuilt from
    the training config's ``model.preset`` + ``model.overrides`` and what the data decides, as the
    trainer's task plug-ins do (classes -> ``out_dims``, maze ``route_length``, parity ``sequence_length``)."""
    for path in (("model_config",), ("config", "model_config")):
        node = commit
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    config = commit.get("config") or {}
    model = config.get("model") or {}
    if not model.get("preset"):
        return None
    from ctm_dist.model import preset

    values = dict(model.get("overrides") or {})
    data = config.get("data") or {}
    task = data.get("task")
    meta = {}
    if data.get("url") and task != "parity":
        from ctm_dist.data.index import read_index

        try:
            meta = read_index(Location.parse(data["url"]), "train").meta
        except Exception:  # data gone or unreachable: the preset and overrides still say most
            meta = {}
    if task == "mazes" and meta.get("route_length"):
        values.setdefault("route_length", int(meta["route_length"]))
    elif task == "parity":
        values.setdefault("sequence_length", 64)
    elif meta.get("num_classes"):
        values.setdefault("out_dims", int(meta["num_classes"]))
    return preset(model["preset"], **values).to_dict()
