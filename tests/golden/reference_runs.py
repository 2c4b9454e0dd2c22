"""What the golden-fixture scripts (``generate*.py`` here) do alike with a reference model.

They build a reference module with fixed seeds (its prints silenced), materialise its lazy
layers with one eval-mode pass, round its weights to bfloat16 and make its batch-norm
statistics (and CTM decays and temperatures) non-trivial, then store the weights (``model.*``)
with the inputs and outputs in a safetensors file. Imported by the scripts as a sibling module.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

GOLDEN = Path(__file__).resolve().parent


def reference_parser(doc: str, seed: int) -> argparse.ArgumentParser:
    """A script's options: ``--reference`` (the reference checkout) and ``--seed``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--reference", type=Path, required=True, help="checkout of the reference CTM repository"
    )
    parser.add_argument("--seed", type=int, default=seed)
    return parser


def make_input(config: dict, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """±1 bits for the parity backbone, else standard normal values."""
    if config["backbone_type"] == "parity_backbone":
        return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    return torch.randn(shape, generator=generator)


def built_reference(
    build: Callable[[], torch.nn.Module], seed: int, *inputs: torch.Tensor
) -> torch.nn.Module:
    """``build()`` with NumPy and torch seeded, in eval mode, lazy layers materialised on ``inputs``."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = build()
        model.eval()
        with torch.no_grad():
            model(*inputs)  # materialise lazy layers
    return model


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Round weights to bf16, make BN statistics and decays (some outside [0, 15]) non-trivial."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif "decay_params" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 18 - 1.5)
            elif name.endswith(".T"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            tensor.copy_(tensor.to(torch.bfloat16).float())


def bf16_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as ``model.<key>`` entries, floating-point ones in bfloat16."""
    return {
        f"model.{k}": (v.to(torch.bfloat16) if v.is_floating_point() else v).clone()
        for k, v in model.state_dict().items()
    }


def save_fixture(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: Path
) -> None:
    """Write ``tensors`` (each its own contiguous copy) and print the file's size."""
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    print(f"{path.relative_to(GOLDEN)}: {path.stat().st_size / 1e3:.0f} kB")
