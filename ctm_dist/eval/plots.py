"""Figures of an evaluation: each function returns a matplotlib Figure (saved as PNG and sent to TensorBoard).

Inputs are plain arrays (numpy or CPU tensors) so the figures do not depend on how they were computed.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .classification import READOUTS  # noqa: E402


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
    return np.arange(1, T + 1)


def accuracy_per_tick(summary: dict):
    """Top-1 and top-5 accuracy at each tick for the four readouts of a classification summary."""
    T = summary["ticks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, k in zip(axes, (1, 5)):
        for r in READOUTS:
            ax.plot(ticks_axis(T), 100 * np.asarray(summary[f"{r}_top{k}_per_tick"]), label=r.replace("_", " "))
        ax.set_xlabel("tick")
        ax.set_ylabel(f"top-{k} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy per tick (readouts use ticks up to t)")
    fig.tight_layout()
    return fig


def reliability_diagram(rows: list[dict], ece: float, title: str = "calibration at the most certain tick"):
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    if rows:
        conf = [r["confidence"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        ax.plot(conf, acc, marker="o")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {ece:.3f}", fontsize=9)
    fig.tight_layout()
    return fig


def certainty_and_loss(certainty, loss):
    """Certainty [B, T] and loss [B, T] per tick: one faint line per sample, the mean in bold."""
    certainty, loss = _np(certainty), _np(loss)
    T = certainty.shape[-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, values, name in ((axes[0], certainty, "certainty (1 - normalised entropy)"), (axes[1], loss, "cross-entropy loss")):
        for row in values:
            ax.plot(ticks_axis(T), row, color="tab:blue", alpha=0.15, lw=0.8)
        ax.plot(ticks_axis(T), values.mean(0), color="tab:red", lw=2, label="mean")
        ax.set_xlabel("tick")
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
    ax.set_xlabel("ticks used")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def tick_histogram_from_counts(counts, title: str):
    counts = _np(counts)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.bar(ticks_axis(len(counts)), counts, color="tab:blue")
    ax.set_xlabel("tick")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def halting_sweep(summary: dict, timing: dict | None = None):
    """Accuracy against mean ticks used over certainty thresholds, and the measured wall-time saving."""
    rows = summary["sweep"]
    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(10 if timing else 5, 3.8), squeeze=False)
    ax = axes[0, 0]
    x = [r["mean_ticks"] for r in rows]
    y = [100 * r["top1"] for r in rows]
    ax.plot(x, y, marker="o")
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(f"{r['threshold']:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * summary["top1_all_ticks"], color="k", ls="--", lw=1, label="all ticks")
    ax.set_xlabel("mean ticks used")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("halting at certainty >= threshold", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if timing:
        ax = axes[0, 1]
        thr = [r["threshold"] for r in timing["per_threshold"]]
        ax.plot(thr, [100 * r["saving"] for r in timing["per_threshold"]], marker="o", label="wall time")
        if all("cpu_saving" in r for r in timing["per_threshold"]):
            ax.plot(thr, [100 * r["cpu_saving"] for r in timing["per_threshold"]], marker="^", label="cpu time")
        by_thr = {r["threshold"]: r for r in rows}
        ax.plot(thr, [100 * by_thr[t]["tick_saving"] if t in by_thr else np.nan for t in thr], marker="s", label="ticks")
        ax.set_xlabel("certainty threshold")
        ax.set_ylabel("saving (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def attention_grid(image, attention, max_ticks: int = 32, alpha: float = 0.55):
    """Attention over the input per tick: [T, h, w] maps (heads averaged) laid over the image [H, W, 3]."""
    image, attention = _np(image), _np(attention)
    T = min(attention.shape[0], max_ticks)
    cols = min(T, 8)
    rows = math.ceil(T / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    H, W = image.shape[:2]
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= T:
            continue
        ax.imshow(image)
        ax.imshow(attention[i], cmap="inferno", alpha=alpha, extent=(-0.5, W - 0.5, H - 0.5, -0.5),
                  interpolation="bilinear")
        ax.set_title(f"tick {i + 1}", fontsize=7)
    fig.tight_layout()
    return fig


def neuron_traces(post, n_neurons: int = 16, seed: int = 0):
    """Post-activation traces over ticks of a random sample of neurons; post: [T, D] for one input."""
    post = _np(post)
    T, D = post.shape
    idx = np.sort(np.random.default_rng(seed).choice(D, size=min(n_neurons, D), replace=False))
    cols = 4
    rows = math.ceil(len(idx) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.4 * rows), sharex=True, squeeze=False)
    for ax, n in zip(axes.flat, idx):
        ax.plot(ticks_axis(T), post[:, n], lw=1.2)
        ax.set_title(f"neuron {n}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(idx):]:
        ax.axis("off")
    fig.suptitle("post-activations over ticks", fontsize=9)
    fig.tight_layout()
    return fig


def synchronisation_matrix(post, neurons) -> np.ndarray:
    """S[i, j] = sum_t z_i(t) z_j(t) / sqrt(T) for the given neurons; post: [T, D]."""
    z = _np(post)[:, np.asarray(neurons)]
    return z.T @ z / math.sqrt(z.shape[0])


def synchronisation_figure(post, n_neurons: int = 12, seed: int = 0):
    post = _np(post)
    idx = np.sort(np.random.default_rng(seed).choice(post.shape[1], size=min(n_neurons, post.shape[1]), replace=False))
    S = synchronisation_matrix(post, idx)
    fig, ax = plt.subplots(figsize=(4.4, 4))
    lim = float(np.abs(S).max()) or 1.0
    im = ax.imshow(S, cmap="coolwarm", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(idx)), [str(i) for i in idx], fontsize=6, rotation=90)
    ax.set_yticks(range(len(idx)), [str(i) for i in idx], fontsize=6)
    ax.set_title("synchronisation of a few neurons (all ticks)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def maze_accuracy_per_tick(summary: dict):
    T = summary["ticks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(ticks_axis(T), 100 * np.asarray(summary["step_accuracy_per_tick"]), label="per step")
    axes[0].plot(ticks_axis(T), 100 * np.asarray(summary["route_accuracy_per_tick"]), label="whole route")
    axes[0].set_xlabel("tick")
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
    axes[1].plot(lengths, [np.nan if v is None else v for v in reapp], marker="o", color="tab:orange")
    axes[1].set_xlabel("optimal route length")
    axes[1].set_ylabel("re-applications (solved mazes)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def parity_accuracy(summary: dict):
    per = 100 * np.asarray(summary["accuracy_per_position_per_tick"])  # [L, T]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    im = axes[0].imshow(per, aspect="auto", cmap="viridis", vmin=0, vmax=100, origin="lower",
                        extent=(0.5, per.shape[1] + 0.5, 0.5, per.shape[0] + 0.5))
    axes[0].set_xlabel("tick")
    axes[0].set_ylabel("position")
    fig.colorbar(im, ax=axes[0], label="accuracy (%)")
    axes[1].plot(np.arange(1, per.shape[0] + 1), 100 * np.asarray(summary["accuracy_per_position"]))
    axes[1].set_xlabel("position")
    axes[1].set_ylabel("accuracy at most certain tick (%)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig
