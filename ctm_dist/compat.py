"""Reference checkpoints in and out.

The reference training scripts (SakanaAI/continuous-thought-machines, ``tasks/*/train.py``)
save ``torch.save({"model_state_dict": ..., "args": argparse.Namespace, ...})``. The model's
shape is spread over those command-line options, and two of the constructor's arguments,
``out_dims`` and ``prediction_reshaper``, are derived from the task (dataset) rather than
given. This module turns such a file into a ready :class:`~ctm_dist.model.CTM` and writes
our models back in the same format, so that the reference's analysis scripts can read them.
Runs of the feed-forward baseline (``--model ff``; ``compat_ff.py`` maps them) load as
:class:`~ctm_dist.model.ReferenceFFBaseline`, called as the reference's: ``m(x)`` -> logits.
Q&A MNIST runs (told by their ``q_num_*`` options; ``compat_qamnist.py`` maps them) load as
:class:`~ctm_dist.model.qamnist.QAMNISTCTM` or its LSTM baseline, called ``m(x, z)``.

The sort script (``tasks/sort/train.py``) saves no ``dataset``; its runs are told by
``N_to_sort`` and give a :class:`~ctm_dist.model.SortCTM` (the reference's
``ContinuousThoughtMachineSORT``, which ignores the saved ``heads``, ``n_synch_action`` and
``d_input``: it has no attention and reads the N numbers directly).

Loading never runs code from the file: ``torch.load(weights_only=True)`` with only
``argparse.Namespace`` and plain numpy arrays/scalars (the reference checkpoints carry
numpy RNG state and accuracy curves) added to torch's allow-list.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
import torch

from ctm_dist.compat_args import config_from_args, ctm_core_fields, require_args
from ctm_dist.compat_ff import ff_config_from_reference_args
from ctm_dist.compat_qamnist import (
    is_qamnist_args,
    qamnist_config_from_reference_args,
    reference_args_from_qamnist_config,
)
from ctm_dist.compat_rl import (
    build_reference_agent,
    is_rl_args,
    reference_args_from_rl_config,
)
from ctm_dist.model import (
    CTM,
    CTMConfig,
    FFBaseline,
    FFConfig,
    LSTMBaseline,
    LSTMConfig,
    ReferenceFFBaseline,
    build_model,
)
from ctm_dist.model.qamnist import QAMNISTLSTM, build_qamnist_model
from ctm_dist.model.rl import RLAgent
from ctm_dist.storage.checkpoints import (
    CheckpointError,
)  # the one checkpoint error type; the message says why

__all__ = [
    "CheckpointError",
    "CLASSIFICATION_DATASETS",
    "MAZE_DATASETS",
    "PARITY_DATASETS",
    "task_output_shape",
    "check_state_dict",
    "input_channels",
    "is_sort_run",
    "config_from_reference_args",
    "lstm_config_from_reference_args",
    "reference_model_kind",
    "reference_args_from_config",
    "read_reference_checkpoint",
    "load_reference_checkpoint",
    "export_reference_checkpoint",
]

Source = str | os.PathLike | IO[bytes]


# Number of classes per classification dataset of the reference's image_classification/train.py.
# 'demo' is ours (its class count is read from args.out_dims).
CLASSIFICATION_DATASETS: dict[str, int | None] = {
    "cifar10": 10,
    "cifar100": 100,
    "imagenet": 1000,
    "demo": None,
}
MAZE_DATASETS = ("mazes-small", "mazes-medium", "mazes-large")
PARITY_DATASETS = ("parity",)
SORT_FIELD = "N_to_sort"  # only the sort script saves it (and it saves no dataset)
MAZE_MOVES = 5  # up, down, left, right, wait

# Options every reference CTM run saves (names as in the reference's argparse parsers).
_REQUIRED_ARGS = (
    "iterations",
    "d_model",
    "d_input",
    "heads",
    "n_synch_out",
    "n_synch_action",
    "synapse_depth",
    "memory_length",
    "deep_memory",
    "memory_hidden_dims",
    "dataset",
)


# --- task shapes ---------------------------------------------------------------------------------


def task_output_shape(args: argparse.Namespace) -> tuple[int, list[int]]:
    """``(out_dims, prediction_reshaper)`` for a run, derived from its dataset as its train script does."""
    dataset = getattr(args, "dataset", None)
    if dataset in CLASSIFICATION_DATASETS:
        classes = CLASSIFICATION_DATASETS[dataset]
        if classes is None:
            classes = getattr(args, "out_dims", None)
            if not isinstance(classes, int) or classes < 1:
                raise CheckpointError(
                    f"dataset {dataset!r} needs args.out_dims (the number of classes); got {classes!r}"
                )
        return classes, [-1]
    if dataset in MAZE_DATASETS:
        route = _positive_int(args, "maze_route_length")
        return route * MAZE_MOVES, [route, MAZE_MOVES]
    if dataset in PARITY_DATASETS:
        length = _positive_int(args, "parity_sequence_length")
        return length * 2, [length, 2]
    known = sorted(CLASSIFICATION_DATASETS) + list(MAZE_DATASETS) + list(PARITY_DATASETS)
    raise CheckpointError(f"unknown dataset {dataset!r} in checkpoint args; supported: {known}")


def _positive_int(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(
            f"dataset {args.dataset!r} needs a positive integer args.{name}; got {value!r}"
        )
    return value


# --- args <-> config -----------------------------------------------------------------------------


def is_sort_run(args: argparse.Namespace) -> bool:
    """Whether the options are those of the reference's sort script."""
    return hasattr(args, SORT_FIELD) and getattr(args, "dataset", None) is None


