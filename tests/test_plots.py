"""Pictures: every file the visualisation command promises is written and holds what it should
(one GIF frame per tick, heat maps that follow the attention), and the predict command prints
class, tick and certainty consistent with adaptive inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctm_dist.data.mazes_gen import generate_maze
from ctm_dist.data.transforms import maze_to_tensor
from ctm_dist.eval import animate
from ctm_dist.eval.cli import predict_main, visualize_main
from ctm_dist.eval.export import save_consolidated
from ctm_dist.eval.inputs import attention_maps
from ctm_dist.eval.pictures import make_pictures
from ctm_dist.eval.report import write_report
from eval_fixtures import tiny_ctm, write_digit_shards


def gif_frames(path) -> int:
    with Image.open(path) as im:
        return im.n_frames


def test_visualize_command_on_a_shard_set(tmp_path):
    model = tiny_ctm(seed=2)
    export = tmp_path / "export"
    save_consolidated(model, export, task="demo", meta={"image_size": 16})
    write_digit_shards(tmp_path / "shards", n=12)
    out = tmp_path / "pictures"
    assert visualize_main([str(export), "--data", str(tmp_path / "shards"), "--count", "6", "--per-input", "2",
                           "--threshold", "0.5", "--out", str(out), "--tensorboard"]) == 0
    T = model.cfg.iterations
    for name in ("certainty_loss", "ticks_used", "attention_0", "attention_1", "neurons_0", "sync_1"):
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
    # the true-route frame paints exactly the route's cells (start and goal keep their colours)
    rgb = mazes[0].image.astype(float) / 255
    painted = animate.maze_route_image(rgb, y[0].numpy(), colour=(0.2, 0.4, 1.0))
    changed = np.argwhere((painted != rgb).any(-1))
    assert len(changed) == min(L, len(mazes[0].moves)) - (1 if len(mazes[0].moves) <= L else 0)


def test_attention_overlay_follows_the_attention():
    image = np.zeros((16, 16, 3))
    attention = np.zeros((2, 4, 4))
    attention[0, 0, 0] = 1.0  # tick 1: top-left token
    attention[1, 3, 3] = 1.0  # tick 2: bottom-right token
    frames = animate.attention_frames(image, attention, size=16)
    tl = np.asarray(frames[0])[14:, :][:4, :4].mean()  # below the caption strip
    br = np.asarray(frames[0])[14:, :][-4:, -4:].mean()
    assert tl > br
    assert np.asarray(frames[1])[14:, :][-4:, -4:].mean() > np.asarray(frames[1])[14:, :][:4, :4].mean()
    tracked = torch.zeros(1, 1, 2, 1, 12)  # 12 tokens over a 6x8 (h x w) image -> 3 x 4 grid
    assert attention_maps(tracked, (6, 8)).shape == (1, 1, 3, 4)
    with pytest.raises(ValueError):
        attention_maps(torch.zeros(1, 1, 2, 1, 7), (6, 8))


def test_report_writes_every_task_figure(tmp_path):
    report = {
        "classification": {"ticks": 2, **{f"{r}_top{k}_per_tick": [0.1, 0.2] for r in
                                         ("instant", "most_certain", "mean_logits", "certainty_weighted")
                                         for k in (1, 5)},
                           "reliability_most_certain": [{"confidence": 0.5, "accuracy": 0.4}],
                           "ece_most_certain": 0.1, "most_certain_tick_histogram": [3, 4], "most_certain_top1": 0.2},
        "halting": {"top1_all_ticks": 0.2, "sweep": [{"threshold": 0.5, "top1": 0.2, "mean_ticks": 1.5,
                                                     "tick_saving": 0.25}]},
        "mazes": {"ticks": 2, "step_accuracy_per_tick": [0.5, 0.6], "route_accuracy_per_tick": [0.1, 0.2],
                  "step_accuracy_per_position": [0.7, 0.6, 0.5], "step_accuracy": 0.6},
        "generalisation": {"mazes": 2, "solved": 0.5, "by_route_length": [
            {"route_length": 10, "solved": 1.0, "mean_reapplications_when_solved": 2.0},
            {"route_length": 30, "solved": 0.0, "mean_reapplications_when_solved": None}]},
        "parity": {"accuracy_per_position_per_tick": [[0.5, 1.0], [0.4, 0.9]], "accuracy_per_position": [1.0, 0.9],
                   "accuracy": 0.95},
    }
    names = {p.name for p in write_report(report, tmp_path, tensorboard=False)}
    assert names == {"report.json", "accuracy_per_tick.png", "calibration.png", "most_certain_tick.png",
                     "halting_sweep.png", "maze_accuracy.png", "maze_generalisation.png", "parity_accuracy.png"}


def test_predict_command_prints_class_tick_and_certainty(tmp_path, capsys):
    from ctm_dist.eval.inputs import image_files
    from ctm_dist.inference import predict

    model = tiny_ctm(seed=4)
    save_consolidated(model, tmp_path / "export", task="demo",
                      meta={"image_size": 16, "classes": [f"digit-{d}" for d in range(10)]})
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
        assert tick == f"tick=1/{model.cfg.iterations}"  # threshold 0: everyone stops at the first tick
        assert float(certainty.split("=")[1]) == pytest.approx(float(cert), abs=1e-3)
