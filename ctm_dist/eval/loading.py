"""One entry point for every kind of checkpoint: ``load(path)`` -> a CTM ready for inference.

``path`` may be (locally or at any storage URL):

* a consolidated export: a directory with ``model.safetensors`` + ``config.json``, or the
  ``.safetensors`` file alone (its metadata holds the config);
* a training run of ours (``{storage}/{run}``): the newest committed step, or ``step=``;
* a reference checkpoint (``.pt`` as the reference's train scripts save), via ``ctm_dist.compat``;
* the reference's Hugging Face Hub layout (``config.json`` with the constructor's arguments +
  ``model.safetensors``), a directory or a Hub repository id (``owner/name`` or
  ``hf://owner/name``), via ``ctm_dist.hub``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace

from ctm_dist import hub
from ctm_dist.compat import load_reference_checkpoint
from ctm_dist.model import CTM, CTMConfig, ReferenceFFBaseline
from ctm_dist.storage import Location

from . import export, runs
from .inputs import model_meta, trained_data, trained_inputs


@dataclass
class Loaded:
    # a CTM (an LSTMBaseline or FFBaseline for the paper's baselines; a task's own model: the
    # QAMNIST CTM or LSTM, the RL agent)
    model: CTM
    kind: str  # "export", "run", "reference" or "hub"
    task: str | None = None
    meta: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    inputs: dict | None = (
        None  # the input pipeline it was trained with (ctm_dist.eval.inputs.InputSpec)
    )

    @property
    def cfg(self) -> CTMConfig:
        return self.model.cfg


def _parent_and_name(location: Location) -> tuple[Location, str]:
    parent_path, _, name = location.path.rstrip("/").rpartition("/")
    return replace(location, path=parent_path or "/", _fs=None), name


def _load_safetensors(location: Location, name: str, overrides: dict) -> Loaded:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="ctm-load-") as tmp:
        local = os.path.join(tmp, export.MODEL_FILE)
        if location.protocol == "file":
            local = location.join(name)
        else:
            location.get_file(name, local)
        with safe_open(local, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(local)
    if metadata.get("format") != export.FORMAT or "config" not in metadata:
        raise ValueError(
            f"{location.name_url(name)}: not a ctm-dist export (no '{export.FORMAT}' metadata)"
        )
    document = json.loads(metadata["config"])
    task = runs.task_class(document.get("task"))
    fields = {**document["model"], **overrides}
    cfg = task.config_type(fields).from_dict(fields)
    model = export.load_weights(task.build_model(cfg), state).eval()
    return Loaded(
        model,
        "export",
        document.get("task"),
        document.get("meta") or {},
        document.get("source") or {},
        document.get("inputs"),
    )


def _hub_document(location: Location) -> dict | None:
    """The ``config.json`` beside ``model.safetensors`` when it holds constructor arguments."""
    if not location.exists(hub.CONFIG_FILE):
        return None
    with location.open(hub.CONFIG_FILE) as f:
        try:
            document = json.load(f)
        except ValueError:
            return None
    return document if hub.is_hub_config(document) else None


def _load_hub(location: Location, overrides: dict, source: str) -> Loaded:
    if location.protocol == "file":
        model = hub.load_hub_directory(location.path, **overrides)
    else:
        with tempfile.TemporaryDirectory(prefix="ctm-load-") as tmp:
            for name in (hub.CONFIG_FILE, hub.MODEL_FILE):
                location.get_file(name, os.path.join(tmp, name))
            model = hub.load_hub_directory(tmp, **overrides)
    return Loaded(model, "hub", None, {}, {"hub": source})


def _run_loaded(model: CTM, task: str | None, commit: dict, run: Location, step: int) -> Loaded:
    """A run's model with what its COMMIT marker says about it: input pipeline and training data."""

    meta = runs.data_meta(commit)
    inputs = trained_inputs(commit, meta)
    source = {"run": run.url, "step": step, "data": trained_data(commit)}
    return Loaded(model, "run", task, model_meta(meta, inputs), source, inputs)


def load_model(
    path: str | os.PathLike | Location,
    step: int | None = None,
    map_location: str = "cpu",
    **overrides,
) -> Loaded:
    """Load any supported checkpoint (see the module docstring). ``overrides`` replace CTMConfig fields
    that do not change weights (e.g. ``iterations``, ``attention_impl``)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    if text and hub.is_hub_source(text):
        repo_id = text.removeprefix("hf://")
        local = Location.parse(hub.download(repo_id))
        loaded = _load_hub(local, overrides, f"hf://{repo_id}")
        loaded.model.to(map_location)
        return loaded
    location = Location.parse(path)
    if location.exists(export.MODEL_FILE) and _hub_document(location) is not None:
        loaded = _load_hub(location, overrides, location.url)
    elif location.exists(export.MODEL_FILE):
        loaded = _load_safetensors(location, export.MODEL_FILE, overrides)
    elif runs.is_run(location):
        state, cfg, step, commit = export.run_state(location, step)
        if cfg is None:
            raise ValueError(f"{location.url}: its COMMIT marker records no model config")
        cfg = replace(cfg, **overrides) if overrides else cfg
        model = export.load_weights(runs.commit_task(commit).build_model(cfg), state).eval()
        task = commit.get("task") or (commit.get("config") or {}).get("data", {}).get("task")
        loaded = _run_loaded(model, task, commit, location, step)
    elif location.path.endswith(".safetensors"):
        parent, name = _parent_and_name(location)
        loaded = _load_safetensors(parent, name, overrides)
    elif location.exists():
        if location.protocol == "file":
            model = load_reference_checkpoint(location.path, **overrides)
        else:
            with location.open("") as f:
                model = load_reference_checkpoint(f, **overrides)
        if isinstance(model, ReferenceFFBaseline):  # the tools call every kind the same way
            model = model.as_baseline()
        loaded = Loaded(model.eval(), "reference", None, {}, {"reference": location.url})
    else:
        raise FileNotFoundError(f"{location.url}: no such checkpoint")
    loaded.model.to(map_location)
    return loaded


def load(
    path: str | os.PathLike, step: int | None = None, map_location: str = "cpu", **overrides
) -> CTM:
    """A CTM in eval mode from a consolidated export, a run of ours, a reference checkpoint or a
    Hugging Face Hub layout (directory or repository id)."""
    return load_model(path, step=step, map_location=map_location, **overrides).model
