"""The feed-forward baseline: outputs of the reference's ``models/ff.py`` on the same weights
(fixtures from tests/golden/generate_baselines.py), a reference ``--model ff`` checkpoint loading
as it (tests/fixtures/make_reference_checkpoint.py), its interface, presets and config checks."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import ctm_dist
from ctm_dist.compat import (
    CheckpointError,
    export_reference_checkpoint,
    load_reference_checkpoint,
)
from ctm_dist.losses import image_classification_loss
from ctm_dist.model import (
    FFBaseline,
    FFConfig,
    ReferenceFFBaseline,
    build_model,
    config_from_fields,
    kind_of,
    model_config,
    normalised_entropy,
)
from ctm_dist.tasks import get_task
from ctm_dist.train.config import ConfigError, build_config

TESTS = Path(__file__).resolve().parents[1]
GOLDEN = sorted((TESTS / "golden" / "baselines").glob("ff_*.safetensors"))
CHECKPOINT = TESTS / "fixtures" / "reference_tiny_ff_cifar10.pt"
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_case(path: Path):
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    tensors = load_file(str(path))
    weights = {k.removeprefix("model."): v.float() for k, v in tensors.items() if "model." in k}
    weights = {k: v.long() if k.endswith("num_batches_tracked") else v for k, v in weights.items()}
    return config, weights, tensors


def test_fixtures_cover_basic_and_bottleneck_blocks_and_grey_input():
    configs = [load_case(p)[0] for p in GOLDEN]
    assert {c["backbone_type"] for c in configs} == {"resnet18-1", "resnet50-1"}
    assert {c["in_channels"] for c in configs} == {1, 3}


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_matches_reference(path):
    config, weights, expected = load_case(path)
    model = FFBaseline(FFConfig(**config))
    model.load_state_dict(weights, strict=True)  # the reference's parameter names
    model.eval()
    with torch.no_grad():
        predictions, certainties, synch = model(expected["input"])
    assert synch is None
    assert predictions.shape == (*expected["logits"].shape, 1)  # one tick
    torch.testing.assert_close(predictions[..., 0], expected["logits"], atol=ATOL, rtol=0)
    entropy = normalised_entropy(expected["logits"])
    torch.testing.assert_close(
        certainties[..., 0], torch.stack((entropy, 1 - entropy), -1), atol=ATOL, rtol=0
    )


def test_certainty_follows_the_prediction_shape():
    model = FFBaseline(FFConfig(d_model=8, out_dims=10, prediction_reshaper=[2, 5])).eval()
    with torch.no_grad():
        predictions, certainties, _ = model(torch.randn(3, 3, 8, 8))
    per_step = normalised_entropy(predictions[..., 0].reshape(3, 2, 5))
    torch.testing.assert_close(certainties[:, 1, 0], 1 - per_step)


def test_its_one_tick_makes_the_classification_loss_the_references_cross_entropy():
    model = FFBaseline(FFConfig(d_model=8)).eval()
    targets = torch.tensor([1, 7, 3])
    with torch.no_grad():
        predictions, certainties, _ = model(torch.randn(3, 3, 8, 8))
    loss, tick = image_classification_loss(predictions, certainties, targets)
    assert tick.tolist() == [0, 0, 0]
    torch.testing.assert_close(loss, F.cross_entropy(predictions[..., 0], targets))


def test_reference_checkpoint_loads_and_is_called_as_the_reference():
    model = load_reference_checkpoint(CHECKPOINT)
    assert isinstance(model, ReferenceFFBaseline) and not model.training
    assert (model.cfg.backbone_type, model.cfg.d_model, model.cfg.dropout) == (
        "resnet18-1",
        24,
        0.1,
    )
    expected = torch.load(str(CHECKPOINT).replace(".pt", ".expected.pt"), weights_only=True)
    with torch.no_grad():
        logits = model(expected["inputs"])
        torch.testing.assert_close(logits, expected["predictions"], atol=ATOL, rtol=0)
        # ctm_dist.load gives the same weights with the interface of the other kinds
        loaded = ctm_dist.load(str(CHECKPOINT))
        assert type(loaded) is FFBaseline
        predictions, _, _ = loaded(expected["inputs"])
    torch.testing.assert_close(predictions[..., 0], expected["predictions"], atol=ATOL, rtol=0)


def test_reference_checkpoint_with_a_non_resnet_backbone_name_builds_resnet18_4(tmp_path):
    # the reference's FFBaseline builds all four ResNet-18 stages for such a name
    checkpoint = torch.load(CHECKPOINT, weights_only=False)
    reference = load_reference_checkpoint(CHECKPOINT)
    wide = FFBaseline(FFConfig(d_model=24, backbone_type="resnet18-4"))
    checkpoint["model_state_dict"] = wide.state_dict()
    checkpoint["args"].backbone_type = "none"
    path = tmp_path / "ff.pt"
    torch.save(checkpoint, path)
    assert load_reference_checkpoint(path).cfg.backbone_type == "resnet18-4"
    checkpoint["model_state_dict"] = reference.state_dict()  # resnet18-1 weights: do not fit
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="weights do not fit the ReferenceFFBaseline"):
        load_reference_checkpoint(path)


@pytest.mark.parametrize(
    "dataset, out_dims, reshaper",
    [("cifar10", 10, [-1]), ("mazes-small", 20, [4, 5])],
)
def test_export_in_the_reference_format_round_trips(tmp_path, dataset, out_dims, reshaper):
    """Reverse export: the args a reference ``--model ff`` run saves (the maze route length
    included), which load back into the reference-called FF with the same logits."""
    torch.manual_seed(0)
    cfg = FFConfig(d_model=8, out_dims=out_dims, prediction_reshaper=reshaper, dropout=0.1)
    model = FFBaseline(cfg).eval()
    path = tmp_path / "ff.pt"
    export_reference_checkpoint(model, path, dataset=dataset)
    loaded = load_reference_checkpoint(path)
    assert isinstance(loaded, ReferenceFFBaseline) and loaded.cfg == cfg
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = torch.load(path, weights_only=True)["args"]
    assert (args.model, args.dataset, args.d_model) == ("ff", dataset, 8)
    if dataset == "mazes-small":
        assert args.maze_route_length == 4
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.logits(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs the dataset"):
        export_reference_checkpoint(model, tmp_path / "x.pt")


@pytest.mark.parametrize("task", ["imagenet", "cifar10", "demo", "mazes"])
def test_presets_mirror_the_ctm_backbone_and_width(task):
    ff, ctm = model_config("ff", task), model_config("ctm", task)
    assert kind_of(ff) == "ff" and isinstance(build_model(ff.replace(d_model=4)), FFBaseline)
    for name in ("backbone_type", "d_model", "out_dims", "prediction_reshaper"):
        assert getattr(ff, name) == getattr(ctm, name), name
    assert config_from_fields(ff.to_dict()) == ff  # a saved config comes back as the FF's


def test_task_configs_give_the_output_the_data_decides():
    assert model_config("ff", "mazes-small", route_length=6).prediction_reshaper == [6, 5]
    # the demo's launcher default (tick checkpointing) is the CTM's; the FF takes the rest
    cfg = get_task("demo").config_for("demo", {"tick_checkpointing": 4, "d_model": 8}, "ff")
    assert cfg.d_model == 8


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(backbone_type="shallow-wide"), "backbone_type must be a ResNet"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(out_dims=10, prediction_reshaper=[3, 5]), "does not fit prediction_reshaper"),
    ],
)
def test_bad_config_is_one_line(change, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        FFConfig(**change)
    assert "\n" not in str(error.value) and str(error.value).startswith("FFConfig: ")


def test_training_config_names_what_the_ff_kind_lacks(tmp_path):
    overrides = [f"run.local_dir={tmp_path}", "data.task=demo", "model.kind=ff"]
    with pytest.raises(ConfigError, match="ff preset 'parity'.*no FF preset"):
        build_config(None, [*overrides, "model.preset=parity"])
    with pytest.raises(ConfigError, match=r"unknown FFConfig fields \['iterations'\]"):
        build_config(None, [*overrides, "model.iterations=4"])
    assert build_config(None, [*overrides, "model.dropout=0.1"]).model.kind == "ff"


def test_tools_that_follow_ticks_refuse_it_in_one_line(tmp_path, capsys):
    from ctm_dist.eval.cli import visualize_main
    from ctm_dist.eval.export import save_consolidated

    save_consolidated(FFBaseline(FFConfig(d_model=4)), str(tmp_path / "export"), task="demo")
    assert visualize_main([os.fspath(tmp_path / "export"), "--out", str(tmp_path / "p")]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        error.startswith("error: visualize follows a model's internal ticks") and "\n" not in error
    )
