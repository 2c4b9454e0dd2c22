"""Figures of an evaluation: each function returns a matplotlib Figure (saved as PNG and sent to TensorBoard).

Inputs are plain arrays (numpy or CPU tensors) so the figures do not depend on how they were computed.
Ticks are numbered from 1 in every picture ("tick 1" is the first internal step, "tick T" the last),
on axes, in titles and in GIF captions.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ctm_dist.tasks.classification import READOUTS  # noqa: E402


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def ticks_axis(T: int) -> np.ndarray:
    """Tick numbers as the pictures show them: 1..T."""
    return np.arange(1, T + 1)


def tick_xaxis(ax, label: str = "tick") -> None:
    """Label the x axis with whole tick numbers (never 2.5)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def sample_neurons(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` neurons drawn at random (the same for a given seed)."""
    return np.sort(np.random.default_rng(seed).choice(n_total, size=min(n, n_total), replace=False))


def class_label(index: int, class_names=None) -> str:
    return (
        str(class_names[index])
        if class_names is not None and 0 <= index < len(class_names)
        else str(index)
    )


def accuracy_per_tick(summary: dict):
    """Top-1 and top-5 accuracy at each tick for the four readouts of a classification summary."""
    T = summary["ticks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, k in zip(axes, (1, 5)):
        for r in READOUTS:
            ax.plot(
                ticks_axis(T),
                100 * np.asarray(summary[f"{r}_top{k}_per_tick"]),
                label=r.replace("_", " "),
            )
        tick_xaxis(ax)
        ax.set_ylabel(f"top-{k} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy per tick (readouts use ticks up to t)")
    fig.tight_layout()
    return fig


def reliability_diagram(
    rows: list[dict], ece: float, title: str = "calibration at the most certain tick"
):
    """Accuracy against confidence per confidence bin, and below it the number of samples in each bin.

    ``rows`` are ``classification.reliability`` rows (bins holding samples): ``confidence`` and
    ``accuracy``, with ``low``, ``high`` and ``count`` when known (bars and bin counts need them).
    """
    has_bins = bool(rows) and all("low" in r and "high" in r for r in rows)
    has_counts = bool(rows) and all("count" in r for r in rows)
    if has_counts:
        fig, (ax, cax) = plt.subplots(2, 1, figsize=(4.6, 5.6), sharex=True, height_ratios=(3, 1.3))
    else:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if rows:
        conf = [r["confidence"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        if has_bins:
            ax.bar(
                [r["low"] for r in rows],
                acc,
                width=[r["high"] - r["low"] for r in rows],
                align="edge",
                color="tab:blue",
                alpha=0.35,
                edgecolor="tab:blue",
                label="accuracy in bin",
            )
        ax.plot(conf, acc, marker="o", color="tab:blue", lw=1.2, label="mean confidence, accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{title}\nECE = {ece:.3f}", fontsize=9)
    if has_counts:
        counts = [r["count"] for r in rows]
        x = [(r["low"] + r["high"]) / 2 for r in rows] if has_bins else conf
        width = [r["high"] - r["low"] for r in rows] if has_bins else 0.03
        bars = cax.bar(x, counts, width=width, color="tab:gray", edgecolor="k", lw=0.5)
        cax.bar_label(bars, labels=[str(c) for c in counts], fontsize=6, padding=1)
        cax.set_ylim(0, 1.25 * max(counts))
        cax.set_ylabel("samples")
        cax.set_xlabel("confidence")
    else:
        ax.set_xlabel("mean confidence")
    fig.tight_layout()
    return fig


def certainty_and_loss(certainty, loss=None):
    """Certainty [B, T] and loss [B, T] per tick: one faint line per sample, the mean in bold.
    Without a loss (``None`` or all NaN: no targets) only the certainty is drawn."""
    certainty = _np(certainty)
    loss = None if loss is None or np.isnan(_np(loss)).all() else _np(loss)
    T = certainty.shape[-1]
    panels = [(certainty, "certainty (1 - normalised entropy)")]
    if loss is not None:
        panels.append((loss, "cross-entropy loss"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 3.6), sharex=True, squeeze=False
    )
    axes = axes[0]
    for ax, (values, name) in zip(axes, panels):
        for row in values:
            ax.plot(ticks_axis(T), row, color="tab:blue", alpha=0.15, lw=0.8)
        ax.plot(ticks_axis(T), values.mean(0), color="tab:red", lw=2, label="mean")
        tick_xaxis(ax)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def ticks_histogram(ticks_used, T: int, title: str = "ticks used"):
    """Histogram of the number of ticks (1-based) samples used."""
    ticks_used = _np(ticks_used).astype(int)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar(ticks_axis(T), np.bincount(ticks_used - 1, minlength=T)[:T], color="tab:blue")
    tick_xaxis(ax, "ticks used")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def tick_histogram_from_counts(counts, title: str):
    counts = _np(counts)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar(ticks_axis(len(counts)), counts, color="tab:blue")
    tick_xaxis(ax)
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _label_without_overlap(
    ax, points: list[tuple[float, float]], texts: list[str], fontsize: float = 7
) -> list:
    """Annotate points, merging points that coincide into one label and leaving out a label that
    would overlap one already placed (the colour of the point still tells its threshold)."""
    merged: dict[tuple, list[str]] = {}
    for (x, y), text in zip(points, texts):
        merged.setdefault((round(x, 6), round(y, 6)), []).append(text)
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed, boxes = [], []
    for (x, y), group in merged.items():
        text = group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}"
        ann = ax.annotate(
            text, (x, y), fontsize=fontsize, xytext=(4, 4), textcoords="offset points"
        )
        box = ann.get_window_extent(renderer).padded(2)
        if any(box.overlaps(b) for b in boxes):
            ann.remove()
            continue
        boxes.append(box)
        placed.append(ann)
    return placed


def halting_sweep(summary: dict, timing: dict | None = None):
    """Accuracy against mean ticks used over certainty thresholds, and the measured wall-time saving.

    Points are coloured by threshold (colour bar); thresholds that land on the same point share one
    label ("0.3..0.9"), and a label that would overlap another is left out."""
    rows = summary["sweep"]
    fig, axes = plt.subplots(
        1, 2 if timing else 1, figsize=(11 if timing else 5.6, 4), squeeze=False
    )
    ax = axes[0, 0]
    x = [r["mean_ticks"] for r in rows]
    y = [100 * r["top1"] for r in rows]
    thr = [r["threshold"] for r in rows]
    ax.plot(x, y, color="0.6", lw=1, zorder=1)
    points = ax.scatter(x, y, c=thr, cmap="viridis", zorder=2, s=30)
    ax.axhline(100 * summary["top1_all_ticks"], color="k", ls="--", lw=1, label="all ticks")
    ax.set_xlabel("mean ticks used")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("halting at certainty >= threshold", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    fig.colorbar(points, ax=ax, label="certainty threshold", fraction=0.05)
    if timing:
        axes[0, 1].set_ylabel(
            "saving against all ticks (%)"
        )  # before the layout, which makes room for it
    fig.tight_layout(w_pad=2.5)
    _label_without_overlap(ax, list(zip(x, y)), [f"{t:g}" for t in thr])
    if timing:
        ax = axes[0, 1]
        t_thr = [r["threshold"] for r in timing["per_threshold"]]
        ax.plot(
            t_thr,
            [100 * r["saving"] for r in timing["per_threshold"]],
            marker="o",
            label="wall time",
        )
        if all("cpu_saving" in r for r in timing["per_threshold"]):
            ax.plot(
                t_thr,
                [100 * r["cpu_saving"] for r in timing["per_threshold"]],
                marker="^",
                label="cpu time",
            )
        by_thr = {r["threshold"]: r for r in rows}
        ax.plot(
            t_thr,
            [100 * by_thr[t]["tick_saving"] if t in by_thr else np.nan for t in t_thr],
            marker="s",
            label="ticks",
        )
        ax.set_xlabel("certainty threshold")
        ax.set_ylabel("saving against all ticks (%)")
        ax.set_title("what halting saves", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def shown_ticks(T: int, max_ticks: int) -> np.ndarray:
    """0-based indices of at most ``max_ticks`` ticks spread evenly over T, first and last included."""
    if T <= max_ticks:
        return np.arange(T)
    return np.unique(np.linspace(0, T - 1, max_ticks).round().astype(int))


def tick_title(t: int, T: int, predicted=None, certainty=None, class_names=None) -> str:
    """ "tick t/T" (t 0-based in, 1-based out), with the class predicted at that tick and its certainty."""
    text = f"tick {t + 1}/{T}"
    if predicted is not None:
        text += f"\n{class_label(int(predicted[t]), class_names)}"
    if certainty is not None:
        text += (
            f" ({float(certainty[t]):.2f})"
            if predicted is not None
            else f"\ncertainty {float(certainty[t]):.2f}"
        )
    return text


def attention_grid(
    image,
    attention,
    max_ticks: int = 32,
    alpha: float = 0.55,
    predicted=None,
    certainty=None,
    class_names=None,
    target: int | None = None,
):
    """Attention over the input per tick: the input alone, then its [T, h, w] maps (heads averaged)
    laid over it on one colour scale (colour bar). ``predicted`` [T] classes and ``certainty`` [T]
    go in each tick's title; ``target`` (a class index) under the input."""
    image, attention = _np(image), _np(attention)
    T = attention.shape[0]
    ticks = shown_ticks(T, max_ticks)
    predicted = None if predicted is None else _np(predicted)
    certainty = None if certainty is None else _np(certainty)
    n = len(ticks) + 1
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.9 * cols + 0.8, 2.15 * rows), squeeze=False, layout="constrained"
    )
    H, W = image.shape[:2]
    vmax = float(attention[ticks].max()) or 1.0
    for ax in axes.flat:
        ax.axis("off")
    first = axes.flat[0]
    first.imshow(image, interpolation="nearest")
    first.set_title(
        "input"
        + (f"\nlabel {class_label(int(target), class_names)}" if target is not None else ""),
        fontsize=8,
    )
    heat = None
    for ax, t in zip(list(axes.flat)[1:], ticks):
        ax.imshow(image, interpolation="nearest")
        heat = ax.imshow(
            attention[t],
            cmap="inferno",
            alpha=alpha,
            vmin=0,
            vmax=vmax,
            extent=(-0.5, W - 0.5, H - 0.5, -0.5),
            interpolation="bilinear",
        )
        ax.set_title(tick_title(t, T, predicted, certainty, class_names), fontsize=8)
    bar = fig.colorbar(heat, ax=axes.ravel().tolist(), fraction=0.025, pad=0.01)
    bar.set_label("attention weight (heads averaged)", fontsize=8)
    bar.solids.set_alpha(1)
    title = "attention over the input, tick by tick"
    if predicted is not None or certainty is not None:
        title += ("; predicted class" if predicted is not None else "") + (
            " (certainty)" if certainty is not None else ""
        )
    fig.suptitle(title, fontsize=9)
    return fig


def neuron_traces(post, n_neurons: int = 16, seed: int = 0, neurons=None):
    """Post-activation traces over ticks of a sample of neurons; post: [T, D] for one input.
    ``neurons`` picks them (else ``sample_neurons(D, n_neurons, seed)``, the synchronisation plot's choice)."""
    post = _np(post)
    T, D = post.shape
    idx = sample_neurons(D, n_neurons, seed) if neurons is None else np.asarray(neurons)
    cols = 4
    rows = math.ceil(len(idx) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.6 * cols, 1.7 * rows + 0.6),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for ax, n in zip(axes.flat, idx):
        ax.plot(ticks_axis(T), post[:, n], lw=1.2, marker="o", ms=2)
        ax.set_title(f"neuron {n}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(idx) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("tick", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("post-activation", fontsize=8)
    fig.suptitle(
        f"post-activations over ticks 1..{T} (the neurons of the synchronisation plot)", fontsize=9
    )
    return fig


def synchronisation_matrix(post, neurons) -> np.ndarray:
    """S[i, j] = sum_t z_i(t) z_j(t) / sqrt(T) for the given neurons; post: [T, D]."""
    z = _np(post)[:, np.asarray(neurons)]
    return z.T @ z / math.sqrt(z.shape[0])


def synchronisation_figure(post, n_neurons: int = 16, seed: int = 0, neurons=None):
    """Synchronisation matrix of a sample of neurons over all ticks; the same sample as ``neuron_traces``
    for the same ``seed`` (or the given ``neurons``)."""
    post = _np(post)
    idx = sample_neurons(post.shape[1], n_neurons, seed) if neurons is None else np.asarray(neurons)
    S = synchronisation_matrix(post, idx)
    fig, ax = plt.subplots(figsize=(5, 4.4), layout="constrained")
    lim = float(np.abs(S).max()) or 1.0
    im = ax.imshow(S, cmap="coolwarm", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(idx)), [str(i) for i in idx], fontsize=7, rotation=90)
    ax.set_yticks(range(len(idx)), [str(i) for i in idx], fontsize=7)
    ax.set_xlabel("neuron")
    ax.set_ylabel("neuron")
    ax.set_title(f"synchronisation of {len(idx)} neurons over ticks 1..{post.shape[0]}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label=r"$S_{ij} = \sum_t z_i(t)\,z_j(t) / \sqrt{T}$")
    return fig


def maze_accuracy_per_tick(summary: dict):
    T = summary["ticks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(
        ticks_axis(T), 100 * np.asarray(summary["step_accuracy_per_tick"]), label="per step"
    )
    axes[0].plot(
        ticks_axis(T), 100 * np.asarray(summary["route_accuracy_per_tick"]), label="whole route"
    )
    tick_xaxis(axes[0])
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    pos = np.asarray(summary["step_accuracy_per_position"])
    axes[1].plot(np.arange(1, len(pos) + 1), 100 * pos)
    axes[1].set_xlabel("route step")
    axes[1].set_ylabel("accuracy at most certain tick (%)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def generalisation(summary: dict):
    rows = summary["by_route_length"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    lengths = [r["route_length"] for r in rows]
    axes[0].plot(lengths, [100 * r["solved"] for r in rows], marker="o")
    axes[0].set_xlabel("optimal route length")
    axes[0].set_ylabel("solved (%)")
    reapp = [r["mean_reapplications_when_solved"] for r in rows]
    axes[1].plot(
        lengths, [np.nan if v is None else v for v in reapp], marker="o", color="tab:orange"
    )
    axes[1].set_xlabel("optimal route length")
    axes[1].set_ylabel("re-applications (solved mazes)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def parity_accuracy(summary: dict):
    per = 100 * np.asarray(summary["accuracy_per_position_per_tick"])  # [L, T]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    im = axes[0].imshow(
        per,
        aspect="auto",
        cmap="viridis",
        vmin=0,
        vmax=100,
        origin="lower",
        extent=(0.5, per.shape[1] + 0.5, 0.5, per.shape[0] + 0.5),
    )
    tick_xaxis(axes[0])
    axes[0].set_ylabel("position")
    fig.colorbar(im, ax=axes[0], label="accuracy (%)")
    axes[1].plot(np.arange(1, per.shape[0] + 1), 100 * np.asarray(summary["accuracy_per_position"]))
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("accuracy at most certain tick (%)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


SPAN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def chart(c):
    """A task's chart (``ctm_dist.tasks.Chart``): its series over x = 1..n, lines or bars, shaded
    spans labelled at the top."""
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    names = list(c.series)
    for k, name in enumerate(names):
        values = _np(c.series[name])
        x = np.arange(1, len(values) + 1)
        if c.bars:
            width = 0.8 / len(names)
            ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width=width, label=name)
        else:
            ax.plot(x, values, lw=1.4, marker="o" if len(values) <= 60 else None, ms=2, label=name)
    for k, (first, last, label) in enumerate(c.spans):
        ax.axvspan(first - 0.5, last + 0.5, color=SPAN_COLOURS[k % len(SPAN_COLOURS)], alpha=0.08)
        ax.text(
            (first + last) / 2,
            1.0,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if c.ylim is not None:
        ax.set_ylim(*c.ylim)
    tick_xaxis(ax, c.xlabel)
    ax.set_ylabel(c.ylabel)
    ax.grid(alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8)
    ax.set_title(c.title, fontsize=9, pad=14 if c.spans else 6)
    return fig
