"""Pictures a task draws from its own runs, as data: ``Chart`` (series over ticks, steps or
episodes) and what the picture tool asks for (``PictureRequest``).

Tasks whose inputs are not images or shard samples (Q&A MNIST's questions, RL's episodes) make
their pictures by running the model themselves (``Task.picture_charts``); they return charts,
and ``ctm_dist.eval`` draws them (PNG, TensorBoard). This keeps the task layer free of plotting.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PictureRequest:
    """What ``launch/visualize.py`` asks of a task: ``count`` inputs (questions, episodes) of
    ``split``, ``per_input`` of them drawn one by one, drawn with ``seed``; ``image_size``: the
    model's input size, when its input pipeline sets one."""

    split: str = "val"
    count: int = 16
    per_input: int = 4
    seed: int = 0
    image_size: int | None = None


@dataclass
class Chart:
    """One figure: named series of values at x = 1, 2, ... (ticks, steps, episodes).

    ``bars`` draws the series as bars; ``spans`` shades x ranges ``(first, last, label)``
    (1-based, inclusive), e.g. the phases of a question; ``ylim`` fixes the y range."""

    name: str  # the file name without extension
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[float]]
    bars: bool = False
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    ylim: tuple[float, float] | None = None
