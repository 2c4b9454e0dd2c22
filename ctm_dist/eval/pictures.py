"""All the pictures of a model on a few inputs, from one call: PNG and GIF files (and TensorBoard figures).

* ``certainty_loss.png``: certainty and loss per tick for the batch (loss when targets are known);
* ``ticks_used.png``: histogram of ticks used by adaptive halting (``ctm_dist.inference.predict``);
* ``attention_{i}.png`` / ``attention_{i}.gif``: the input, then its attention tick by tick with the
  class predicted at each tick and its certainty (classification tasks) and a colour bar;
* ``maze_{i}.gif``: the predicted route as it unfolds over ticks (maze tasks);
* ``order_{i}.png``: the input position emitted at each tick, rows ordered by value (sorting);
* ``neurons_{i}.png``: post-activation traces of a sample of neurons; ``sync_{i}.png``: the
  synchronisation matrix of the same neurons.

A task that draws from the model alone (``Task.picture_charts``: Q&A MNIST's certainty and answer
per tick, RL's returns and values per step) gives charts instead, written by ``write_charts``.

Ticks are numbered 1..T in every file and TensorBoard figure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctm_dist.inference import predict
from ctm_dist.tasks import get_task
from ctm_dist.tasks.mazes import maze_rgb, split_route

from . import animate, plots
from .inputs import attention_maps, display_rgb
from .sort import sort_order


@torch.no_grad()
def make_pictures(
    model,
    x: torch.Tensor,
    task: str,
    out_dir: str | Path,
    targets: torch.Tensor | None = None,
    threshold: float = 0.8,
    per_input: int = 4,
    tb=None,
    step: int = 0,
    meta: dict | None = None,
    n_neurons: int = 16,
) -> list[Path]:
    """Write every picture for inputs ``x`` into ``out_dir``; returns the files written.
    ``tb`` (a SummaryWriter) also receives each figure under ``pictures/``; ``meta["classes"]``
    (the shard set's class names), when given, names the predicted classes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = x.float()
    predictions, certainties, _, tracking = model(x, track=True)
    written: list[Path] = []

    def figure(fig, name: str) -> None:
        if tb is not None:
            tb.add_figure(f"pictures/{name}", fig, step, close=False)
        written.append(plots.save(fig, out / f"{name}.png"))

    kind = get_task(task)
    loss = kind.per_tick_loss(predictions, targets) if targets is not None else None
    figure(plots.certainty_and_loss(certainties[:, 1], loss), "certainty_loss")
    halted = predict(model, x, certainty_threshold=threshold)
    figure(
        plots.ticks_histogram(
            halted.tick + 1, model.cfg.iterations, f"ticks used at certainty >= {threshold:g}"
        ),
        "ticks_used",
    )

    spatial = x.dim() == 4
    maps = attention_maps(tracking.attention, tuple(x.shape[-2:])) if spatial else None
    classes = (meta or {}).get("classes")
    classify = "classes" in kind.pictures
    for i in range(min(per_input, x.shape[0])):
        certainty = certainties[i, 1].float()  # [T]
        predicted = predictions[i].argmax(0) if classify else None  # [T]
        target = int(targets[i]) if classify and targets is not None else None
        if spatial:
            image = display_rgb(x[i], task)
            words = {
                "predicted": predicted,
                "certainty": certainty,
                "class_names": classes,
                "target": target,
            }
            figure(plots.attention_grid(image, maps[:, i], **words), f"attention_{i}")
            written.append(
                animate.attention_gif(image, maps[:, i], out / f"attention_{i}.gif", **words)
            )
        if "order" in kind.pictures:
            order = targets[i] if targets is not None else None
            figure(sort_order(x[i], predictions[i], order), f"order_{i}")
        if "route" in kind.pictures:
            rgb, _ = maze_rgb(x[i])
            moves = split_route(predictions[i : i + 1]).argmax(2)[0].T.numpy()  # [T, L]
            route = targets[i].numpy() if targets is not None else None
            written.append(animate.maze_route_gif(rgb, moves, out / f"maze_{i}.gif", target=route))
        post = tracking.post_activations[:, i].float()  # [T, D]
        neurons = plots.sample_neurons(post.shape[1], n_neurons, seed=i)
        figure(plots.neuron_traces(post, neurons=neurons), f"neurons_{i}")
        figure(plots.synchronisation_figure(post, neurons=neurons), f"sync_{i}")
    return written


def write_charts(charts: list, out_dir: str | Path, tb=None, step: int = 0) -> list[Path]:
    """Each of a task's charts as ``{name}.png`` in ``out_dir`` (and under ``pictures/`` in
    TensorBoard); returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for c in charts:
        fig = plots.chart(c)
        if tb is not None:
            tb.add_figure(f"pictures/{c.name}", fig, step, close=False)
        written.append(plots.save(fig, out / f"{c.name}.png"))
    return written


def class_name(meta: dict, index: int) -> str:
    classes = (meta or {}).get("classes")
    return str(classes[index]) if classes and 0 <= index < len(classes) else str(index)


def summary_lines(
    model, x: torch.Tensor, threshold: float, names: list[str], meta: dict | None = None
) -> list[str]:
    """One line per input: the class, the tick it stopped at and its certainty (adaptive halting)."""
    model.eval()
    result = predict(model, x.float(), certainty_threshold=threshold)
    lines = []
    for name, logits, tick, cert in zip(names, result.predictions, result.tick, result.certainty):
        k = int(logits.argmax())
        lines.append(
            f"{name}\tclass={class_name(meta, k)}\ttick={int(tick) + 1}/{model.cfg.iterations}"
            f"\tcertainty={float(cert):.3f}"
        )
    return lines
