"""Write the golden fixtures: reference CTM outputs for small configurations.

    python tests/golden/generate.py --reference /path/to/continuous-thought-machines

Imports the reference model from the given checkout at run time (nothing of it is stored here),
builds each case in ``CASES`` (and the sort variant's, ``SORT_CASES``, into ``tests/golden/sort/``), rounds every weight to bfloat16 (so the fixtures can store them at
half size and still hold the exact values the reference ran with), randomises batch-norm
statistics and decays (some outside the [0, 15] clamp), runs the reference in eval mode with
tracking, and writes ``tests/golden/<case>.safetensors`` holding the weights (``model.*``, taken
before the reference's forward clamps the decays), the input, and the outputs; the config and
seed go in the metadata.

The QAMNIST cases (``QAMNIST_CASES``: the reference's QAMNIST CTM and its LSTM baseline, called
``m(x, z)``) go to ``tests/golden/qamnist/<case>.safetensors`` in the same way; ``--only`` picks
one family.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from reference_runs import (
    bf16_weights,
    built_reference,
    make_input,
    randomise,
    reference_parser,
    save_fixture,
)

from ctm_dist.model.config import OUR_FIELDS

HERE = Path(__file__).resolve().parent

_SMALL = dict(
    iterations=5,
    d_model=24,
    d_input=8,
    heads=2,
    memory_length=4,
    memory_hidden_dims=3,
    out_dims=6,
    prediction_reshaper=[-1],
    dropout=0.1,
    dropout_nlm=None,
    n_random_pairing_self=0,
    do_layernorm_nlm=False,
)

# name -> (config overrides, input shape)
CASES = {
    "resnet18-2_multifourier_pairing": (
        dict(
            backbone_type="resnet18-2",
            positional_embedding_type="multi-learnable-fourier",
            neuron_select_type="random-pairing",
            n_synch_out=10,
            n_synch_action=7,
            n_random_pairing_self=2,
            synapse_depth=1,
            deep_nlms=True,
        ),
        (2, 3, 12, 12),
    ),
    "resnet18-1_fourier_firstlast_unet_shallow": (
        dict(
            backbone_type="resnet18-1",
            positional_embedding_type="learnable-fourier",
            neuron_select_type="first-last",
            n_synch_out=5,
            n_synch_action=4,
            synapse_depth=3,
            deep_nlms=False,
            do_layernorm_nlm=True,
        ),
        (2, 3, 10, 10),
    ),
    "resnet18-1_rotational_random_unet_gray": (
        dict(
            backbone_type="resnet18-1",
            positional_embedding_type="custom-rotational",
            neuron_select_type="random",
            n_synch_out=5,
            n_synch_action=4,
            synapse_depth=2,
            deep_nlms=True,
            dropout_nlm=0.0,
            in_channels=1,
        ),
        (2, 1, 9, 9),
    ),
    "parity_rotational1d_random": (
        dict(
            backbone_type="parity_backbone",
            positional_embedding_type="custom-rotational-1d",
            neuron_select_type="random",
            n_synch_out=4,
            n_synch_action=4,
            synapse_depth=1,
            deep_nlms=True,
            out_dims=12,
            prediction_reshaper=[6, 2],
        ),
        (3, 6),
    ),
    "none_pairing_unet4_layernorm": (
        dict(
            backbone_type="none",
            positional_embedding_type="none",
            neuron_select_type="random-pairing",
            n_synch_out=6,
            n_synch_action=5,
            n_random_pairing_self=1,
            synapse_depth=4,
            deep_nlms=True,
            do_layernorm_nlm=True,
            in_channels=5,
            out_dims=4,
            prediction_reshaper=[2, 2],
        ),
        (2, 5, 7),
    ),
}


# The reference's sort variant (models/ctm_sort.py): name -> (config overrides, input shape).
# Its constructor takes heads, n_synch_action and the backbone but overrides them (0, 0, 'none');
# our config states that directly. d_input is the number of values to sort.
SORT_CASES = {
    "sort_pairing_unet4": (
        dict(
            neuron_select_type="random-pairing",
            n_synch_out=8,
            n_random_pairing_self=2,
            synapse_depth=4,
            deep_nlms=True,
            d_input=7,
            out_dims=8,
        ),
        (3, 7),
    ),
    "sort_firstlast_linear_shallow_layernorm": (
        dict(
            neuron_select_type="first-last",
            n_synch_out=5,
            synapse_depth=1,
            deep_nlms=False,
            do_layernorm_nlm=True,
            d_input=5,
            out_dims=6,
            iterations=8,
        ),
        (2, 5),
    ),
    "sort_random_unet2": (
        dict(
            neuron_select_type="random",
            n_synch_out=4,
            synapse_depth=2,
            deep_nlms=True,
            dropout_nlm=0.0,
            d_input=6,
            out_dims=7,
        ),
        (2, 6),
    ),
}
SORT_DIR = HERE / "sort"


def sort_case_config(name: str) -> dict:
    overrides, _ = SORT_CASES[name]
    return {
        **_SMALL,
        "variant": "sort",
        "heads": 0,
        "n_synch_action": 0,
        "backbone_type": "none",
        "positional_embedding_type": "none",
        **overrides,
    }


def case_config(name: str) -> dict:
    overrides, _ = CASES[name]
    return {**_SMALL, **overrides}


def generate(reference: Path, seed: int = 1234) -> None:
    sys.path.insert(0, str(reference))
    from models.ctm import ContinuousThoughtMachine  # noqa: E402  (the user's reference checkout)

    for index, name in enumerate(CASES):
        config = case_config(name)
        shape = CASES[name][1]
        case_seed = seed + index
        generator = torch.Generator().manual_seed(case_seed)
        x = make_input(config, shape, generator)
        ref_kwargs = {k: v for k, v in config.items() if k not in OUR_FIELDS}
        model = built_reference(lambda: ContinuousThoughtMachine(**ref_kwargs), case_seed, x)
        randomise(model, generator)
        weights = bf16_weights(model)
        with torch.no_grad():
            predictions, certainties, (sync_out, sync_action), pre, post, attention = model(
                x, track=True
            )
        tensors = {
            **weights,
            "input": x,
            "predictions": predictions,
            "certainties": certainties,
            "sync_out": torch.from_numpy(sync_out),
            "sync_action": torch.from_numpy(sync_action),
            "pre_activations": torch.from_numpy(pre),
            "post_activations": torch.from_numpy(post),
            "attention": torch.from_numpy(attention),
        }
        metadata = {"config": json.dumps(config), "numpy_seed": str(case_seed)}
        save_fixture(tensors, metadata, HERE / f"{name}.safetensors")


# name -> (model kind, config overrides, (batch, digits, question parts, image size))
QAMNIST_CASES = {
    "qamnist_ctm_random": (
        "ctm",
        dict(neuron_select_type="random", n_synch_out=4, n_synch_action=5, synapse_depth=1),
        (3, 2, 5, 8),
    ),
    "qamnist_ctm_firstlast_unet_layernorm": (
        "ctm",
        dict(
            neuron_select_type="first-last",
            n_synch_out=5,
            n_synch_action=4,
            synapse_depth=3,
            do_layernorm_nlm=True,
            deep_nlms=False,
        ),
        (2, 3, 3, 12),
    ),
    "qamnist_lstm": ("lstm", dict(), (3, 2, 5, 8)),
}
_QAMNIST_TICKS = dict(
    iterations_per_digit=2, iterations_per_question_part=2, iterations_for_answering=3
)


def qamnist_case_config(name: str) -> dict:
    kind, overrides, _ = QAMNIST_CASES[name]
    base = {k: v for k, v in _SMALL.items() if k != "dropout_nlm"}
    values = {**base, "out_dims": 10, "deep_nlms": True, **overrides}
    values.update(_QAMNIST_TICKS, kind=kind)
    if kind == "lstm":
        values = {
            k: values[k]
            for k in ("kind", "iterations", "d_model", "d_input", "heads", "out_dims")
            + tuple(_QAMNIST_TICKS)
        }
    return values


def make_question(
    batch: int, digits: int, parts: int, repeats: int, generator: torch.Generator
) -> torch.Tensor:
    """[B, parts * repeats]: index, operator, index, ... (operators -1 / -2), each repeated."""
    codes = torch.empty(batch, parts, dtype=torch.long)
    codes[:, 0::2] = torch.randint(0, digits, (batch, (parts + 1) // 2), generator=generator)
    codes[:, 1::2] = -torch.randint(1, 3, (batch, parts // 2), generator=generator)
    return codes.repeat_interleave(repeats, dim=1)


def generate_qamnist(reference: Path, seed: int) -> None:
    sys.path.insert(0, str(reference))
    from models.ctm_qamnist import ContinuousThoughtMachineQAMNIST  # noqa: E402
    from models.lstm_qamnist import LSTMBaseline  # noqa: E402

    out_dir = HERE / "qamnist"
    out_dir.mkdir(exist_ok=True)
    for index, name in enumerate(QAMNIST_CASES):
        config = qamnist_case_config(name)
        batch, digits, parts, size = QAMNIST_CASES[name][2]
        case_seed = seed + 100 + index
        generator = torch.Generator().manual_seed(case_seed)
        repeats = config["iterations_per_digit"]
        images = torch.randn(batch, digits, 1, size, size, generator=generator)
        x = images.repeat_interleave(repeats, dim=1)
        z = make_question(batch, digits, parts, config["iterations_per_question_part"], generator)
        ref_kwargs = {k: v for k, v in config.items() if k != "kind"}
        model_class = ContinuousThoughtMachineQAMNIST if config["kind"] == "ctm" else LSTMBaseline
        model = built_reference(lambda: model_class(**ref_kwargs), case_seed, x, z)
        randomise(model, generator)
        weights = bf16_weights(model)
        with torch.no_grad():
            predictions, certainties, sync_out, pre, post, attention, _ = model(x, z, track=True)
        tensors = {
            **weights,
            "input": x,
            "question": z,
            "predictions": predictions,
            "certainties": certainties,
            "pre_activations": torch.from_numpy(pre),
            "post_activations": torch.from_numpy(post),
            "attention": torch.from_numpy(attention),
        }
        if sync_out is not None:
            tensors["sync_out"] = sync_out
        metadata = {"config": json.dumps(config), "numpy_seed": str(case_seed)}
        save_fixture(tensors, metadata, out_dir / f"{name}.safetensors")


def generate_sort(reference: Path, seed: int = 4321) -> None:
    """The sort variant's cases, in ``tests/golden/sort/`` (tracking has no action side)."""
    sys.path.insert(0, str(reference))
    from models.ctm_sort import ContinuousThoughtMachineSORT  # noqa: E402

    SORT_DIR.mkdir(exist_ok=True)
    for index, name in enumerate(SORT_CASES):
        config = sort_case_config(name)
        shape = SORT_CASES[name][1]
        case_seed = seed + index
        generator = torch.Generator().manual_seed(case_seed)
        x = torch.randn(shape, generator=generator)
        ref_kwargs = {k: v for k, v in config.items() if k not in OUR_FIELDS}
        model = built_reference(lambda: ContinuousThoughtMachineSORT(**ref_kwargs), case_seed, x)
        randomise(model, generator)
        weights = bf16_weights(model)
        with torch.no_grad():
            predictions, certainties, sync_out, pre, post, _ = model(x, track=True)
        tensors = {
            **weights,
            "input": x,
            "predictions": predictions,
            "certainties": certainties,
            "sync_out": torch.from_numpy(sync_out),
            "pre_activations": torch.from_numpy(pre),
            "post_activations": torch.from_numpy(post),
        }
        metadata = {"config": json.dumps(config), "numpy_seed": str(case_seed)}
        save_fixture(tensors, metadata, SORT_DIR / f"{name}.safetensors")


