"""Evaluation: metrics against hand-computed values, halting against ``predict``, maze re-application,
and a whole evaluation over a shard set on S3, in-process and over two Ray workers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_fixtures import tiny_ctm, write_digit_shards

from ctm_dist.data.mazes_gen import generate_maze
from ctm_dist.data.transforms import maze_to_tensor
from ctm_dist.eval.halting import best_threshold
from ctm_dist.tasks.classification import (
    ClassificationStats,
    HaltingStats,
    expected_calibration_error,
    halting_ticks,
    readout_logits,
)
from ctm_dist.tasks.mazes import (
    GeneralisationStats,
    MazeStats,
    maze_rgb,
    solve_by_reapplication,
    walk_route,
)
from ctm_dist.tasks.parity import ParityStats


def certainties_from(values) -> torch.Tensor:
    c = torch.tensor(values, dtype=torch.float32)  # [B, T] certainty
    return torch.stack((1 - c, c), dim=1)


# ------------------------------------------------------------------ classification


def test_readouts_use_only_ticks_so_far():
    # 1 sample, 3 classes, 3 ticks. Tick logits favour classes 0, 2, 1; certainty peaks at tick 1.
    p = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 9.0], [0.0, 6.0, 0.0]]])  # [B=1, C=3, T=3]
    c = certainties_from([[0.2, 0.9, 0.5]])
    r = readout_logits(p, c)
    assert r["instant"][0].argmax(0).tolist() == [0, 2, 1]
    # tick 1 is the most certain from then on, also at tick 2 (less certain than tick 1)
    assert r["most_certain"][0].argmax(0).tolist() == [0, 2, 2]
    assert torch.equal(r["most_certain"][0, :, 2], p[0, :, 1])
    assert torch.allclose(r["mean_logits"][0, :, 1], p[0, :, :2].mean(-1))
    assert torch.allclose(r["certainty_weighted"][0, :, 2], (p[0] * c[0, 1]).sum(-1))


def test_classification_stats_counts_and_merge():
    p = torch.zeros(4, 6, 2)
    # ticks: sample i predicts class i at tick 0 and class 5 at tick 1
    for i in range(4):
        p[i, i, 0] = 3.0
        p[i, 5, 1] = 3.0
    targets = torch.tensor([0, 1, 5, 5])
    c = certainties_from([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    a = ClassificationStats(2)
    a.update(p[:2], c[:2], targets[:2])
    b = ClassificationStats(2)
    b.update(p[2:], c[2:], targets[2:])
    s = a.merge(b).summary()
    assert s["samples"] == 4
    assert s["instant_top1_per_tick"] == [
        0.5,
        0.5,
    ]  # tick 0: samples 0,1 right; tick 1: samples 2,3
    assert s["most_certain_top1"] == 1.0  # each sample's most certain tick is its right one
    assert s["most_certain_tick_histogram"] == [2, 2]
    assert s["instant_top5"] == 1.0 or s["instant_top5_per_tick"][1] >= 0.5


def test_ece_matches_definition():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 500)
    correct = rng.uniform(size=500) < conf**2
    stats = ClassificationStats(1, n_bins=10)
    # build logits whose softmax max is conf on class 0 of 2 classes: p0 = sigmoid(l0 - l1)
    l0 = torch.tensor(np.log(conf / (1 - conf + 1e-9)), dtype=torch.float32)
    p = torch.stack((l0, torch.zeros_like(l0)), 1)[:, :, None]
    targets = torch.tensor(np.where(correct, 0, 1))
    keep = conf > 0.5  # max prob must be class 0
    stats.update(p[keep], certainties_from(np.ones((int(keep.sum()), 1))), targets[keep])
    ece = expected_calibration_error(stats.sums["calib_per_tick"][0].numpy())
    c, k = conf[keep], correct[keep]
    bins = np.minimum((c * 10).astype(int), 9)
    expected = sum(
        abs(c[bins == b].mean() - k[bins == b].mean()) * (bins == b).sum()
        for b in range(10)
        if (bins == b).any()
    ) / len(c)
    assert ece == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------ halting


def test_halting_ticks_first_reaching_threshold():
    c = torch.tensor([[0.1, 0.6, 0.9], [0.95, 0.2, 0.1], [0.1, 0.2, 0.3]])
    assert halting_ticks(c, 0.5).tolist() == [1, 0, 2]
    assert halting_ticks(c, 2.0).tolist() == [2, 2, 2]


def test_halting_sweep_agrees_with_predict():
    """Offline sweep (full runs) and ``predict`` (shrinking batch) give the same ticks and answers."""
    from ctm_dist.inference import predict

    model = tiny_ctm(seed=3)
    x = torch.randn(12, 3, 16, 16)
    with torch.no_grad():
        p, c, _ = model(x)
    cert = c[:, 1]
    thr = float(cert.median())  # some samples halt early, some not
    targets = p[:, :, -1].argmax(1)
    stats = HaltingStats(model.cfg.iterations, thresholds=(thr, 2.0))
    stats.update(p, c, targets)
    out = predict(model, x, certainty_threshold=thr)
    assert out.tick.tolist() == halting_ticks(cert, thr).tolist()
    rows = torch.arange(12)
    assert torch.equal(out.predictions.argmax(1), p.argmax(1)[rows, out.tick])
    s = stats.summary()
    assert s["sweep"][0]["mean_ticks"] == pytest.approx(float((out.tick + 1).float().mean()))
    assert s["sweep"][1]["mean_ticks"] == model.cfg.iterations and s["sweep"][1]["top1"] == 1.0
    assert 0 < s["sweep"][0]["tick_saving"] < 1


def test_best_threshold_respects_the_drop():
    summary = {
        "sweep": [
            {"threshold": 0.5, "top1_drop_points": 3.0, "tick_saving": 0.7},
            {"threshold": 0.8, "top1_drop_points": 0.8, "tick_saving": 0.45},
            {"threshold": 0.9, "top1_drop_points": 0.1, "tick_saving": 0.2},
        ]
    }
    assert best_threshold(summary)["threshold"] == 0.8


# ------------------------------------------------------------------ mazes and parity


class OracleMazeSolver(torch.nn.Module):
    """Predicts the first ``route_len`` moves of the true route from the current start (all ticks,
    certain at the last): solving a larger maze takes ceil(length / route_len) applications."""

    def __init__(self, route_len: int, ticks: int = 3):
        super().__init__()
        self.route_len, self.ticks = route_len, ticks

    def forward(self, x):
        from ctm_dist.data.mazes_gen import moves_along, shortest_path

        out = torch.full((x.shape[0], self.route_len, 5, self.ticks), -5.0)
        for i in range(x.shape[0]):
            rgb, _ = maze_rgb(x[i])
            open_ = ~(rgb == 0).all(-1)
            start = tuple(np.argwhere((rgb == (1, 0, 0)).all(-1))[0])
            end = tuple(np.argwhere((rgb == (0, 1, 0)).all(-1))[0])
            moves = moves_along(shortest_path(open_, start, end))[: self.route_len]
            moves += [4] * (self.route_len - len(moves))
            for j, m in enumerate(moves):
                out[i, j, m] = 5.0
        c = torch.linspace(0.1, 0.9, self.ticks).expand(x.shape[0], -1)
        return out.reshape(x.shape[0], -1, self.ticks), torch.stack((1 - c, c), 1), None


def test_reapplication_solves_larger_mazes_in_pieces():
    maze = generate_maze(15, seed=4)
    length = len(maze.moves)
    x = maze_to_tensor(maze.image)
    oracle = OracleMazeSolver(route_len=6)
    result = solve_by_reapplication(oracle, x, max_reapplications=20)
    assert result["solved"]
    assert result["reapplications"] == math.ceil(length / 6)
    assert result["path"][-1] == tuple(maze.end)
    short = solve_by_reapplication(oracle, x, max_reapplications=1)
    assert not short["solved"] or length <= 6
    g = GeneralisationStats()
    g.add(length, result)
    g.add(length, short)
    summary = g.summary()
    assert (
        summary["mazes"] == 2
        and summary["by_route_length"][0]["mean_reapplications_when_solved"]
        == result["reapplications"]
    )


def test_walk_route_counts_wall_bumps():
    maze = generate_maze(9, seed=1)
    rgb = maze.image.astype(float) / 255
    right = walk_route(rgb, maze.moves)
    assert right.solved and right.mistakes == 0
    wall = next(m for m in range(4) if walk_route(rgb, [m], fault_tolerance=5).mistakes == 1)
    assert not walk_route(rgb, [wall] * 3 + maze.moves, fault_tolerance=2).solved
    assert walk_route(rgb, [wall] * 2 + maze.moves, fault_tolerance=2).solved


def test_maze_stats_step_and_route_accuracy():
    oracle = OracleMazeSolver(route_len=8)
    mazes = [generate_maze(11, seed=s) for s in range(3)]
    x = torch.stack([maze_to_tensor(m.image) for m in mazes])
    targets = torch.tensor([(m.moves[:8] + [4] * 8)[:8] for m in mazes])
    targets[0, 0] = (targets[0, 0] + 1) % 4  # one wrong step in the first route
    p, c, _ = oracle(x)
    s = MazeStats(3, 8)
    s.update(p, c, targets, inputs=x)
    out = s.summary()
    assert out["step_accuracy"] == pytest.approx(1 - 1 / 24)
    assert out["route_accuracy"] == pytest.approx(2 / 3)
    assert out["step_accuracy_per_position"][0] == pytest.approx(2 / 3)


def test_parity_stats_per_position_and_tick():
    B, L, T = 4, 3, 2
    targets = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    p = torch.zeros(B, L, 2, T)
    p.scatter_(2, targets[:, :, None, None].expand(B, L, 1, T), 1.0)  # right at both ticks
    p[:, 2, :, 0] = p[:, 2, :, 0].flip(-1)  # position 2 wrong at tick 0
    s = ParityStats(T, L)
    s.update(p.reshape(B, L * 2, T), certainties_from([[0.1, 0.9]] * B), targets)
    out = s.summary()
    assert out["accuracy_per_position_per_tick"] == [[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]
    assert out["accuracy"] == 1.0 and out["sequence_accuracy"] == 1.0


# ------------------------------------------------------------------ whole evaluation


def test_evaluate_on_s3_matches_direct_computation_and_cli(tmp_path, s3_location, s3_env):
    """A consolidated export on S3 evaluated on an S3 shard set: the report's numbers equal a direct
    computation, and the CLI writes JSON, PNGs and TensorBoard without the credentials."""
    from ctm_dist.eval.cli import evaluate_main
    from ctm_dist.eval.export import save_consolidated
    from ctm_dist.eval.inputs import shard_samples

    data = s3_location.child("shards")
    write_digit_shards(data, n=40)
    model = tiny_ctm(seed=1)
    export_url = save_consolidated(model, s3_location.child("export"), task="demo")
    out = tmp_path / "report"
    assert (
        evaluate_main(
            [
                export_url,
                "--data",
                data.url,
                "--out",
                str(out),
                "--batch-size",
                "16",
                "--timing-batches",
                "1",
                "--thresholds",
                "0.5",
                "2.0",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())

    x, y, _ = shard_samples(data.url, "val", 40)
    with torch.no_grad():
        p, c, _ = model(x)
    direct = ClassificationStats(model.cfg.iterations)
    direct.update(p, c, y)
    # the model records no input size and demo is sized by its shard set: the report reads the
    # shard set's own 16 px images, as the direct computation does (not the task's default 224)
    assert report["image_size"] is None
    assert report["classification"]["samples"] == 40
    assert report["classification"]["most_certain_top1"] == pytest.approx(
        direct.summary()["most_certain_top1"]
    )
    assert report["classification"]["instant_top5_per_tick"] == pytest.approx(
        direct.summary()["instant_top5_per_tick"]
    )
    assert report["halting"]["sweep"][1]["mean_ticks"] == model.cfg.iterations
    assert [r["threshold"] for r in report["halting_timing"]["per_threshold"]] == [0.5, 2.0]
    for name in ("accuracy_per_tick", "calibration", "halting_sweep", "most_certain_tick"):
        assert (out / f"{name}.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    top1 = events.Scalars("eval/top1")  # the training run's tag: the curves overlay
    assert [e.value for e in top1] == pytest.approx([report["classification"]["most_certain_top1"]])
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in (out / "report.json").read_text()


def test_two_ray_workers_merge_to_the_in_process_numbers(tmp_path, monkeypatch):
    from ctm_dist.eval.evaluate import EvalRequest, evaluate
    from ctm_dist.eval.export import save_consolidated

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    write_digit_shards(tmp_path / "shards", n=40)  # 3 shards: the workers get different ones
    export_dir = save_consolidated(tiny_ctm(seed=1), tmp_path / "export", task="demo")
    req = EvalRequest(checkpoint=export_dir, data=str(tmp_path / "shards"), batch_size=8)
    whole = evaluate(req)
    split = evaluate(EvalRequest(**{**req.__dict__, "workers": 2}))
    assert split["workers"] == 2 and split["classification"]["samples"] == 40
    for key in (
        "most_certain_top1",
        "certainty_weighted_top5",
        "ece_most_certain",
        "loss_per_tick",
    ):
        assert split["classification"][key] == pytest.approx(whole["classification"][key])
    assert split["halting"]["sweep"] == whole["halting"]["sweep"]


def test_evaluate_mazes_with_generalisation_and_parity(tmp_path):
    from ctm_dist.data.mazes_writer import write_maze_shards
    from ctm_dist.eval.evaluate import EvalRequest, evaluate
    from ctm_dist.eval.export import save_consolidated

    L = 10
    write_maze_shards(tmp_path / "small", "val", 6, size=11, route_length=L, progress=False)
    write_maze_shards(tmp_path / "large", "test", 3, size=21, route_length=200, progress=False)
    maze_model = tiny_ctm(seed=0, out_dims=L * 5, prediction_reshaper=[L, 5], iterations=3)
    export_dir = save_consolidated(maze_model, tmp_path / "maze-export", task="mazes")
    report = evaluate(
        EvalRequest(
            checkpoint=export_dir,
            data=str(tmp_path / "small"),
            batch_size=4,
            generalise_data=str(tmp_path / "large"),
            generalise_mazes=2,
            max_reapplications=3,
        )
    )
    assert report["task"] == "mazes" and report["mazes"]["samples"] == 6
    assert len(report["mazes"]["step_accuracy_per_position"]) == L
    assert 0 <= report["mazes"]["route_accuracy"] <= report["mazes"]["step_accuracy"] <= 1
    assert report["generalisation"]["mazes"] == 2


def test_evaluate_parity_on_generated_sequences(tmp_path):
    from ctm_dist.eval.evaluate import EvalRequest, evaluate
    from ctm_dist.eval.export import save_consolidated
    from ctm_dist.model import CTM, preset

    torch.manual_seed(0)
    model = CTM(
        preset(
            "parity",
            sequence_length=8,
            iterations=3,
            d_model=32,
            d_input=16,
            heads=2,
            n_synch_out=8,
            n_synch_action=8,
            memory_length=3,
            memory_hidden_dims=4,
        )
    ).eval()
    export_dir = save_consolidated(model, tmp_path / "parity-export", task="parity")
    report = evaluate(
        EvalRequest(checkpoint=export_dir, task="parity", batch_size=16, parity_samples=40)
    )
    per = np.asarray(report["parity"]["accuracy_per_position_per_tick"])
    assert report["parity"]["samples"] == 40 and per.shape == (8, 3)
    assert report["parity"]["accuracy"] == pytest.approx(
        np.mean(report["parity"]["accuracy_per_position"])
    )
