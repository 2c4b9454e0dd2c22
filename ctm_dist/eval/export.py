"""Export: a run's ZeRO checkpoint -> one consolidated safetensors file (+ JSON config), or the reference format.

The consolidated export is a directory with ``model.safetensors`` (float32 weights; the config
is also kept in the file's metadata, so the file alone loads) and ``config.json``:
``{"format": "ctm-dist-export/1", "model": CTMConfig fields, "task": ..., "meta": ..., "source": ...}``.
It loads with :func:`ctm_dist.load` without DeepSpeed or Ray.

ZeRO shards are merged by DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``. That
utility calls ``torch.load(weights_only=False)``, so every file it will read is first opened with
the checkpoint format's weights-only loader (:func:`ctm_dist.storage.checkpoints.safe_load`), and a
run's files are checked against their COMMIT marker (size, SHA-256) when they are downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ctm_dist.compat import export_reference_checkpoint
from ctm_dist.model import (
    CTM,
    CTMConfig,
)
from ctm_dist.storage import Location
from ctm_dist.storage.checkpoints import check_loadable

from . import runs
from .inputs import model_meta, trained_data, trained_inputs

FORMAT = "ctm-dist-export/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def zero_state_dict(
    checkpoint_dir: str | os.PathLike, tag: str | None = None
) -> dict[str, torch.Tensor]:
    """Float32 full state dict merged from a DeepSpeed (ZeRO 1/2/3) checkpoint directory on local disk.

    ``checkpoint_dir`` is DeepSpeed's save directory or any directory above it (e.g. a committed step).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if tag is None:
        checkpoint_dir, tag = runs.find_deepspeed_checkpoint(checkpoint_dir)
    check_loadable(
        Path(checkpoint_dir) / tag, what=tag
    )  # before DeepSpeed's unrestricted torch.load sees them
    state = get_fp32_state_dict_from_zero_checkpoint(os.fspath(checkpoint_dir), tag=tag)
    return {k: v.detach().cpu() for k, v in state.items()}


def fit_keys(state: dict[str, torch.Tensor], model: CTM) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (DeepSpeed/DDP ``module.``, torch.compile ``_orig_mod.``) so keys match the CTM's."""
    expected = set(model.state_dict())
    for _ in range(3):
        if set(state) >= expected or not state:
            break
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                break
        else:
            break
    return state


def load_weights(model: CTM, state: dict[str, torch.Tensor]) -> CTM:
    """Load strictly, keeping each tensor's dtype as the model has it (buffers stay integer)."""
    state = fit_keys(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the CTM: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DeepSpeed/DDP (``module``) and torch.compile (``_orig_mod``) wrappers: the
    first module that holds its own config (``cfg``; a compiled module only forwards to it)."""
    while "cfg" not in vars(model):
        inner = model._modules.get("module") or model._modules.get("_orig_mod")
        if not isinstance(inner, torch.nn.Module):
            raise TypeError(f"expected a ctm_dist model (with its cfg), got {type(model).__name__}")
        model = inner
    return model


def export_document(
    cfg: CTMConfig,
    task: str | None = None,
    meta: dict | None = None,
    source: dict | None = None,
    inputs: dict | None = None,
) -> dict[str, Any]:
    document = {
        "format": FORMAT,
        "model": cfg.to_dict(),
        "task": task,
        "meta": meta or {},
        "source": source or {},
    }
    if inputs:
        document["inputs"] = inputs  # the input pipeline the model was trained with
    return document


def save_consolidated(
    model_or_state,
    out: str | os.PathLike | Location,
    cfg: CTMConfig | None = None,
    task: str | None = None,
    meta: dict | None = None,
    source: dict | None = None,
    inputs: dict | None = None,
) -> str:
    """Write ``model.safetensors`` + ``config.json`` under ``out`` (a path or a storage URL).

    Pass a CTM (its config is used) or a state dict with ``cfg``. Returns the URL written.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state, torch.nn.Module):
        model = _unwrap(model_or_state)
        cfg = cfg or model.cfg
        state = model.state_dict()
    else:
        if cfg is None:
            raise ValueError("a state dict needs cfg")
        state = model_or_state
    state = {
        k: (
            v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        ).contiguous()
        for k, v in state.items()
    }
    document = export_document(cfg, task, meta, source, inputs)
    text = json.dumps(document, indent=2, sort_keys=True)
    location = Location.parse(out)
    with tempfile.TemporaryDirectory(prefix="ctm-export-") as tmp:
        save_file(state, os.path.join(tmp, MODEL_FILE), metadata={"format": FORMAT, "config": text})
        Path(tmp, CONFIG_FILE).write_text(text + "\n")
        location.put_file(
            os.path.join(tmp, MODEL_FILE), MODEL_FILE
        )  # weights first: config.json marks it whole
        location.put_file(os.path.join(tmp, CONFIG_FILE), CONFIG_FILE)
    return location.url


def run_state(
    run: str | Location, step: int | None = None, work_dir: str | os.PathLike | None = None
):
    """(state dict, CTMConfig or None, step, COMMIT document) of a run's committed checkpoint."""
    run = Location.parse(run)

    def merged(step: int, commit: dict) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix="ctm-ckpt-", dir=work_dir) as tmp:
            return zero_state_dict(*runs.download_step(run, step, tmp, commit))

    step, commit, state = runs.with_loadable_step(run, step, merged)
    fields = runs.model_config_from_commit(commit)
    cfg = runs.commit_task(commit).config_type(fields).from_dict(fields) if fields else None
    return state, cfg, step, commit


def export_run(
    run: str | Location,
    out: str | os.PathLike | Location,
    step: int | None = None,
    cfg: CTMConfig | None = None,
    reference_dataset: str | None = None,
    reference: bool = False,
) -> str:
    """Consolidate a run's committed ZeRO checkpoint (newest, or ``step``) into ``out``.

    With ``reference_dataset`` (e.g. ``cifar10``, ``mazes-medium``, ``parity``, ``qamnist``, an RL
    environment id) or ``reference`` (the dataset the run tells: ``Task.reference_dataset``),
    ``out`` is instead a ``.pt`` file in the reference's checkpoint format.
    """
    run = Location.parse(run)
    state, recorded, step, commit = run_state(run, step)
    cfg = cfg or recorded
    if cfg is None:
        raise ValueError(f"{run.url}: its COMMIT marker records no model config; pass cfg")
    task_cls = runs.commit_task(commit)
    model = load_weights(task_cls.build_model(cfg), state).eval()
    task = commit.get("task") or (commit.get("config") or {}).get("data", {}).get("task")
    if reference or reference_dataset:
        dataset = reference_dataset or task_cls.reference_dataset(runs.data_meta(commit))
        if dataset is None:
            raise ValueError(
                f"{run.url}: a {task} run does not tell the reference's dataset; "
                "pass --reference-dataset NAME"
            )
        export_reference_checkpoint(model, out, dataset)
        return os.fspath(out)
    return save_consolidated(model, out, task=task, **_trained_with(commit, run, step))


def _trained_with(commit: dict, run: Location, step: int) -> dict:
    """What an export keeps of its run's COMMIT marker: metadata, input pipeline, source and data."""

    meta = runs.data_meta(commit)
    inputs = trained_inputs(commit, meta)
    return {
        "meta": model_meta(meta, inputs),
        "inputs": inputs,
        "source": {"run": run.url, "step": step, "data": trained_data(commit)},
    }
