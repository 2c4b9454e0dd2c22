"""Write the golden fixtures of the baselines: reference LSTM and FF outputs for small configurations.

    python tests/golden/generate_baselines.py --reference /path/to/continuous-thought-machines
    python tests/golden/generate_baselines.py --reference ... --models ff   # only the FF cases

The sibling of ``generate.py`` for ``models/lstm.py`` and ``models/ff.py`` of the reference
(imported from the given checkout at run time; nothing of it is stored here). Each case in
``CASES`` (LSTM) and ``FF_CASES`` is built with the reference's constructor, its lazy layers
materialised, its weights rounded to bfloat16, and run in eval mode (the LSTM with tracking);
``tests/golden/baselines/<case>.safetensors`` holds the weights (``model.*``), the input and the
outputs, with the constructor's arguments (and the input channels) in the metadata.
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

HERE = Path(__file__).resolve().parent / "baselines"

# name -> (reference constructor arguments, input shape)
CASES = {
    # tasks/parity/scripts/train_lstm_*.sh, scaled down (the parity script builds one layer)
    "lstm_parity": (
        dict(
            iterations=5,
            d_model=12,
            d_input=8,
            heads=2,
            backbone_type="parity_backbone",
            num_layers=1,
            positional_embedding_type="custom-rotational-1d",
            out_dims=12,
            prediction_reshaper=[6, 2],
            dropout=0.0,
        ),
        (3, 6),
    ),
    "lstm_resnet_two_layers": (
        dict(
            iterations=4,
            d_model=10,
            d_input=8,
            heads=4,
            backbone_type="resnet18-1",
            num_layers=2,
            positional_embedding_type="learnable-fourier",
            out_dims=5,
            prediction_reshaper=[-1],
            dropout=0.0,
        ),
        (2, 1, 6, 6),
    ),
}


# name -> (reference FFBaseline arguments, input shape): a basic-block and a bottleneck ResNet,
# colour and grey inputs
FF_CASES = {
    "ff_resnet18_1": (
        dict(d_model=12, backbone_type="resnet18-1", out_dims=5, dropout=0.0),
        (2, 3, 16, 16),
    ),
    "ff_resnet50_1_gray": (
        dict(d_model=8, backbone_type="resnet50-1", out_dims=12, dropout=0.1),
        (3, 1, 12, 12),
    ),
}


def generate(reference: Path, seed: int = 4321) -> None:
    sys.path.insert(0, str(reference))
    from models.lstm import LSTMBaseline  # noqa: E402  (the user's reference checkout)

    HERE.mkdir(exist_ok=True)
    for index, (name, (config, shape)) in enumerate(CASES.items()):
        case_seed = seed + index
        generator = torch.Generator().manual_seed(case_seed)
        x = make_input(config, shape, generator)
        model = built_reference(lambda: LSTMBaseline(**config), case_seed, x)
        randomise(model, generator)  # the LSTM has no decays: weights and batch-norm statistics
        with torch.no_grad():
            predictions, certainties, _, _, hidden, attention = model(x, track=True)
        tensors = {
            **bf16_weights(model),
            "input": x,
            "predictions": predictions,
            "certainties": certainties,
            "hidden_states": torch.from_numpy(hidden),
            "attention": torch.from_numpy(attention),
        }
        in_channels = shape[1] if len(shape) == 4 else 3
        metadata = {"config": json.dumps({**config, "in_channels": in_channels})}
        save_fixture(tensors, metadata, HERE / f"{name}.safetensors")


def generate_ff(reference: Path, seed: int = 4321) -> None:
    sys.path.insert(0, str(reference))
    from models.ff import FFBaseline  # noqa: E402  (the user's reference checkout)

    HERE.mkdir(exist_ok=True)
    for index, (name, (config, shape)) in enumerate(FF_CASES.items()):
        case_seed = seed + 100 + index
        generator = torch.Generator().manual_seed(case_seed)
        x = torch.randn(shape, generator=generator)
        model = built_reference(lambda: FFBaseline(**config), case_seed, x)
        randomise(model, generator)
        with torch.no_grad():
            logits = model(x)
        tensors = {**bf16_weights(model), "input": x, "logits": logits}
        metadata = {"config": json.dumps({**config, "in_channels": shape[1]})}
        save_fixture(tensors, metadata, HERE / f"{name}.safetensors")


GENERATORS = {"lstm": generate, "ff": generate_ff}


def main() -> None:
    parser = reference_parser(__doc__, seed=4321)
    parser.add_argument("--models", nargs="+", choices=sorted(GENERATORS), default=list(GENERATORS))
    args = parser.parse_args()
    for model in args.models:
        GENERATORS[model](args.reference.resolve(), args.seed)


if __name__ == "__main__":
    main()
