"""How the CTM runs on a device: compiled or eager, CPU kernels, channels-last backbone.

Three ``CTMConfig`` fields take ``true``, ``false`` or ``"auto"``; ``"auto"`` is decided here from
the device the model runs on:

* ``compile``: ``torch.compile`` of the whole forward, on by default on CUDA. A tick is dozens of
  small ops; eager PyTorch dispatches each one from Python, so with GPU-sized batches the GPU
  idles between kernels. Compiled, the ticks' elementwise work is fused and the launches are
  few. The tick is a ``nested_compile_region``: it is traced and compiled once and reused for
  every tick, so compile time does not grow with ``iterations``. Such a region refuses inputs
  that share storage, and DeepSpeed's ZeRO optimizers keep all parameters as views of one flat
  buffer; there ``prepare`` unrolls the ticks into the one graph instead (same numerics, a
  compile time that grows with ``iterations``). Tick checkpointing and NLM
  recomputation keep Python-side state between forward and backward and stay eager, so
  ``"auto"`` leaves the model eager when either is set. On CPU ``"auto"`` is eager: inductor
  compiles C++ kernels, and on a 2-core machine (2026-12-01) a small parity model (d_model 128,
  12 ticks, batch 16, one thread) stepped 1.7x faster compiled than eager but its first step took
  145 s with a cold compile cache, thousands of steps' worth of the saving.
* ``cpu_kernels``: the tick-summed weight gradients and oneDNN-reordered weights of
  ``tick_grads.py``, written for CPU training (few rows per tick, where per-call weight packing
  dominates). On by default on CPU in eager mode; they cannot run inside a compiled forward.
* ``channels_last``: ResNet backbones in channels-last (NHWC) memory format, on by default on
  CUDA: NHWC is the layout cuDNN's bf16 convolution and batch-norm kernels are built for. The
  input is converted once per forward; each convolution then returns channels-last output, so the
  whole backbone runs in that layout. The values computed are the same in either layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import CTMConfig


def _setting(value: bool | str, auto: bool) -> bool:
    return auto if value == "auto" else bool(value)


def compiles(cfg: CTMConfig, device: torch.device) -> bool:
    """Whether the forward runs through ``torch.compile`` on ``device``."""
    eager_only = bool(cfg.tick_checkpointing) or cfg.recompute_nlms
    return _setting(cfg.compile, torch.device(device).type == "cuda" and not eager_only)


def uses_cpu_kernels(cfg: CTMConfig, device: torch.device) -> bool:
    """Whether the ticks route weight gradients through banks (``tick_grads.py``) on ``device``."""
    return _setting(
        cfg.cpu_kernels, torch.device(device).type == "cpu" and not compiles(cfg, device)
    )


def uses_channels_last(cfg: CTMConfig, device: torch.device) -> bool:
    """Whether a ResNet backbone runs in channels-last memory format on ``device``."""
    resnet = cfg.backbone_type.startswith("resnet")
    return resnet and _setting(cfg.channels_last, torch.device(device).type == "cuda")


COMPILE_BACKEND = "inductor"


def prepare(model: nn.Module) -> None:
    """Set up ``model`` (a CTM) to be compiled as its parameters are now: the tick as a reused region,
    unless parameters share storage (see the module docstring)."""
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.tick_region = len(storages) == len(list(model.parameters()))


def compile_options(cfg: CTMConfig) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for the CTM's forward: static shapes (the batch and input
    sizes of a run are fixed; the last, smaller batch of an evaluation compiles once more)."""
    return {"dynamic": False}