def generate_ctc(reference: Path, seed: int = 99) -> None:
    """The reference's sort loss and decoding (as its curves use it) on random logits."""
    sys.path.insert(0, str(reference))
    from tasks.sort.utils import decode_predictions  # noqa: E402
    from utils.losses import sort_loss  # noqa: E402

    generator = torch.Generator().manual_seed(seed)
    batch, length, ticks = 64, 5, 9
    targets = torch.stack([torch.randperm(length, generator=generator) for _ in range(batch)])
    # peaked logits: mostly the target order spread over the ticks, with blanks, repeats, errors
    logits = torch.randn(batch, length + 1, ticks, generator=generator)
    for b in range(batch):
        for t in range(ticks):
            choice = int(torch.randint(0, length + 1, (1,), generator=generator))
            if t % 2 == 0 and t // 2 < length and torch.rand(1, generator=generator) < 0.8:
                choice = int(targets[b, t // 2])
            logits[b, choice, t] += 4.0
    loss = sort_loss(logits, targets)
    decoded = [d[:length] for d in decode_predictions(logits, length)]
    decoded = torch.stack(
        [
            torch.cat((d, torch.full((length - len(d),), length))) if len(d) < length else d
            for d in decoded
        ]
    ).long()
    save_fixture(
        {"logits": logits, "targets": targets, "loss": loss.reshape(1), "decoded": decoded},
        None,
        SORT_DIR / "ctc_loss_and_decoding.safetensors",
    )


def main() -> None:
    parser = reference_parser(__doc__, seed=1234)
    parser.add_argument(
        "--only",
        choices=("ctm", "qamnist", "sort"),
        help="write one family of fixtures (default: all)",
    )
    args = parser.parse_args()
    if args.only in (None, "ctm"):
        generate(args.reference.resolve(), args.seed)
    if args.only in (None, "qamnist"):
        generate_qamnist(args.reference.resolve(), args.seed)
    if args.only in (None, "sort"):
        generate_sort(args.reference.resolve())
        generate_ctc(args.reference.resolve())


if __name__ == "__main__":
    main()
