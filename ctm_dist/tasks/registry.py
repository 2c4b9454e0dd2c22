"""The task registry: every task name ``data.task`` may take, and the class that implements it.

Everything that depends on the task (config validation, the trainer, offline evaluation, input
pipelines, pictures) asks ``get_task(name)``; no other module compares task names.
"""

from __future__ import annotations

from ctm_dist.storage import Location

from .base import Task
from .classification import Cifar10, Demo, ImageNet
from .mazes import Mazes
from .parity import Parity
from .qamnist import QAMNIST
from .rl import ReinforcementLearning
from .sort import Sort

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (Demo, ImageNet, Cifar10, Mazes, Parity, QAMNIST, Sort, ReinforcementLearning)
}


class UnknownTask(ValueError):
    """A task name that is not registered; the message names the known ones."""


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str | None) -> type[Task]:
    """The class of task ``name``; :class:`UnknownTask` (one line, naming the known tasks) if none."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTask(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


def make_task(cfg, rank: int, world_size: int) -> Task:
    """The training task of ``cfg.data.task`` for one rank (``cfg``: a ``TrainConfig``)."""
    return get_task(cfg.data.task)(cfg, rank, world_size)


def preflight(cfg) -> None:
    """Fail in the driver, before Ray starts (and retries) workers, on storage or data that cannot work."""
    Location.parse(cfg.run.storage, retry_deadline=cfg.run.storage_retry_deadline).check()
    get_task(cfg.data.task).preflight(cfg)
