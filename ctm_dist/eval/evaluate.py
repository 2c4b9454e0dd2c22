"""Evaluate a checkpoint on a shard set (or generated data, or RL episodes), in-process or over
Ray workers.

``evaluate(EvalRequest(...))`` loads the model (any kind ``ctm_dist.eval.loading`` knows), reads
this worker's part of the split, and returns a report: a JSON-able dict of metrics per task. The
task decides its data, batches, model call and measures (``Task.evaluation_*``). With
``workers > 1`` each Ray worker evaluates the shards the reader gives its rank, returns its
running sums, and the sums are merged before the numbers are computed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ctm_dist import hub
from ctm_dist.data.index import read_index
from ctm_dist.storage import Location
from ctm_dist.tasks import Measure, get_task
from ctm_dist.tasks.classification import DEFAULT_THRESHOLDS

from .inputs import input_spec
from .loading import Loaded, load_model


@dataclass
class EvalRequest:
    checkpoint: str  # export dir/file, run URL or reference .pt
    data: str = (
        ""  # shard set URL; default: the one a run (or its export) trained on; none for parity
    )
    split: str = "val"
    task: str | None = None  # default: the shard set's task (parity: "parity")
    step: int | None = None  # a run's step; default the newest committed
    batch_size: int = 64
    max_batches: int = 0  # per worker; 0 = the whole split
    workers: int = 1
    image_size: int | None = None  # default: the size the model was trained at
    thresholds: tuple = DEFAULT_THRESHOLDS
    iterations: int | None = None  # run for another number of ticks than trained
    # mazes: generalisation to larger mazes by re-application
    generalise_data: str = ""
    generalise_split: str = "test"
    generalise_mazes: int = 20  # per worker
    max_reapplications: int = 20
    fault_tolerance: int = 2
    # parity (generated)
    parity_samples: int = 1024
    parity_seed: int = 12345
    # Q&A MNIST: questions on the digits of ``split``
    qamnist_questions: int = 1024
    qamnist_seed: int = 12345
    # RL: episodes played with the greedy policy in the run's environment
    episodes: int = 16
    rl_seed: int = 12345
    locations: dict = field(
        default_factory=dict
    )  # Location dicts (credentials) for workers; in memory only


def _location(req: EvalRequest, name: str) -> Location:
    if name in req.locations:
        return Location.from_dict(req.locations[name])
    return Location.parse(getattr(req, name))


def _model(req: EvalRequest) -> Loaded:
    overrides = {"iterations": req.iterations} if req.iterations else {}
    hub_id = "checkpoint" not in req.locations and hub.is_hub_source(req.checkpoint)
    source = req.checkpoint if hub_id else _location(req, "checkpoint")
    loaded = load_model(source, step=req.step, **overrides)
    loaded.model.eval()
    return loaded


def with_trained_defaults(req: EvalRequest, loaded: Loaded) -> tuple[EvalRequest, str]:
    """(request with the data and image size the model was trained with where it gives none, task)."""
    task = _task(req, loaded)
    if not get_task(task).generated_data and not req.data:
        data = (loaded.source or {}).get("data")
        if not data:
            raise ValueError(
                f"{req.checkpoint}: no shard set given (--data) and the checkpoint records none"
            )
        req = replace(req, data=data)
    if not req.image_size:
        req = replace(req, image_size=_trained_image_size(loaded, task))
    return req, task


def _trained_image_size(loaded: Loaded, task: str) -> int | None:
    """The input size ``loaded`` was trained at, None for no images. A task sized by its shard set
    (``image_size_from_shards``) whose model records no size is fed the evaluated shard set's own
    size (None too), as its trainer did, not the task's default size."""
    recorded = loaded.inputs or (loaded.meta or {}).get("image_size")
    if get_task(task).image_size_from_shards and not recorded:
        return None
    spec = input_spec(loaded, task)
    return spec.image_size if spec else None


def _task(req: EvalRequest, loaded: Loaded) -> str:
    if req.task:
        return req.task
    if req.data:
        return read_index(_location(req, "data"), req.split).task
    if loaded.task:
        return loaded.task
    raise ValueError("cannot tell the task: pass --task or a shard set")


def _batches(task, loader, max_batches: int):
    """(inputs, targets) of the valid samples of each batch, up to ``max_batches`` (0: all)."""
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if batch["valid"].any():
            yield task.evaluation_batch(batch)


@torch.no_grad()
def evaluate_part(req: EvalRequest, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """This worker's sums: {"task", "stats": {section: Measure, "skipped": counts}, "seconds", ...}."""
    torch.set_grad_enabled(False)
    loaded = _model(req)
    model = loaded.model
    req, task_name = with_trained_defaults(req, loaded)
    task = get_task(task_name)
    start = time.perf_counter()
    data = None if task.generated_data else _location(req, "data")
    loader = task.evaluation_loader(model.cfg, data, req, rank, world_size)
    stats: dict[str, Any] = dict(task.evaluation_measures(model.cfg, req))
    for x, y in _batches(task, loader, req.max_batches):
        p, c = task.evaluation_forward(model, x)
        for measure in stats.values():
            measure.update(p, c, y, inputs=x)
    if not task.generated_data:
        stats["skipped"] = dict(loader.stats)
    locate = lambda name: _location(req, name)  # noqa: E731
    stats.update(task.evaluation_extras(model, req, locate, rank, world_size, loaded.meta))
    return {
        "task": task_name,
        "stats": stats,
        "seconds": time.perf_counter() - start,
        "model": model.cfg.to_dict(),
        "kind": loaded.kind,
        "source": loaded.source,
        "meta": loaded.meta,
        "data": req.data,
        "image_size": req.image_size,
    }


def merge_parts(parts: list[dict]) -> dict:
    first = parts[0]
    merged = {name: s for name, s in first["stats"].items()}
    for part in parts[1:]:
        for name, s in part["stats"].items():
            if isinstance(s, Measure):
                merged[name] = merged[name].merge(s)
            else:  # the reader's skip counts
                for k, v in s.items():
                    merged[name][k] = merged[name].get(k, 0) + v
    return {**first, "stats": merged, "seconds": max(p["seconds"] for p in parts)}


def summarise(merged: dict) -> dict:
    report = {
        "task": merged["task"],
        "model": merged["model"],
        "checkpoint_kind": merged["kind"],
        "source": merged["source"],
        "seconds": merged["seconds"],
        "data": merged.get("data"),
        "image_size": merged.get("image_size"),
    }
    for name, s in merged["stats"].items():
        report[name] = s.summary() if isinstance(s, Measure) else s
    return report


def _remote_part(req: EvalRequest, rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    return evaluate_part(req, rank, world_size)


def evaluate(req: EvalRequest) -> dict:
    """The merged report, computed in-process (``workers == 1``) or over ``workers`` Ray tasks."""
    if req.workers <= 1:
        return summarise(evaluate_part(req))
    import ray

    locations = {}
    for name in ("checkpoint", "data", "generalise_data"):
        value = getattr(req, name)
        if value:
            locations[name] = Location.parse(value).to_dict()
    remote_req = replace(req, locations=locations)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=req.workers, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(_remote_part)
        parts = ray.get([task.remote(remote_req, rank, req.workers) for rank in range(req.workers)])
    finally:
        if started_here:
            ray.shutdown()
    report = summarise(merge_parts(parts))
    report["workers"] = req.workers
    return report


def request_dict(req: EvalRequest) -> dict:
    """The request as written into a report (no credentials)."""
    d = asdict(req)
    d.pop("locations", None)
    return d