_SORT_REQUIRED_ARGS = (
    "iterations",
    "d_model",
    "n_synch_out",
    "synapse_depth",
    "memory_length",
    "deep_memory",
    "memory_hidden_dims",
)


def _sort_config(args: argparse.Namespace, overrides: dict[str, Any]) -> CTMConfig:
    """The sort script's options as the model it builds: N inputs, N positions + a blank out."""
    require_args(args, _SORT_REQUIRED_ARGS, "the reference's sort script")
    length = getattr(args, SORT_FIELD)
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise CheckpointError(f"args.{SORT_FIELD} must be an integer >= 2, got {length!r}")
    saved_out_dims = getattr(args, "out_dims", None)
    if saved_out_dims is not None and saved_out_dims != length + 1:
        raise CheckpointError(
            f"args.out_dims={saved_out_dims} does not match {SORT_FIELD}={length} "
            f"(which gives {length + 1})"
        )
    values = dict(
        ctm_core_fields(args),
        variant="sort",
        d_input=length,
        heads=0,
        n_synch_action=0,
        backbone_type="none",
        positional_embedding_type="none",
        out_dims=length + 1,
        prediction_reshaper=[-1],
        dropout=getattr(args, "dropout", 0.0),
        dropout_nlm=getattr(args, "dropout_nlm", None),
        neuron_select_type=getattr(args, "neuron_select_type", "random-pairing"),
    )
    return config_from_args(CTMConfig, values, "sort CTM", overrides)


def _sort_args(cfg: CTMConfig) -> argparse.Namespace:
    """What the sort script saves for a model of this config (the options it has, no dataset)."""
    return argparse.Namespace(
        N_to_sort=cfg.d_input,
        iterations=cfg.iterations,
        d_model=cfg.d_model,
        d_input=cfg.d_input,
        heads=0,
        n_synch_out=cfg.n_synch_out,
        n_synch_action=0,
        synapse_depth=cfg.synapse_depth,
        memory_length=cfg.memory_length,
        deep_memory=cfg.deep_nlms,
        memory_hidden_dims=cfg.memory_hidden_dims,
        do_normalisation=cfg.do_layernorm_nlm,
        backbone_type="none",
        positional_embedding_type="none",
        out_dims=cfg.out_dims,
        dropout=cfg.dropout,
        dropout_nlm=cfg.dropout_nlm,
        neuron_select_type=cfg.neuron_select_type,
        n_random_pairing_self=cfg.n_random_pairing_self,
    )


def input_channels(backbone_type: str, state_dict: Mapping[str, torch.Tensor] | None) -> int:
    """Input channels: the reference infers them lazily, so read them off the weights that see the input."""
    if state_dict is None:
        return 3
    for key in (
        ("initial_rgb.weight", "backbone.layers.0.weight")
        if backbone_type != "none"
        else ("kv_proj.0.weight",)
    ):
        weight = state_dict.get(key)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            return int(weight.shape[1])
    return 3


