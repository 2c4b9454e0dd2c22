"""Tasks: per task, its data, loss, metrics, offline evaluation and pictures (``docs/tasks.md``).

This layer sits between the trainer and evaluation tools above and the model, data, losses and
storage below; it never imports ``ctm_dist.train`` or ``ctm_dist.eval``.
"""

from .base import ShardTask, Task
from .charts import Chart, PictureRequest
from .registry import TASKS, UnknownTask, get_task, make_task, preflight, task_names
from .sums import Measure, MetricSums

__all__ = [
    "TASKS",
    "Chart",
    "PictureRequest",
    "Measure",
    "MetricSums",
    "ShardTask",
    "Task",
    "UnknownTask",
    "get_task",
    "make_task",
    "preflight",
    "task_names",
]
