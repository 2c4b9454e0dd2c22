"""Reference QAMNIST checkpoints: their options <-> our :class:`~ctm_dist.model.qamnist.QAMNISTConfig`.

The reference's ``tasks/qamnist/train.py`` saves an ``args`` Namespace without a ``dataset``
field; a QAMNIST run is told by its ``q_num_*`` options. ``model_type`` says CTM or LSTM. Each
digit and each question part is shown for ``q_num_repeats_per_input`` ticks and the answer
takes ``q_num_answer_steps``. The LSTM is built there without dropout, so it is loaded so here.
``ctm_dist.compat`` dispatches to this module; loading and writing files stay there.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from ctm_dist.compat_args import config_from_args, ctm_core_fields
from ctm_dist.model.qamnist import QAMNISTConfig, qamnist_config
from ctm_dist.storage.checkpoints import CheckpointError

ANSWER_CLASSES = 10  # answers are taken modulo 10 (output range 0..9)
# the reference's curriculum options -> QAMNISTConfig fields
CURRICULUM = {
    "q_num_images": "num_digits",
    "q_num_images_delta": "num_digits_delta",
    "q_num_operations": "num_operations",
    "q_num_operations_delta": "num_operations_delta",
}
_REQUIRED = (
    "q_num_repeats_per_input",
    "q_num_answer_steps",
    "iterations",
    "d_model",
    "d_input",
    "heads",
)
_CTM_REQUIRED = (
    "n_synch_out",
    "n_synch_action",
    "synapse_depth",
    "memory_length",
    "deep_memory",
    "memory_hidden_dims",
)


def is_qamnist_args(args: Any) -> bool:
    """Whether a checkpoint's ``args`` come from the reference's QAMNIST train script."""
    return isinstance(args, argparse.Namespace) and any(
        name.startswith("q_num_") for name in vars(args)
    )


def _image_channels(state_dict: Mapping[str, torch.Tensor] | None) -> int:
    weight = (state_dict or {}).get("backbone_digit.layers.0.weight")
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 4 else 1


def qamnist_config_from_reference_args(
    args: argparse.Namespace,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> QAMNISTConfig:
    """Map a reference QAMNIST run's options (and its weights, for image channels) to a config."""
    kind = getattr(args, "model_type", "ctm")
    if kind not in ("ctm", "lstm"):
        raise CheckpointError(f"QAMNIST checkpoint holds a {kind!r} model, not a CTM or LSTM")
    missing = [
        n for n in _REQUIRED + (_CTM_REQUIRED if kind == "ctm" else ()) if not hasattr(args, n)
    ]
    if missing:
        raise CheckpointError(
            f"QAMNIST checkpoint args lack {missing}; not a checkpoint of the reference's "
            "tasks/qamnist/train.py"
        )
    out_dims = getattr(args, "out_dims", ANSWER_CLASSES)
    if out_dims != ANSWER_CLASSES:
        raise CheckpointError(
            f"QAMNIST answers have {ANSWER_CLASSES} classes; args.out_dims={out_dims}"
        )
    ctm_fields: dict[str, Any] = dict(
        iterations=args.iterations,
        d_model=args.d_model,
        d_input=args.d_input,
        heads=args.heads,
        out_dims=ANSWER_CLASSES,
        dropout=getattr(args, "dropout", 0.0) if kind == "ctm" else 0.0,
    )
    if kind == "ctm":
        ctm_fields.update(
            ctm_core_fields(args),
            n_synch_action=args.n_synch_action,
            neuron_select_type=getattr(args, "neuron_select_type", "random"),
        )
    values = dict(
        kind=kind,
        iterations_per_digit=args.q_num_repeats_per_input,
        iterations_per_question_part=args.q_num_repeats_per_input,
        iterations_for_answering=args.q_num_answer_steps,
        image_channels=_image_channels(state_dict),
        **{
            ours: getattr(args, theirs)
            for theirs, ours in CURRICULUM.items()
            if hasattr(args, theirs)
        },
        **ctm_fields,
    )
    return config_from_args(qamnist_config, values, "QAMNIST model", overrides)


def reference_args_from_qamnist_config(
    cfg: QAMNISTConfig, extra_args: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """The options the reference's QAMNIST train script would have saved for a model of ``cfg``."""
    if cfg.iterations_per_digit != cfg.iterations_per_question_part:
        raise ValueError(
            "the reference shows digits and question parts for the same number of ticks "
            f"(q_num_repeats_per_input); this model has {cfg.iterations_per_digit} and "
            f"{cfg.iterations_per_question_part}"
        )
    c = cfg
    args = argparse.Namespace(
        **{theirs: getattr(cfg, ours) for theirs, ours in CURRICULUM.items()},
        q_num_repeats_per_input=cfg.iterations_per_digit,
        q_num_answer_steps=cfg.iterations_for_answering,
        model_type=cfg.kind,
        d_model=c.d_model,
        d_input=c.d_input,
        synapse_depth=c.synapse_depth,
        heads=c.heads,
        n_synch_out=c.n_synch_out,
        n_synch_action=c.n_synch_action,
        neuron_select_type=c.neuron_select_type,
        n_random_pairing_self=c.n_random_pairing_self,
        iterations=c.iterations,
        memory_length=c.memory_length,
        deep_memory=c.deep_nlms,
        memory_hidden_dims=c.memory_hidden_dims,
        dropout=c.dropout,
        do_normalisation=c.do_layernorm_nlm,
        out_dims=c.out_dims,
        use_most_certain=cfg.kind == "ctm",
    )
    for key, value in (extra_args or {}).items():
        setattr(args, key, value)
    return args
