"""Reading the golden fixtures (``tests/golden/**/*.safetensors``, written by ``tests/golden/generate*.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_golden(
    path: Path,
) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the metadata, the model's weights without the ``model.`` prefix and in fp32, every stored tensor)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    weights = {
        k.removeprefix("model."): (v.float() if v.is_floating_point() else v)
        for k, v in tensors.items()
        if k.startswith("model.")
    }
    return metadata, weights, tensors


def load_case(path: Path):
    """(config, NumPy seed, weights, tensors) of a CTM fixture (base, sort or Q&A MNIST)."""
    metadata, weights, tensors = read_golden(path)
    return json.loads(metadata["config"]), int(metadata["numpy_seed"]), weights, tensors
