"""Evaluation, halting sweeps, plots and export.

Modules: ``evaluate`` (reports over shard sets, in-process or Ray workers; each task's metrics
and extras come from ``ctm_dist.tasks``), ``halting`` (the halting timing), ``loading`` (``load`` any
checkpoint), ``export`` (ZeRO -> safetensors / reference), ``plots``, ``animate`` and
``pictures`` (PNG/GIF), ``report`` (JSON + PNG + TensorBoard), ``cli`` (the launch/ commands).
"""

_LAZY = {
    "load": "loading",
    "load_model": "loading",
    "EvalRequest": "evaluate",
    "export_run": "export",
    "save_consolidated": "export",
    "make_pictures": "pictures",
}


def __getattr__(name):
    # Submodules pull in matplotlib, DeepSpeed or Ray: import them only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
