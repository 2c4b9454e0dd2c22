"""Random number generator states as plain data: capture, and restore them on resume.

``capture()`` returns python ``random``, numpy's legacy global generator, torch's CPU generator
and (when CUDA is available) every CUDA device's generator as nested dicts/tuples of ints,
floats, strings and tensors, so ``torch.save`` of it loads with ``torch.load(weights_only=True)``.
``restore(state)`` puts them back; generators missing from ``state`` are left alone.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": _python_state(random.getstate()),
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state().clone(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": s["bit_generator"],
                "state": {"key": s["key"].numpy().astype(np.uint32), "pos": int(s["pos"])},
                "has_gauss": int(s["has_gauss"]),
                "gauss": float(s["gauss"]),
            }
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resume may see a different number of devices: restore those both runs have.
        for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)


def _python_state(state: tuple) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)
