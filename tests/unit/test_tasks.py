"""Task plug-ins and the loaders they build: values they settle once, in any call order."""

from __future__ import annotations

import pytest

from ctm_dist.data.mazes_writer import write_maze_shards
from ctm_dist.data.parity import ParityLoader
from ctm_dist.train.config import build_config
from ctm_dist.train.tasks import make_task

SHARD_ROUTE = 30  # the route length the maze shards are written with


@pytest.fixture(scope="module")
def maze_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mazes")
    for split in ("train", "val"):
        write_maze_shards(
            str(root), split, 4, "small", route_length=SHARD_ROUTE, seed=3, progress=False
        )
    return str(root)


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


@pytest.mark.parametrize("extra", [{"unknown": 1}, {"num_workers": 2}, {"route_length": 10}])
def test_parity_loader_refuses_arguments_it_does_not_use(extra):
    with pytest.raises(TypeError):
        ParityLoader(16, batch_size=4, **extra)


def test_parity_task_loaders_build():
    cfg = build_config(
        overrides=["data.task=parity", "model.preset=parity", "model.sequence_length=16"]
    )
    task = make_task(cfg, rank=0, world_size=1)
    assert next(iter(task.train_loader(4, seed=0)))["input"].shape == (4, 16)
    assert next(iter(task.eval_loader(4)))["target"].shape == (4, 16)
