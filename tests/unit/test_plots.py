"""Pictures: every file the visualisation command promises is written and holds what it should
(one GIF frame per tick, large enough to read, heat maps that follow the attention; colour bars,
axis labels, bin counts, the predicted class and certainty per tick, ticks numbered 1..T, labels
that do not overlap), and the predict command prints class, tick and certainty consistent with
adaptive inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_fixtures import tiny_ctm, write_digit_shards
from PIL import Image

from ctm_dist.data.mazes_gen import generate_maze
from ctm_dist.data.transforms import maze_to_tensor
from ctm_dist.eval import animate, plots
from ctm_dist.eval.cli import predict_main, visualize_main
from ctm_dist.eval.export import save_consolidated
from ctm_dist.eval.inputs import attention_maps
from ctm_dist.eval.pictures import make_pictures
from ctm_dist.eval.report import write_report


def gif_frames(path) -> int:
    with Image.open(path) as im:
        return im.n_frames


def gif_rgb(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")).astype(int))
        return frames


def colour_bars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def visible_tick_labels(ax) -> list[str]:
    ax.figure.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    return [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi]


def test_visualize_command_on_a_shard_set(tmp_path):
    model = tiny_ctm(seed=2)
    export = tmp_path / "export"
    save_consolidated(model, export, task="demo", meta={"image_size": 16})
    write_digit_shards(tmp_path / "shards", n=12)
    out = tmp_path / "pictures"
    assert (
        visualize_main(
            [
                str(export),
                "--data",
                str(tmp_path / "shards"),
                "--count",
                "6",
                "--per-input",
                "2",
                "--threshold",
                "0.5",
                "--out",
                str(out),
                "--tensorboard",
            ]
        )
        == 0
    )
    T = model.cfg.iterations
    for name in (
        "certainty_loss",
        "ticks_used",
        "attention_0",
        "attention_1",
        "neurons_0",
        "sync_1",
    ):
        with Image.open(out / f"{name}.png") as im:
            assert im.size[0] > 200 and im.size[1] > 100
    assert gif_frames(out / "attention_0.gif") == T
    assert not (out / "attention_2.png").exists()  # only --per-input inputs get per-input pictures
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_maze_route_gif_unfolds_per_tick(tmp_path):
    L = 12
    model = tiny_ctm(seed=0, out_dims=L * 5, prediction_reshaper=[L, 5], iterations=4)
    mazes = [generate_maze(11, seed=s) for s in range(2)]
    x = torch.stack([maze_to_tensor(m.image) for m in mazes])
    y = torch.tensor([(m.moves + [4] * L)[:L] for m in mazes])
    written = make_pictures(model, x, "mazes", tmp_path, targets=y, per_input=1)
    assert tmp_path / "maze_0.gif" in written
    assert gif_frames(tmp_path / "maze_0.gif") == 4 + 1  # the true route, then one frame per tick
    with Image.open(tmp_path / "maze_0.gif") as im:
        assert min(im.size) >= 400  # a 11x11 maze is readable, not a thumbnail
    # the true-route frame paints exactly the route's cells (start and goal keep their colours)
    rgb = mazes[0].image.astype(float) / 255
    painted = animate.maze_route_image(rgb, y[0].numpy(), colour=(0.2, 0.4, 1.0))
    changed = np.argwhere((painted != rgb).any(-1))
    assert len(changed) == min(L, len(mazes[0].moves)) - (1 if len(mazes[0].moves) <= L else 0)


def test_attention_gif_is_large_and_follows_the_attention(tmp_path):
    image = np.zeros((16, 16, 3))
    attention = np.zeros((2, 4, 4))
    attention[0, 0, 0] = 1.0  # tick 1: top-left token
    attention[1, 3, 3] = 1.0  # tick 2: bottom-right token
    path = animate.attention_gif(
        image, attention, tmp_path / "a.gif", predicted=[3, 4], certainty=[0.2, 0.9]
    )
    first, second = gif_rgb(path)
    assert len(gif_rgb(path)) == 2
    assert first.shape[1] >= 600 and first.shape[0] >= 300  # readable at 100% zoom
    # the heat (warm colours over the black input) moves from the top left to the bottom right
    warm = [(f[..., 0] > 120) & (f[..., 0] - f[..., 2] > 60) for f in (first, second)]
    only_first, only_second = np.argwhere(warm[0] & ~warm[1]), np.argwhere(warm[1] & ~warm[0])
    assert len(only_first) and len(only_second)
    assert (only_first.mean(0) < only_second.mean(0) - 10).all()
    tracked = torch.zeros(1, 1, 2, 1, 12)  # 12 tokens over a 6x8 (h x w) image -> 3 x 4 grid
    assert attention_maps(tracked, (6, 8)).shape == (1, 1, 3, 4)
    with pytest.raises(ValueError):
        attention_maps(torch.zeros(1, 1, 2, 1, 7), (6, 8))


def test_attention_grid_shows_the_input_class_certainty_and_a_colour_bar():
    T = 5
    rng = np.random.default_rng(0)
    fig = plots.attention_grid(
        rng.random((16, 16, 3)),
        rng.random((T, 4, 4)),
        predicted=[1, 1, 2, 2, 2],
        certainty=[0.1, 0.25, 0.5, 0.75, 0.95],
        class_names=["cat", "dog", "emu"],
        target=2,
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "input\nlabel emu"
    assert titles[1:] == [
        "tick 1/5\ndog (0.10)",
        "tick 2/5\ndog (0.25)",
        "tick 3/5\nemu (0.50)",
        "tick 4/5\nemu (0.75)",
        "tick 5/5\nemu (0.95)",
    ]
    [bar] = colour_bars(fig)
    assert "attention" in bar.get_ylabel()
    # more ticks than panels: spread over the run, the first and the last kept
    fig = plots.attention_grid(np.zeros((8, 8, 3)), np.zeros((50, 2, 2)), max_ticks=8)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("tick")]
    assert len(titles) == 8 and titles[0] == "tick 1/50" and titles[-1] == "tick 50/50"


def test_neuron_traces_have_labelled_axes_and_the_synchronisation_plots_neurons():
    T, D = 7, 40
    post = np.random.default_rng(1).standard_normal((T, D))
    traces, sync = plots.neuron_traces(post, seed=3), plots.synchronisation_figure(post, seed=3)
    traced = {ax.get_title().removeprefix("neuron ") for ax in traces.axes if ax.get_title()}
    sync_ax = next(ax for ax in sync.axes if ax.get_label() != "<colorbar>")
    assert traced == {t.get_text() for t in sync_ax.get_xticklabels()}
    assert len(traced) == 16
    assert {ax.get_xlabel() for ax in traces.axes if ax.get_xlabel()} == {"tick"}
    assert {ax.get_ylabel() for ax in traces.axes if ax.get_ylabel()} == {"post-activation"}
    assert sync_ax.get_xlabel() == "neuron" and sync_ax.get_ylabel() == "neuron"
    assert colour_bars(sync)
    shown = visible_tick_labels(traces.axes[-1])
    assert shown and all(s.isdigit() and 1 <= int(s) <= T for s in shown)


def test_ticks_are_numbered_from_one_with_whole_numbers():
    T = 5
    fig = plots.certainty_and_loss(
        np.random.default_rng(0).random((3, T)), np.random.default_rng(1).random((3, T))
    )
    for ax in fig.axes:
        assert ax.get_xlabel() == "tick"
        assert list(ax.lines[-1].get_xdata()) == [1, 2, 3, 4, 5]
        shown = visible_tick_labels(ax)
        assert shown and all(s.isdigit() and 1 <= int(s) <= T for s in shown), shown
    assert plots.tick_title(0, T).startswith("tick 1/5")
    no_targets = plots.certainty_and_loss(
        np.random.default_rng(0).random((3, T)), np.full((3, T), np.nan)
    )
    assert [ax.get_ylabel() for ax in no_targets.axes] == ["certainty (1 - normalised entropy)"]
    fig = plots.tick_histogram_from_counts([4, 0, 1, 2, 3], "most certain tick")
    assert [p.get_x() + p.get_width() / 2 for p in fig.axes[0].patches] == [1, 2, 3, 4, 5]
    assert all(s.isdigit() for s in visible_tick_labels(fig.axes[0]))


def test_reliability_diagram_shows_bin_counts():
    rows = [
        {"low": 0.4, "high": 0.5, "count": 17, "confidence": 0.46, "accuracy": 0.3},
        {"low": 0.8, "high": 0.9, "count": 230, "confidence": 0.86, "accuracy": 0.81},
        {"low": 0.9, "high": 1.0, "count": 1234, "confidence": 0.97, "accuracy": 0.96},
    ]
    fig = plots.reliability_diagram(rows, ece=0.04)
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"17", "230", "1234"} <= texts
    assert "samples" in {ax.get_ylabel() for ax in fig.axes}
    assert "confidence" in {ax.get_xlabel() for ax in fig.axes}


def test_halting_sweep_labels_do_not_overlap():
    thresholds = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.01)
    # low thresholds all stop at tick 1 (one point), the rest crowd together near the end
    ticks = [1.0, 1.0, 1.0, 1.0, 4.0, 4.05, 4.1, 4.15, 4.2, 7.9, 7.95, 8.0]
    summary = {
        "top1_all_ticks": 0.9,
        "sweep": [
            {"threshold": t, "top1": 0.5 + 0.05 * m / 8, "mean_ticks": m, "tick_saving": 1 - m / 8}
            for t, m in zip(thresholds, ticks)
        ],
    }
    fig = plots.halting_sweep(summary)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert "0.3..0.6" in {
        t.get_text() for t in labels
    }  # one label for the thresholds that coincide
    assert colour_bars(fig)


def test_report_writes_every_task_figure(tmp_path):
    report = {
        "classification": {
            "ticks": 2,
            **{
                f"{r}_top{k}_per_tick": [0.1, 0.2]
                for r in ("instant", "most_certain", "mean_logits", "certainty_weighted")
                for k in (1, 5)
            },
            "reliability_most_certain": [{"confidence": 0.5, "accuracy": 0.4}],
            "ece_most_certain": 0.1,
            "most_certain_tick_histogram": [3, 4],
            "most_certain_top1": 0.2,
        },
        "halting": {
            "top1_all_ticks": 0.2,
            "sweep": [{"threshold": 0.5, "top1": 0.2, "mean_ticks": 1.5, "tick_saving": 0.25}],
        },
        "mazes": {
            "ticks": 2,
            "step_accuracy_per_tick": [0.5, 0.6],
            "route_accuracy_per_tick": [0.1, 0.2],
            "step_accuracy_per_position": [0.7, 0.6, 0.5],
            "step_accuracy": 0.6,
        },
        "generalisation": {
            "mazes": 2,
            "solved": 0.5,
            "by_route_length": [
                {"route_length": 10, "solved": 1.0, "mean_reapplications_when_solved": 2.0},
                {"route_length": 30, "solved": 0.0, "mean_reapplications_when_solved": None},
            ],
        },
        "parity": {
            "accuracy_per_position_per_tick": [[0.5, 1.0], [0.4, 0.9]],
            "accuracy_per_position": [1.0, 0.9],
            "accuracy": 0.95,
        },
    }
    names = {p.name for p in write_report(report, tmp_path, tensorboard=False)}
    assert names == {
        "report.json",
        "accuracy_per_tick.png",
        "calibration.png",
        "most_certain_tick.png",
        "halting_sweep.png",
        "maze_accuracy.png",
        "maze_generalisation.png",
        "parity_accuracy.png",
    }


def test_predict_command_prints_class_tick_and_certainty(tmp_path, capsys):
    from ctm_dist.eval.inputs import image_files
    from ctm_dist.inference import predict

    model = tiny_ctm(seed=4)
    save_consolidated(
        model,
        tmp_path / "export",
        task="demo",
        meta={"image_size": 16, "classes": [f"digit-{d}" for d in range(10)]},
    )
    files = []
    rng = np.random.default_rng(0)
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    assert predict_main([str(tmp_path / "export"), *files, "--threshold", "0.0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    expected = predict(model, image_files(files, "demo", 16), certainty_threshold=0.0)
    for line, logits, cert in zip(lines, expected.predictions, expected.certainty):
        name, cls, tick, certainty = line.split("\t")
        assert cls == f"class=digit-{int(logits.argmax())}"
        assert (
            tick == f"tick=1/{model.cfg.iterations}"
        )  # threshold 0: everyone stops at the first tick
        assert float(certainty.split("=")[1]) == pytest.approx(float(cert), abs=1e-3)
