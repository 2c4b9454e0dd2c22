"""The task registry and its tasks: every task builds its loaders and model config in any order,
metric sums split over ranks or workers combine to the numbers of one pass, unknown names fail
in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctm_dist.data.mazes_writer import write_maze_shards
from ctm_dist.data.parity import ParityLoader
from ctm_dist.data.writer import encode_image, write_shard_set
from ctm_dist.tasks import MetricSums, UnknownTask, get_task, make_task, task_names
from ctm_dist.train.config import ConfigError, build_config

SHARD_ROUTE = 30  # the route length the maze shards are written with
TICKS = 3
TINY = [
    "model.iterations=3",
    "model.d_model=32",
    "model.d_input=16",
    "model.heads=2",
    "model.n_synch_out=8",
    "model.n_synch_action=8",
    "model.memory_length=3",
]


@pytest.fixture(scope="module")
def maze_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mazes")
    for split in ("train", "val"):
        write_maze_shards(
            str(root), split, 4, "small", route_length=SHARD_ROUTE, seed=3, progress=False
        )
    return str(root)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """16 random 12x12 images per split, 10 classes."""
    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        samples = [
            {
                "__key__": f"{i:04d}",
                "png": encode_image(
                    Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)), "png"
                ),
                "cls": str(i % 10).encode(),
            }
            for i in range(16)
        ]
        meta = {"num_classes": 10, "image_size": 12}
        write_shard_set(
            str(root), split, "demo", samples, samples_per_shard=8, meta=meta, progress=False
        )
    return str(root)


@pytest.fixture(scope="module")
def data_for(maze_shards, digit_shards):
    """Config overrides that give each registered task its data."""
    return {
        "demo": [f"data.url={digit_shards}", "model.preset=demo"],
        "cifar10": [f"data.url={digit_shards}", "model.preset=cifar10", "data.image_size=16"],
        "imagenet": [f"data.url={digit_shards}", "model.preset=demo", "data.image_size=16"],
        "mazes": [f"data.url={maze_shards}", "model.preset=mazes"],
        "parity": ["model.preset=parity", "model.sequence_length=16"],
        # CTC needs a tick per number; the sort variant has no attention
        "sort": [
            "model.preset=sort-small",
            "model.sequence_length=3",
            "model.d_input=3",
            "model.heads=0",
            "model.n_synch_action=0",
        ],
    }


def _assert_close(a, b):
    """Nested dicts and lists of numbers equal to 1e-6 (float32 batch sums; NaN equal to NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_close(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    else:
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9, nan_ok=True)


def _task(name, data_for, extra=()):
    overrides = [f"data.task={name}", *TINY, *data_for[name], *extra]
    return make_task(build_config(overrides=overrides), rank=0, world_size=1)


def _outputs(model_cfg, batch, seed=0):
    """Random predictions [B, out, T] and certainties [B, 2, T] for a batch of targets."""
    g = torch.Generator().manual_seed(seed)
    B = batch["target"].shape[0]
    p = torch.randn(B, model_cfg.out_dims, TICKS, generator=g)
    c = torch.rand(B, 1, TICKS, generator=g)
    return p, torch.cat((1 - c, c), 1)


def test_registry_names_the_known_tasks_and_refuses_others_in_one_line():
    assert set(task_names()) == {
        "demo",
        "imagenet",
        "cifar10",
        "mazes",
        "parity",
        "qamnist",
        "sort",
        "rl",
    }
    assert all(get_task(n).name == n for n in task_names())
    with pytest.raises(UnknownTask) as e:
        get_task("sorting")
    message = str(e.value)
    assert "\n" not in message and "'sorting'" in message
    assert all(n in message for n in task_names())
    with pytest.raises(ConfigError, match="data.task must be one of demo, imagenet"):
        build_config(overrides=["data.task=sorting"])


@pytest.mark.parametrize("name", ["demo", "imagenet", "cifar10", "mazes", "parity", "sort"])
def test_every_task_builds_loaders_model_and_metrics_that_merge(name, data_for):
    """Loaders first, then the model config; the training metric sums of two halves reduce to the
    sums of one pass, and the offline measures of two workers merge to one worker's numbers."""
    task = _task(name, data_for)
    train = next(iter(task.train_loader(8, seed=0)))
    val = next(iter(task.eval_loader(8)))
    model_cfg = task.model_config()
    assert model_cfg.iterations == TICKS
    p, c = _outputs(model_cfg, val)
    target, valid = val["target"], val["valid"].float()
    assert train["target"].shape[1:] == target.shape[1:]
    length = get_task(name).target_length(model_cfg)
    assert (target.shape[1] if target.dim() == 2 else None) == length

    loss, tick = task.loss(p, c, target, valid)
    assert torch.isfinite(loss) and tick.shape == (target.shape[0],)
    whole, halves = MetricSums(), [MetricSums(), MetricSums()]
    whole.add("samples", valid.sum())
    task.accumulate(whole, p, target, valid, tick, eval=True)
    for part, rows in zip(halves, (slice(0, 3), slice(3, None))):
        part.add("samples", valid[rows].sum())
        task.accumulate(part, p[rows], target[rows], valid[rows], tick[rows], eval=True)
    merged = halves[0].merge(halves[1]).reduce()[0]
    _assert_close(task.summarise(merged, "eval"), task.summarise(whole.reduce()[0], "eval"))
    assert all(k.startswith("eval/") for k in task.summarise(merged, "eval"))

    req = type("Req", (), {"thresholds": (0.5, 2.0)})()
    one = get_task(name).evaluation_measures(model_cfg, req)
    two = [get_task(name).evaluation_measures(model_cfg, req) for _ in range(2)]
    keep = valid.bool()
    x, p, c, target = val["input"][keep], p[keep], c[keep], target[keep]
    for section, measure in one.items():
        measure.update(p, c, target, inputs=x)
        two[0][section].update(p[:3], c[:3], target[:3], inputs=x[:3])
        two[1][section].update(p[3:], c[3:], target[3:], inputs=x[3:])
        combined = two[0][section].merge(two[1][section]).summary()
        _assert_close(combined, measure.summary())
        assert combined["samples"] == int(keep.sum())


# offline report numbers that training logs too: task -> (report section, {report key: metric})
SHARED = {
    "demo": (
        "classification",
        {
            "most_certain_top1": "top1",
            "most_certain_top5": "top5",
            "instant_top1_per_tick": "per_tick_accuracy",
        },
    ),
    "mazes": (
        "mazes",
        {
            "step_accuracy": "step_accuracy",
            "route_accuracy": "route_accuracy",
            "step_accuracy_per_tick": "per_tick_accuracy",
        },
    ),
    "parity": (
        "parity",
        {
            "accuracy": "step_accuracy",
            "sequence_accuracy": "sequence_accuracy",
            "accuracy_per_tick": "per_tick_accuracy",
        },
    ),
    "sort": ("sort", {"accuracy": "step_accuracy", "sequence_accuracy": "sequence_accuracy"}),
}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_offline_measures_give_the_training_evaluation_numbers(name, data_for):
    """On the same outputs, the offline report's accuracies equal the trainer's eval/ metrics,
    tick choice and top-k included: logits and certainties are coarse, so ties are many."""
    task = _task(name, data_for)
    val = next(iter(task.eval_loader(8)))
    model_cfg = task.model_config()
    g = torch.Generator().manual_seed(5)
    B = val["target"].shape[0]
    p = torch.randint(-1, 2, (B, model_cfg.out_dims, TICKS), generator=g).float()
    c = torch.randint(0, 3, (B, 1, TICKS), generator=g).float() / 2
    c = torch.cat((1 - c, c), 1)
    target, valid = val["target"], val["valid"].float()
    _, tick = task.loss(p, c, target, valid)
    sums = MetricSums()
    sums.add("samples", valid.sum())
    task.accumulate(sums, p, target, valid, tick, eval=True)
    trained = task.summarise(sums.reduce()[0], "eval")

    section, shared = SHARED[name]
    req = type("Req", (), {"thresholds": (0.5,)})()
    measure = get_task(name).evaluation_measures(model_cfg, req)[section]
    keep = valid.bool()
    measure.update(p[keep], c[keep], target[keep], inputs=val["input"][keep])
    report = measure.summary()
    for key, metric in shared.items():
        _assert_close(report[key], trained[f"eval/{metric}"])
    if name == "demo":  # the running most-certain readout ends on the same tick and top-k rule
        for k in (1, 5):
            _assert_close(report[f"most_certain_top{k}_per_tick"][-1], trained[f"eval/top{k}"])


def test_headline_metric_names_per_split(data_for):
    """TensorBoard names: classification reports train/accuracy and eval/top1, sequences
    train/accuracy and eval/step_accuracy."""
    sums = MetricSums()
    sums.add("samples", 4)
    sums.add("correct", 3)
    sums.add("per_tick_correct", [1, 2, 3])
    reduced = sums.reduce()[0]
    for name, headline in (("demo", "top1"), ("parity", "step_accuracy")):
        task = _task(name, data_for)
        assert task.summarise(reduced, "train")["train/accuracy"] == 0.75
        assert task.summarise(reduced, "eval")[f"eval/{headline}"] == 0.75
    with pytest.raises(ValueError, match="split must be one of"):
        task.summarise(reduced, "eval/")


def test_merging_measures_of_different_shapes_is_refused():
    measures = get_task("parity").evaluation_measures
    cfg = build_config(overrides=["data.task=parity", "model.preset=parity", *TINY])
    a = measures(make_task(cfg, 0, 1).model_config(), None)["parity"]
    cfg = build_config(
        overrides=["data.task=parity", "model.preset=parity", "model.sequence_length=8", *TINY]
    )
    b = measures(make_task(cfg, 0, 1).model_config(), None)["parity"]
    with pytest.raises(ValueError, match="cannot merge ParityStats"):
        a.merge(b)


@pytest.mark.parametrize("override, expected", [(None, SHARD_ROUTE), (12, 12)])
def test_maze_loaders_built_before_the_model_config_match_it(maze_shards, override, expected):
    """The route length (``model.route_length``, else the shard set's) is the same for the loaders
    and the model whichever is built first."""
    overrides = ["data.task=mazes", f"data.url={maze_shards}", "model.preset=mazes"]
    if override is not None:
        overrides.append(f"model.route_length={override}")
    task = make_task(build_config(overrides=overrides), rank=0, world_size=1)
    train = next(iter(task.train_loader(2, seed=0)))
    val = next(iter(task.eval_loader(2)))
    model_cfg = task.model_config()
    assert model_cfg.prediction_reshaper == [expected, 5] and model_cfg.out_dims == 5 * expected
    assert train["target"].shape == (2, expected) and val["target"].shape == (2, expected)
    assert get_task("mazes").target_length(model_cfg) == expected


@pytest.mark.parametrize("extra", [{"unknown": 1}, {"num_workers": 2}, {"route_length": 10}])
def test_parity_loader_refuses_arguments_it_does_not_use(extra):
    with pytest.raises(TypeError):
        ParityLoader(16, batch_size=4, **extra)


def test_parity_length_defaults_to_the_preset_in_one_place():
    """Without ``model.sequence_length`` the loaders and the model use the preset's length."""
    task = make_task(build_config(overrides=["data.task=parity", "model.preset=parity"]), 0, 1)
    length = get_task("parity").target_length(task.model_config())
    assert next(iter(task.train_loader(2, seed=0)))["input"].shape == (2, length)
    with pytest.raises(TypeError):
        ParityLoader(batch_size=2)  # the length is always given


def test_sort_refuses_a_model_that_is_not_a_sort_variant():
    cfg = build_config(overrides=["data.task=sort", "model.preset=demo"])
    with pytest.raises(ValueError, match="the sort task needs a sort model"):
        get_task("sort").preflight(cfg)
    with pytest.raises(ValueError, match="builds the 'ctm' variant"):
        make_task(cfg, 0, 1)
    task = make_task(build_config(overrides=["data.task=sort", "model.preset=sort"]), 0, 1)
    assert task.sequence_length == 30 and task.model_config().out_dims == 31