def reference_model_kind(args: argparse.Namespace) -> str:
    """``ctm``, ``lstm`` or ``ff``: the model a reference run trained (``--model`` or
    ``--model_type``)."""
    return getattr(args, "model", None) or getattr(args, "model_type", None) or "ctm"


# Options every reference LSTM-baseline run saves.
_REQUIRED_LSTM_ARGS = ("iterations", "d_model", "d_input", "heads", "backbone_type", "dataset")


def _check_namespace(args: Any) -> None:
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(
            f"checkpoint 'args' must be an argparse.Namespace, got {type(args).__name__}"
        )


def lstm_config_from_reference_args(
    args: argparse.Namespace,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> LSTMConfig:
    """Map a reference LSTM-baseline run's options (and its weights, for the layer count and the
    input channels) to an :class:`~ctm_dist.model.LSTMConfig`."""
    _check_namespace(args)
    require_args(args, _REQUIRED_LSTM_ARGS, "a reference LSTM train script")
    out_dims, reshaper = task_output_shape(args)
    # the train scripts build one layer; the weights say how many there are
    layers = 1
    if state_dict is not None:
        layers = max(1, sum(1 for key in state_dict if key.startswith("lstm.weight_ih_l")))
    values = dict(
        iterations=args.iterations,
        d_model=args.d_model,
        d_input=args.d_input,
        heads=args.heads,
        backbone_type=args.backbone_type,
        num_layers=getattr(args, "num_layers", layers),
        positional_embedding_type=getattr(args, "positional_embedding_type", "none"),
        out_dims=out_dims,
        prediction_reshaper=reshaper,
        dropout=getattr(args, "dropout", 0.0),
        in_channels=input_channels(args.backbone_type, state_dict),
    )
    return config_from_args(LSTMConfig, values, "LSTM", overrides)


def config_from_reference_args(
    args: argparse.Namespace,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> CTMConfig:
    """Map a reference run's options (and, for input channels, its weights) to a :class:`CTMConfig`."""
    _check_namespace(args)
    if is_qamnist_args(args):
        raise CheckpointError(
            "checkpoint args are a Q&A MNIST run's (q_num_* options): load it with "
            "load_reference_checkpoint, which builds the QAMNIST model"
        )
    model_kind = reference_model_kind(args)
    if model_kind != "ctm":
        raise CheckpointError(f"checkpoint holds a {model_kind!r} model, not a CTM")
    if is_sort_run(args):
        return _sort_config(args, overrides)
    missing = [name for name in _REQUIRED_ARGS if not hasattr(args, name)]
    backbone_type = getattr(args, "backbone_type", None)
    if backbone_type is None and hasattr(args, "resnet_type"):
        # Early runs named the backbone and its depth separately.
        backbone_type = f"{args.resnet_type}-{getattr(args, 'resnet_feature_scales', [4])[-1]}"
    if backbone_type is None:
        missing.append("backbone_type")
    if missing:
        raise CheckpointError(
            f"checkpoint args lack {missing}; not a checkpoint of a reference CTM train script"
        )

    out_dims, reshaper = task_output_shape(args)
    saved_out_dims = getattr(args, "out_dims", None)
    if saved_out_dims is not None and saved_out_dims != out_dims:
        raise CheckpointError(
            f"args.out_dims={saved_out_dims} does not match dataset {args.dataset!r} "
            f"(which gives {out_dims})"
        )
    values = dict(
        ctm_core_fields(args),
        d_input=args.d_input,
        heads=args.heads,
        n_synch_action=args.n_synch_action,
        backbone_type=backbone_type,
        positional_embedding_type=getattr(args, "positional_embedding_type", "none"),
        out_dims=out_dims,
        prediction_reshaper=reshaper,
        dropout=getattr(args, "dropout", 0.0),
        dropout_nlm=getattr(args, "dropout_nlm", None),
        # Runs from before the option existed used first-last selection.
        neuron_select_type=getattr(args, "neuron_select_type", "first-last"),
        in_channels=input_channels(backbone_type, state_dict),
    )
    return config_from_args(CTMConfig, values, "CTM", overrides)


def reference_args_from_config(
    cfg: CTMConfig, dataset: str | None, extra_args: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """The options a reference train script would have saved for a model of this config.

    ``dataset`` names the task of a base CTM; the sort variant's script saves none (``None`` or
    ``"sort"``).
    """
    if cfg.variant == "sort":
        if dataset not in (None, "sort"):
            raise ValueError(f"a sort model is not trained on dataset {dataset!r}")
        args = _sort_args(cfg)
        for key, value in (extra_args or {}).items():
            setattr(args, key, value)
        return args
    return _task_args(
        "a CTM",
        cfg,
        dataset,
        extra_args,
        model="ctm",  # image_classification/ and mazes/ scripts
        model_type="ctm",  # parity/ scripts
        iterations=cfg.iterations,
        d_model=cfg.d_model,
        d_input=cfg.d_input,
        heads=cfg.heads,
        n_synch_out=cfg.n_synch_out,
        n_synch_action=cfg.n_synch_action,
        synapse_depth=cfg.synapse_depth,
        memory_length=cfg.memory_length,
        deep_memory=cfg.deep_nlms,
        memory_hidden_dims=cfg.memory_hidden_dims,
        do_normalisation=cfg.do_layernorm_nlm,
        backbone_type=cfg.backbone_type,
        positional_embedding_type=cfg.positional_embedding_type,
        out_dims=cfg.out_dims,
        dropout=cfg.dropout,
        dropout_nlm=cfg.dropout_nlm,
        neuron_select_type=cfg.neuron_select_type,
        n_random_pairing_self=cfg.n_random_pairing_self,
    )


def reference_args_from_lstm_config(
    cfg: LSTMConfig, dataset: str | None, extra_args: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """The options a reference train script run with ``--model lstm`` (``--model_type lstm`` for
    parity) would have saved for an LSTM baseline of this config."""
    return _task_args(
        "an LSTM",
        cfg,
        dataset,
        extra_args,
        model="lstm",
        model_type="lstm",
        iterations=cfg.iterations,
        d_model=cfg.d_model,
        d_input=cfg.d_input,
        heads=cfg.heads,
        num_layers=cfg.num_layers,
        backbone_type=cfg.backbone_type,
        positional_embedding_type=cfg.positional_embedding_type,
        out_dims=cfg.out_dims,
        dropout=cfg.dropout,
    )


def reference_args_from_ff_config(
    cfg: FFConfig, dataset: str | None, extra_args: Mapping[str, Any] | None = None
) -> argparse.Namespace:
    """The options a reference image-classification or maze script run with ``--model ff``
    would have saved for a feed-forward baseline of this config."""
    return _task_args(
        "an FF",
        cfg,
        dataset,
        extra_args,
        model="ff",
        d_model=cfg.d_model,
        backbone_type=cfg.backbone_type,
        out_dims=cfg.out_dims,
        dropout=cfg.dropout,
    )


def _task_args(
    what: str,
    cfg: CTMConfig | LSTMConfig | FFConfig,
    dataset: str | None,
    extra_args: Mapping[str, Any] | None,
    **fields: Any,
) -> argparse.Namespace:
    """A reference script's saved options: ``fields`` with the dataset and its task's options."""
    if dataset is None:
        raise ValueError(f"{what} checkpoint needs the dataset it was trained on (e.g. 'cifar10')")
    return _with_task_fields(
        argparse.Namespace(dataset=dataset, **fields), cfg, dataset, extra_args
    )


def _with_task_fields(
    args: argparse.Namespace,
    cfg: CTMConfig | LSTMConfig | FFConfig,
    dataset: str,
    extra_args: Mapping[str, Any] | None,
) -> argparse.Namespace:
    """``args`` with the task's own options (maze route length, parity length) and
    ``extra_args``, checked against the output shape the model has."""
    if dataset in MAZE_DATASETS:
        args.maze_route_length = cfg.out_dims // MAZE_MOVES
    elif dataset in PARITY_DATASETS:
        args.parity_sequence_length = cfg.out_dims // 2
    for key, value in (extra_args or {}).items():
        setattr(args, key, value)

    out_dims, reshaper = task_output_shape(args)
    if out_dims != cfg.out_dims or reshaper != list(cfg.prediction_reshaper):
        raise ValueError(
            f"dataset {dataset!r} expects out_dims={out_dims} and prediction_reshaper={reshaper}; "
            f"the model has out_dims={cfg.out_dims} and prediction_reshaper={cfg.prediction_reshaper}"
        )
    return args


# --- reading -------------------------------------------------------------------------------------


def _numpy_data_globals() -> list:
    """numpy functions and types needed to rebuild plain (numeric/bool) arrays and scalars; they run no user code."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    # Files pickled under numpy 1.x name the module numpy.core; under 2.x numpy._core.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (multiarray._reconstruct, f"{module}._reconstruct"),
            (multiarray.scalar, f"{module}.scalar"),
        ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        excluded = {"ObjectDType", "VoidDType", "StringDType", "StrDType", "BytesDType"}
        allowed += [
            getattr(dtypes, name)
            for name in dir(dtypes)
            if name.endswith("DType") and name not in excluded
        ]
    return allowed


def _describe(source: Source) -> str:
    return (
        os.fspath(source)
        if isinstance(source, (str, os.PathLike))
        else f"<{type(source).__name__}>"
    )


def read_reference_checkpoint(source: Source) -> dict:
    """The checkpoint dict, loaded without running code from the file; CheckpointError if unusable."""
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise CheckpointError(f"{name}: not a file")
        with open(source, "rb") as handle:
            return _read(handle, name)
    return _read(source, name)


def _read(handle: IO[bytes], name: str) -> dict:
    start = handle.tell()
    head = handle.read(2)
    handle.seek(start)
    is_zip = zipfile.is_zipfile(handle)
    handle.seek(start)
    if not is_zip and not head.startswith(
        b"\x80"
    ):  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(
            f"{name}: not a torch checkpoint (no torch.save archive; the file may be truncated)"
        )
    try:
        with (
            torch.serialization.safe_globals([argparse.Namespace, *_numpy_data_globals()]),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol"
            )  # legacy files; errors still raise
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not any(sign in str(err) for sign in _REFUSAL_SIGNS):
            raise CheckpointError(
                f"{name}: not a readable torch checkpoint: {_first_line(err)}"
            ) from None
        refused = _refused_globals(handle, start) if is_zip else []
        what = f" ({', '.join(refused)})" if refused else ""
        raise CheckpointError(
            f"{name}: refused to load: the checkpoint contains Python objects or code{what} that a weights-only "
            "load does not run. A reference checkpoint holds only tensors, containers, argparse.Namespace and "
            "numpy arrays. If you made this file yourself and trust it, re-save its 'model_state_dict' and "
            f"'args' alone. Loader said: {_first_line(err)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{name}: not a readable torch checkpoint: {_first_line(err)}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{name}: expected a dict with 'args' and 'model_state_dict', got {type(checkpoint).__name__}"
        )
    missing = [key for key in ("args", "model_state_dict") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{name}: checkpoint lacks {missing} (has {sorted(map(str, checkpoint))[:10]})"
        )
    state = checkpoint["model_state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{name}: 'model_state_dict' must map names to tensors")
    return checkpoint


# Phrases of torch's weights-only unpickler when it meets a global (a function or class) it will not load.
_REFUSAL_SIGNS = ("Unsupported global", "Can only build", "allowlist", "GLOBAL ")


def _refused_globals(handle: IO[bytes], start: int) -> list[str]:
    allowed = {"argparse.Namespace"}
    try:
        handle.seek(start)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(handle)
    except Exception:  # best effort: the message is useful without the list
        return []
    numpy_ok = {
        name if isinstance(name, str) else f"{name.__module__}.{name.__qualname__}"
        for name in (item[1] if isinstance(item, tuple) else item for item in _numpy_data_globals())
    }
    return [g for g in found if g not in allowed and g not in numpy_ok]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        if any(sign in line for sign in ("GLOBAL", "Unsupported", "Can only build", "got <")):
            return line.strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- loading -------------------------------------------------------------------------------------


def load_reference_checkpoint(source: Source, **overrides: Any) -> torch.nn.Module:
    """The model of a reference checkpoint in eval mode, loaded strictly: a CTM (or, for a run of
    the reference's LSTM baseline, an :class:`LSTMBaseline`), called as the reference's model is
    (``model(x)`` -> predictions, certainties, synchronisation or ``None``). A run of its
    feed-forward baseline (``--model ff``) gives a :class:`ReferenceFFBaseline`: ``model(x)`` ->
    logits, as the reference's ``FFBaseline`` (``.as_baseline()``: the same weights called as
    our other kinds).

    A sort run gives a :class:`~ctm_dist.model.SortCTM`, called as the reference's: ``m(x)``.

    ``overrides`` replace config fields that do not change weights (e.g. ``tick_checkpointing``,
    ``attention_impl``). A Q&A MNIST checkpoint gives its QAMNIST CTM or LSTM (``m(x, z)``).
    A checkpoint of the reference's RL script (its args carry ``env_id``) gives the whole agent, an
    :class:`~ctm_dist.model.rl.RLAgent` called as the reference's: ``m(x, hidden)``, ``m.actor``,
    ``m.critic``, ``m.get_initial_state(n)``.
    """
    checkpoint = read_reference_checkpoint(source)
    name = _describe(source)
    state = checkpoint["model_state_dict"]
    args = checkpoint["args"]
    if is_rl_args(args):
        if overrides:
            raise CheckpointError(f"{name}: an RL agent takes no config overrides")
        model = build_reference_agent(args, state)
    elif is_qamnist_args(args):
        model = build_qamnist_model(qamnist_config_from_reference_args(args, state, **overrides))
    elif isinstance(args, argparse.Namespace) and reference_model_kind(args) == "lstm":
        model = LSTMBaseline(lstm_config_from_reference_args(args, state, **overrides))
    elif isinstance(args, argparse.Namespace) and reference_model_kind(args) == "ff":
        shape = task_output_shape(args)
        model = ReferenceFFBaseline(ff_config_from_reference_args(args, shape, state, **overrides))
    else:
        model = build_model(config_from_reference_args(args, state, **overrides))
    check_state_dict(model, state, name)
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_clip(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_clip(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{name}: weights do not fit the {type(model).__name__} its args describe: "
            + "; ".join(problems)
        )


def _clip(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


# --- writing -------------------------------------------------------------------------------------


def export_reference_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    dataset: str | None = None,
    extra_args: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{"model_state_dict", "args"}`` as a reference train script would, atomically.

    ``dataset`` names the task for the reference (``cifar10``, ``imagenet``, ``mazes-medium``,
    ``parity``, ``qamnist``...; ``None`` or ``"sort"`` for a sort model, whose script saves
    ``N_to_sort`` instead; for an :class:`~ctm_dist.model.rl.RLAgent` the gymnasium env id:
    ``CartPole-v1``, ``Acrobot-v1``, ``MiniGrid-FourRooms-v0``); ``extra_args`` adds or overrides
    options in the saved Namespace. A QAMNIST model (CTM or LSTM) is saved as the reference's
    QAMNIST script saves it, with no ``dataset`` field.
    """
    while not isinstance(model, (CTM, LSTMBaseline, FFBaseline, QAMNISTLSTM, RLAgent)):
        inner = getattr(model, "module", None) or getattr(
            model, "_orig_mod", None
        )  # DDP/DeepSpeed, torch.compile
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    if isinstance(model, RLAgent):
        args = reference_args_from_rl_config(model.cfg, dataset, extra_args)
    elif isinstance(model, LSTMBaseline):
        args = reference_args_from_lstm_config(model.cfg, dataset, extra_args)
    elif isinstance(model, FFBaseline):
        args = reference_args_from_ff_config(model.cfg, dataset, extra_args)
    elif isinstance(model, (CTM, QAMNISTLSTM)):
        qcfg = getattr(model, "qcfg", None)
        if (qcfg is None) != (dataset != "qamnist"):
            raise ValueError(
                f"dataset {dataset!r} does not fit a {type(model).__name__}: Q&A MNIST models "
                "export with dataset 'qamnist', and only they do"
            )
        if qcfg is not None:
            args = reference_args_from_qamnist_config(qcfg, extra_args)
        else:
            args = reference_args_from_config(model.cfg, dataset, extra_args)
    else:
        raise TypeError(f"expected a ctm_dist CTM, baseline or RLAgent, got {type(model).__name__}")
    # The reference keeps float32 weights; bf16/fp16 copies (e.g. from a DeepSpeed engine) are widened.
    state = {
        key: value.detach().to(
            "cpu", dtype=torch.float32 if value.is_floating_point() else value.dtype, copy=True
        )
        for key, value in model.state_dict().items()
    }
    payload = {"model_state_dict": state, "args": args}

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".pt.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
