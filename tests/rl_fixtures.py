"""The RL golden fixtures (tests/golden/rl/rl_*.safetensors, written by tests/golden/generate_rl.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from golden_fixtures import read_golden

GOLDEN = Path(__file__).resolve().parent / "golden" / "rl"
RL_FIXTURES = sorted(GOLDEN.glob("rl_*.safetensors"))


def load_rl_case(path: Path):
    """(the reference run's args, its agent's weights, every stored tensor)."""
    metadata, weights, tensors = read_golden(path)
    return argparse.Namespace(**json.loads(metadata["args"])), weights, tensors
