"""Evaluate a checkpoint on a shard set (or generated parity data), in-process or over Ray workers.

``evaluate(EvalRequest(...))`` loads the model (any kind ``ctm_dist.eval.loading`` knows), reads
this worker's part of the split, and returns a report: a JSON-able dict of metrics per task. With
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
from ctm_dist.data.parity import ParityLoader
from ctm_dist.data.reader import ShardLoader
from ctm_dist.storage import Location

from .classification import ClassificationStats
from .halting import DEFAULT_THRESHOLDS, HaltingStats
from .inputs import input_spec
from .loading import Loaded, load_model
from .mazes import GeneralisationStats, MazeStats, solve_by_reapplication
from .parity import ParityStats

CLASSIFICATION_TASKS = ("imagenet", "demo", "cifar10")


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
    if task != "parity" and not req.data:
        data = (loaded.source or {}).get("data")
        if not data:
            raise ValueError(
                f"{req.checkpoint}: no shard set given (--data) and the checkpoint records none"
            )
        req = replace(req, data=data)
    if not req.image_size:
        spec = input_spec(loaded, task)
        req = replace(req, image_size=spec.image_size if spec else None)
    return req, task


def _task(req: EvalRequest, loaded: Loaded) -> str:
    if req.task:
        return req.task
    if req.data:
        return read_index(_location(req, "data"), req.split).task
    if loaded.task:
        return loaded.task
    raise ValueError("cannot tell the task: pass --task or a shard set")


def _batches(loader, max_batches: int):
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        valid = batch.get("valid")
        if valid is None:
            yield batch["input"], batch["target"]
            continue
        valid = valid.bool()
        if valid.any():
            yield batch["input"][valid], batch["target"][valid]


@torch.no_grad()
def evaluate_part(req: EvalRequest, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """This worker's running sums: {"task", "stats": {name: stats object}, "seconds", "model": cfg}."""
    torch.set_grad_enabled(False)
    loaded = _model(req)
    model = loaded.model
    req, task = with_trained_defaults(req, loaded)
    T = model.cfg.iterations
    stats: dict[str, Any] = {}
    start = time.perf_counter()
    if task == "parity":
        L = (
            model.cfg.prediction_reshaper[0]
            if model.cfg.prediction_reshaper[0] > 0
            else model.cfg.out_dims // 2
        )
        loader = ParityLoader(
            L,
            batch_size=req.batch_size,
            rank=rank,
            world_size=world_size,
            seed=req.parity_seed,
            samples_per_epoch=req.parity_samples,
        )
        stats["parity"] = ParityStats(T, L)
        for x, y in _batches(loader, req.max_batches):
            p, c, _ = model(x.float())
            stats["parity"].update(p, c, y)
    else:
        route_length = model.cfg.out_dims // 5 if task == "mazes" else None
        loader = ShardLoader(
            _location(req, "data"),
            req.split,
            task=task,
            batch_size=req.batch_size,
            rank=rank,
            world_size=world_size,
            train=False,
            image_size=req.image_size,
            route_length=route_length,
        )
        if task in CLASSIFICATION_TASKS:
            stats["classification"] = ClassificationStats(T)
            stats["halting"] = HaltingStats(T, tuple(req.thresholds))
        elif task == "mazes":
            stats["mazes"] = MazeStats(T, route_length)
        else:
            raise ValueError(f"no evaluation for task {task!r}")
        for x, y in _batches(loader, req.max_batches):
            p, c, _ = model(x.float())
            for name, s in stats.items():
                if name == "mazes":
                    s.update(p, c, y, inputs=x)
                else:
                    s.update(p, c, y)
        stats["skipped"] = dict(loader.stats)
        if task == "mazes" and req.generalise_data:
            stats["generalisation"] = generalise(model, req, rank, world_size)
    return {
        "task": task,
        "stats": stats,
        "seconds": time.perf_counter() - start,
        "model": model.cfg.to_dict(),
        "kind": loaded.kind,
        "source": loaded.source,
        "meta": loaded.meta,
        "data": req.data,
        "image_size": req.image_size,
    }


def generalise(model, req: EvalRequest, rank: int = 0, world_size: int = 1) -> GeneralisationStats:
    """Re-application on (larger) mazes of another shard set; success by optimal route length."""
    location = _location(req, "generalise_data")
    meta = read_index(location, req.generalise_split).meta
    loader = ShardLoader(
        location,
        req.generalise_split,
        task="mazes",
        batch_size=1,
        rank=rank,
        world_size=world_size,
        train=False,
        route_length=int(meta.get("route_length") or 1000),
    )
    out = GeneralisationStats()
    done = 0
    for x, y in _batches(loader, 0):
        if done >= req.generalise_mazes:
            break
        result = solve_by_reapplication(
            model, x[0].float(), req.max_reapplications, req.fault_tolerance
        )
        out.add(int((y[0] != 4).sum()), result)
        done += 1
    return out


def merge_parts(parts: list[dict]) -> dict:
    first = parts[0]
    merged = {name: s for name, s in first["stats"].items()}
    for part in parts[1:]:
        for name, s in part["stats"].items():
            if name == "skipped":
                for k, v in s.items():
                    merged[name][k] = merged[name].get(k, 0) + v
            else:
                merged[name] = merged[name].merge(s)
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
        report[name] = s if name == "skipped" else s.summary()
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
