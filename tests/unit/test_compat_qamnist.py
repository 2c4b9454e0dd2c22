"""Reference Q&A MNIST checkpoints in and out (ctm_dist.compat, ctm_dist.compat_qamnist).

The fixtures ``tests/fixtures/reference_tiny_qamnist*.pt`` were written by the reference's own
code (``tests/fixtures/make_reference_checkpoint.py --reference DIR --only qamnist qamnist_lstm``),
with that code's outputs on a fixed ``(x, z)`` (``*.expected.pt``).
"""

import argparse
import os

import pytest
import torch

from ctm_dist.compat import (
    CheckpointError,
    config_from_reference_args,
    export_reference_checkpoint,
    load_reference_checkpoint,
    read_reference_checkpoint,
)
from ctm_dist.compat_qamnist import is_qamnist_args, qamnist_config_from_reference_args
from ctm_dist.model.qamnist import QAMNISTCTM, QAMNISTLSTM, build_qamnist_model, qamnist_config

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
CASES = {"qamnist": QAMNISTCTM, "qamnist_lstm": QAMNISTLSTM}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fixture(name):
    return os.path.join(FIXTURES, f"reference_tiny_{name}.pt")


def expected(name):
    return torch.load(
        os.path.join(FIXTURES, f"reference_tiny_{name}.expected.pt"), weights_only=True
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_checkpoint_gives_reference_outputs(name):
    args = read_reference_checkpoint(fixture(name))["args"]
    assert not hasattr(args, "dataset") and is_qamnist_args(args)
    model = load_reference_checkpoint(fixture(name))
    assert type(model) is CASES[name] and not model.training
    want = expected(name)
    with torch.no_grad():
        predictions, certainties, synch_out = model(want["inputs"], want["question"])
    torch.testing.assert_close(predictions, want["predictions"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(certainties, want["certainties"], atol=1e-5, rtol=1e-4)
    if "synch_out" in want:
        torch.testing.assert_close(synch_out, want["synch_out"], atol=1e-5, rtol=1e-4)
    cfg = model.qcfg
    assert (cfg.iterations_per_digit, cfg.iterations_for_answering, cfg.out_dims) == (2, 3, 10)
    assert (cfg.num_digits, cfg.num_digits_delta, cfg.num_operations) == (3, 2, 3)  # q_num_*


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_then_load_gives_the_same_model(tmp_path, name):
    model = load_reference_checkpoint(fixture(name))
    path = tmp_path / "exported.pt"
    model.qcfg.num_operations = 4  # the curriculum is saved as the reference's q_num_* options
    export_reference_checkpoint(model, path, "qamnist")
    args = read_reference_checkpoint(path)["args"]
    assert not hasattr(args, "dataset")
    assert (args.model_type, args.q_num_repeats_per_input, args.q_num_answer_steps) == (
        model.qcfg.kind,
        2,
        3,
    )
    assert (args.q_num_operations, args.q_num_images_delta) == (4, 2)
    again = load_reference_checkpoint(path)
    assert again.qcfg == model.qcfg
    want = expected(name)
    with torch.no_grad():
        a = model(want["inputs"], want["question"])[0]
        b = again(want["inputs"], want["question"])[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_export_needs_the_qamnist_dataset_name_and_equal_repeats(tmp_path):
    model = load_reference_checkpoint(fixture("qamnist"))
    with pytest.raises(ValueError, match="qamnist"):
        export_reference_checkpoint(model, tmp_path / "a.pt", "cifar10")
    uneven = build_qamnist_model(
        qamnist_config(
            d_model=16,
            d_input=8,
            n_synch_out=4,
            n_synch_action=4,
            iterations_per_digit=2,
            iterations_per_question_part=3,
        )
    )
    with pytest.raises(ValueError, match="q_num_repeats_per_input"):
        export_reference_checkpoint(uneven, tmp_path / "b.pt", "qamnist")
    assert not os.path.exists(tmp_path / "b.pt")


def test_bad_qamnist_args_give_one_clear_error():
    args = argparse.Namespace(q_num_images=3, model_type="ctm", d_model=8)
    with pytest.raises(CheckpointError, match="lack .*q_num_repeats_per_input"):
        qamnist_config_from_reference_args(args)
    with pytest.raises(CheckpointError, match="q_num_"):
        config_from_reference_args(args)
    with pytest.raises(CheckpointError, match="'gru'"):
        qamnist_config_from_reference_args(argparse.Namespace(q_num_images=3, model_type="gru"))


def test_weights_of_another_shape_are_refused(tmp_path):
    checkpoint = read_reference_checkpoint(fixture("qamnist"))
    checkpoint["args"].d_input = 16
    path = tmp_path / "wrong.pt"
    torch.save(
        {"args": checkpoint["args"], "model_state_dict": checkpoint["model_state_dict"]}, path
    )
    with pytest.raises(CheckpointError, match="QAMNISTCTM .*shape mismatch"):
        load_reference_checkpoint(path)
