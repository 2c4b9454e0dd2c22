"""Reference checkpoints in and out (ctm_dist.compat).

The fixtures ``tests/fixtures/reference_tiny_*.pt`` were written by the reference's own code
(``tests/fixtures/make_reference_checkpoint.py --reference DIR``), together with that code's
outputs on a fixed input (``*.expected.pt``); these tests do not need the reference.
"""

import argparse
import io
import os
import pickle

import pytest
import torch

from ctm_dist.compat import (
    CheckpointError,
    config_from_reference_args,
    export_reference_checkpoint,
    load_reference_checkpoint,
    read_reference_checkpoint,
)
from ctm_dist.model import CTM, CTMConfig, LSTMBaseline, LSTMConfig, SortCTM

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def fixture(name):
    return os.path.join(FIXTURES, f"reference_tiny_{name}.pt")


def expected(name):
    return torch.load(
        os.path.join(FIXTURES, f"reference_tiny_{name}.expected.pt"), weights_only=True
    )


def run(model, inputs):
    with torch.no_grad():
        return model(inputs)


@pytest.mark.parametrize("name", ["cifar10", "parity", "sort"])
def test_reference_checkpoint_gives_reference_outputs(name):
    model = load_reference_checkpoint(fixture(name))
    assert not model.training
    want = expected(name)
    predictions, certainties, synch_out = run(model, want["inputs"])
    torch.testing.assert_close(predictions, want["predictions"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(certainties, want["certainties"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(synch_out, want["synch_out"], atol=1e-5, rtol=1e-4)


def test_task_shapes_and_options_are_derived_like_the_reference():
    cifar = load_reference_checkpoint(fixture("cifar10")).cfg
    assert (cifar.out_dims, cifar.prediction_reshaper) == (10, [-1])
    assert (cifar.backbone_type, cifar.synapse_depth, cifar.n_random_pairing_self) == (
        "resnet18-1",
        2,
        2,
    )
    assert cifar.dropout == pytest.approx(0.1) and cifar.in_channels == 3
    parity = load_reference_checkpoint(fixture("parity")).cfg
    assert (parity.out_dims, parity.prediction_reshaper) == (32, [16, 2])
    assert (parity.neuron_select_type, parity.positional_embedding_type) == (
        "random",
        "custom-rotational-1d",
    )
    assert parity.deep_nlms is True and parity.do_layernorm_nlm is False


def test_neuron_index_buffers_come_from_the_checkpoint():
    state = read_reference_checkpoint(fixture("parity"))["model_state_dict"]
    model = load_reference_checkpoint(fixture("parity"))
    for key in (
        "out_neuron_indices_left",
        "out_neuron_indices_right",
        "action_neuron_indices_left",
        "action_neuron_indices_right",
    ):
        assert torch.equal(getattr(model, key), state[key])


def test_loads_from_an_open_file():
    with open(fixture("parity"), "rb") as handle:
        data = io.BytesIO(handle.read())
    model = load_reference_checkpoint(data)
    want = expected("parity")
    torch.testing.assert_close(
        run(model, want["inputs"])[0], want["predictions"], atol=1e-5, rtol=1e-4
    )


def test_loads_the_legacy_non_zip_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(
        read_reference_checkpoint(fixture("parity")), path, _use_new_zipfile_serialization=False
    )
    model = load_reference_checkpoint(path)
    want = expected("parity")
    torch.testing.assert_close(
        run(model, want["inputs"])[0], want["predictions"], atol=1e-5, rtol=1e-4
    )


# --- export --------------------------------------------------------------------------------------


def _tiny(**changes):
    values = dict(
        iterations=3,
        d_model=16,
        d_input=8,
        heads=2,
        n_synch_out=4,
        n_synch_action=4,
        synapse_depth=1,
        memory_length=3,
        memory_hidden_dims=2,
        backbone_type="resnet18-1",
        out_dims=10,
        prediction_reshaper=[-1],
    )
    values.update(changes)
    return CTMConfig(**values)


ROUND_TRIPS = {
    "cifar10": (_tiny(neuron_select_type="first-last", deep_nlms=False), torch.randn(2, 3, 12, 12)),
    "demo": (
        _tiny(in_channels=1, positional_embedding_type="learnable-fourier"),
        torch.randn(2, 1, 12, 12),
    ),
    "mazes-small": (
        _tiny(
            out_dims=20, prediction_reshaper=[4, 5], neuron_select_type="random", synapse_depth=2
        ),
        torch.randn(2, 3, 12, 12),
    ),
    "parity": (
        _tiny(
            out_dims=18,
            prediction_reshaper=[9, 2],
            backbone_type="parity_backbone",
            positional_embedding_type="custom-rotational-1d",
        ),
        torch.randint(0, 2, (2, 9)).float() * 2 - 1,
    ),
}


@pytest.mark.parametrize("dataset", sorted(ROUND_TRIPS))
def test_export_then_load_gives_the_same_model(tmp_path, dataset):
    torch.manual_seed(0)
    cfg, inputs = ROUND_TRIPS[dataset]
    model = CTM(cfg).eval()
    with torch.no_grad():  # move weights and BN statistics off their initial values
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "out" / "checkpoint.pt"
    export_reference_checkpoint(
        model, path, dataset=dataset, extra_args={"iteration": 7, "log_dir": "logs/x"}
    )
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary left behind

    # The reference's own format: plain torch.load with only argparse.Namespace allowed.
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, weights_only=True)
    args = raw["args"]
    assert (args.model, args.model_type, args.dataset, args.out_dims) == (
        "ctm",
        "ctm",
        dataset,
        cfg.out_dims,
    )
    assert (args.deep_memory, args.do_normalisation) == (cfg.deep_nlms, cfg.do_layernorm_nlm)
    assert args.iteration == 7 and args.log_dir == "logs/x"
    if dataset == "mazes-small":
        assert args.maze_route_length == 4
    if dataset == "parity":
        assert args.parity_sequence_length == 9
    assert set(raw["model_state_dict"]) == set(model.state_dict())

    loaded = load_reference_checkpoint(path)
    assert loaded.cfg.in_channels == cfg.in_channels
    assert loaded.cfg.prediction_reshaper == cfg.prediction_reshaper
    for got, want in zip(run(loaded, inputs), run(model, inputs)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "dataset, changes, inputs",
    [
        ("parity", {}, torch.randint(0, 2, (2, 16)).float() * 2 - 1),
        (
            "cifar10",
            dict(
                backbone_type="resnet18-1",
                positional_embedding_type="none",
                out_dims=10,
                prediction_reshaper=[-1],
                num_layers=2,
            ),
            torch.randn(2, 3, 12, 12),
        ),
    ],
)
def test_lstm_export_then_load_gives_the_same_model(tmp_path, dataset, changes, inputs):
    """Reverse export of the LSTM baseline: the args a reference script run with ``--model lstm``
    saves, which load back (told apart from a CTM by them) into the same outputs."""
    torch.manual_seed(0)
    values = dict(iterations=4, d_model=20, d_input=8, heads=2, out_dims=32)
    cfg = LSTMConfig(**{**values, "prediction_reshaper": [16, 2], **changes})
    model = LSTMBaseline(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path / "lstm.pt"
    export_reference_checkpoint(model, path, dataset=dataset)
    with torch.serialization.safe_globals([argparse.Namespace]):
        args = torch.load(path, weights_only=True)["args"]
    assert (args.model, args.model_type, args.dataset) == ("lstm", "lstm", dataset)
    assert args.num_layers == cfg.num_layers
    if dataset == "parity":
        assert args.parity_sequence_length == 16
    loaded = load_reference_checkpoint(path)
    assert isinstance(loaded, LSTMBaseline) and loaded.cfg == cfg
    for got, want in zip(run(loaded, inputs), run(model, inputs)):
        if want is not None:
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs the dataset"):
        export_reference_checkpoint(model, tmp_path / "x.pt")


def test_export_refuses_a_dataset_that_does_not_fit(tmp_path):
    model = CTM(_tiny())
    with pytest.raises(ValueError, match="expects out_dims=18"):
        export_reference_checkpoint(
            model, tmp_path / "x.pt", dataset="parity", extra_args={"parity_sequence_length": 9}
        )
    with pytest.raises(CheckpointError, match="unknown dataset"):
        export_reference_checkpoint(model, tmp_path / "x.pt", dataset="svhn")
    assert not any(tmp_path.iterdir())


def test_export_unwraps_wrappers_and_widens_to_float32(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = CTM(_tiny()).to(torch.bfloat16)
    export_reference_checkpoint(Wrapper(model), tmp_path / "w.pt", dataset="cifar10")
    state = read_reference_checkpoint(tmp_path / "w.pt")["model_state_dict"]
    assert set(state) == set(model.state_dict())
    assert state["start_trace"].dtype == torch.float32  # the reference's weights are float32
    assert state["out_neuron_indices_left"].dtype == model.out_neuron_indices_left.dtype
    with pytest.raises(TypeError, match="expected a ctm_dist CTM"):
        export_reference_checkpoint(torch.nn.Linear(2, 2), tmp_path / "l.pt", dataset="cifar10")


# --- bad input -----------------------------------------------------------------------------------


def _reference_checkpoint():
    return read_reference_checkpoint(fixture("parity"))


def _save(tmp_path, checkpoint, name="bad.pt"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_reference_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_reference_checkpoint(tmp_path)


def test_not_a_torch_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_reference_checkpoint(text)
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"model_state_dict": {}}))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_reference_checkpoint(plain_pickle)
    truncated = tmp_path / "truncated.pt"
    with open(fixture("parity"), "rb") as handle:
        truncated.write_bytes(handle.read()[:20000])
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_reference_checkpoint(truncated)


class _MakesADirectory:
    """Unpickling this would call os.makedirs: code a weights-only load must refuse to run."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = _reference_checkpoint()
    checkpoint["extra"] = _MakesADirectory(str(marker))
    path = _save(tmp_path, checkpoint)
    with pytest.raises(CheckpointError, match="refused to load") as err:
        load_reference_checkpoint(path)
    assert "os.makedirs" in str(err.value)
    assert not marker.exists()


def test_missing_parts_and_keys(tmp_path):
    checkpoint = _reference_checkpoint()
    del checkpoint["args"]
    with pytest.raises(CheckpointError, match=r"lacks \['args'\]"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))

    checkpoint = _reference_checkpoint()
    del checkpoint["model_state_dict"]["decay_params_out"]
    with pytest.raises(CheckpointError, match=r"missing keys \[decay_params_out\]"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))

    checkpoint = _reference_checkpoint()
    checkpoint["model_state_dict"]["surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[surprise.weight\]"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))

    checkpoint = _reference_checkpoint()
    del checkpoint["args"].d_model
    with pytest.raises(CheckpointError, match="d_model"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))


def test_unknown_dataset_and_other_models(tmp_path):
    checkpoint = _reference_checkpoint()
    checkpoint["args"].dataset = "qamnist"
    with pytest.raises(CheckpointError, match="unknown dataset 'qamnist'"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))
    checkpoint = _reference_checkpoint()
    checkpoint["args"].model_type = "gru"
    with pytest.raises(CheckpointError, match="'gru' model, not a CTM"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))
    checkpoint = _reference_checkpoint()
    checkpoint["args"].model_type = "ff"  # CTM weights under FF args
    with pytest.raises(
        CheckpointError, match="weights do not fit the ReferenceFFBaseline its args describe"
    ):
        load_reference_checkpoint(_save(tmp_path, checkpoint))
    checkpoint = _reference_checkpoint()
    checkpoint["args"].model_type = "lstm"  # CTM weights under LSTM args
    with pytest.raises(
        CheckpointError, match="weights do not fit the LSTMBaseline its args describe"
    ):
        load_reference_checkpoint(_save(tmp_path, checkpoint))


def test_shape_mismatch(tmp_path):
    checkpoint = _reference_checkpoint()
    checkpoint["args"].parity_sequence_length = 25  # out_dims 50 instead of the saved 32
    del checkpoint["args"].out_dims
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch \[output_projector.0.weight: checkpoint \(32, 21\) vs model \(50, 21\)",
    ):
        load_reference_checkpoint(_save(tmp_path, checkpoint))
    checkpoint = _reference_checkpoint()
    checkpoint["args"].parity_sequence_length = 25  # contradicts the saved out_dims
    with pytest.raises(CheckpointError, match="out_dims=32 does not match"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))


def test_legacy_args_map_like_the_reference_analysis_scripts():
    args = argparse.Namespace(
        model="ctm",
        dataset="mazes-medium",
        maze_route_length=10,
        iterations=4,
        d_model=64,
        d_input=16,
        heads=2,
        n_synch_out=8,
        n_synch_action=8,
        synapse_depth=1,
        memory_length=5,
        deep_memory=True,
        memory_hidden_dims=4,
        do_normalisation=False,
        resnet_type="resnet34",
        resnet_feature_scales=[1, 2],
        positional_embedding_type="none",
    )
    cfg = config_from_reference_args(args)
    assert cfg.backbone_type == "resnet34-2"
    assert cfg.neuron_select_type == "first-last" and cfg.n_random_pairing_self == 0
    assert (cfg.out_dims, cfg.prediction_reshaper) == (50, [10, 5])


def test_reference_lstm_parity_checkpoint_gives_reference_outputs():
    """A checkpoint of the reference's parity script with ``--model_type lstm`` loads as our
    LSTM baseline, called as the reference's (``m(x)`` -> predictions, certainties, None)."""
    model = load_reference_checkpoint(fixture("lstm_parity"))
    assert isinstance(model, LSTMBaseline) and not model.training
    assert (model.cfg.d_model, model.cfg.num_layers, model.cfg.iterations) == (20, 1, 5)
    assert (model.cfg.out_dims, model.cfg.prediction_reshaper) == (32, [16, 2])
    want = expected("lstm_parity")
    predictions, certainties, synch = run(model, want["inputs"])
    assert synch is None
    torch.testing.assert_close(predictions, want["predictions"], atol=1e-5, rtol=0)
    torch.testing.assert_close(certainties, want["certainties"], atol=1e-5, rtol=0)


def test_reference_lstm_checkpoint_with_other_weights_is_one_line(tmp_path):
    checkpoint = read_reference_checkpoint(fixture("lstm_parity"))
    checkpoint["args"].d_model = 24
    path = tmp_path / "lstm.pt"
    torch.save(
        {"args": checkpoint["args"], "model_state_dict": checkpoint["model_state_dict"]}, path
    )
    with pytest.raises(
        CheckpointError, match="do not fit the LSTMBaseline its args describe"
    ) as error:
        load_reference_checkpoint(path)
    assert "\n" not in str(error.value)


# --- the sort variant ------------------------------------------------------------------------------


def test_sort_run_is_told_by_N_to_sort_and_built_as_the_sort_script_builds_it():
    args = read_reference_checkpoint(fixture("sort"))["args"]
    assert not hasattr(args, "dataset") and args.N_to_sort == 6
    assert (args.heads, args.n_synch_action, args.d_input) == (4, 32, 128)  # saved, unused
    model = load_reference_checkpoint(fixture("sort"))
    assert type(model) is SortCTM and not model.training
    cfg = model.cfg
    assert (cfg.variant, cfg.d_input, cfg.out_dims, cfg.heads, cfg.n_synch_action) == (
        "sort",
        6,
        7,
        0,
        0,
    )
    assert (cfg.synapse_depth, cfg.n_random_pairing_self, cfg.memory_hidden_dims) == (3, 2, 3)


def test_sort_export_writes_the_sort_script_format_and_round_trips(tmp_path):
    source = read_reference_checkpoint(fixture("sort"))
    model = load_reference_checkpoint(fixture("sort"))
    path = tmp_path / "sort.pt"
    export_reference_checkpoint(model, path, extra_args={"iteration": 3})
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, weights_only=True)
    args = raw["args"]
    assert not hasattr(args, "dataset") and args.iteration == 3
    assert (args.N_to_sort, args.out_dims, args.backbone_type) == (6, 7, "none")
    # what the reference's script reads to build its model is what it saved
    for name in ("iterations", "d_model", "n_synch_out", "synapse_depth", "memory_length"):
        assert getattr(args, name) == getattr(source["args"], name), name
    assert (args.deep_memory, args.neuron_select_type) == (True, "random-pairing")
    want = source["model_state_dict"]
    assert set(raw["model_state_dict"]) == set(want)
    for key, value in want.items():
        assert torch.equal(raw["model_state_dict"][key], value), key
    inputs = expected("sort")["inputs"]
    for got, ref in zip(run(load_reference_checkpoint(path), inputs), run(model, inputs)):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not trained on dataset 'cifar10'"):
        export_reference_checkpoint(model, tmp_path / "x.pt", dataset="cifar10")


def test_sort_args_that_contradict_themselves_are_refused(tmp_path):
    checkpoint = read_reference_checkpoint(fixture("sort"))
    checkpoint["args"].out_dims = 9
    with pytest.raises(CheckpointError, match="out_dims=9 does not match N_to_sort=6"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))
    checkpoint = read_reference_checkpoint(fixture("sort"))
    checkpoint["args"].N_to_sort = 5
    del checkpoint["args"].out_dims
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))
    checkpoint = read_reference_checkpoint(fixture("sort"))
    del checkpoint["args"].memory_length
    with pytest.raises(CheckpointError, match="not a checkpoint of the reference's sort script"):
        load_reference_checkpoint(_save(tmp_path, checkpoint))


def test_a_reference_sort_checkpoint_evaluates_offline():
    from ctm_dist.eval.cli import format_summary
    from ctm_dist.eval.evaluate import EvalRequest, evaluate

    req = EvalRequest(checkpoint=fixture("sort"), task="sort", parity_samples=96, batch_size=32)
    report = evaluate(req)
    sort = report["sort"]
    assert (sort["samples"], sort["length"], sort["chance_accuracy"]) == (96, 6, 1 / 6)
    assert len(sort["accuracy_per_position"]) == 6
    assert sort["accuracy"] == pytest.approx(sum(sort["accuracy_per_position"]) / 6)
    assert "sort 96: accuracy per position" in format_summary(report)
