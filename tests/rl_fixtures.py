"""The RL golden fixtures (tests/golden/rl/rl_*.safetensors, written by tests/golden/generate_rl.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parent / "golden" / "rl"
RL_FIXTURES = sorted(GOLDEN.glob("rl_*.safetensors"))


def load_rl_case(path: Path):
    """(the reference run's args, its agent's weights, every stored tensor)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    weights = {
        k.removeprefix("model."): (v.float() if v.is_floating_point() else v)
        for k, v in tensors.items()
        if k.startswith("model.")
    }
    return argparse.Namespace(**json.loads(metadata["args"])), weights, tensors
