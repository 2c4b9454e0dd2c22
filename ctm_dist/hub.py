"""The reference's Hugging Face Hub layout in: ``config.json`` + ``model.safetensors``.

The reference publishes its pre-trained models with ``huggingface_hub``'s
``PyTorchModelHubMixin``: a directory (or Hub repository) holding ``config.json``, the
constructor's keyword arguments as JSON, and ``model.safetensors``, the ``state_dict``. This
module turns such a directory into our model (a :class:`~ctm_dist.model.CTM`, or an
:class:`~ctm_dist.model.LSTMBaseline` when the arguments are the LSTM baseline's) and fetches a
Hub repository by id when ``huggingface_hub`` is installed and the network allows.

Our own exports use the same two file names; their ``config.json`` names the ``ctm-dist-export``
format (``is_hub_config``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file

from ctm_dist.compat import CheckpointError, check_state_dict, input_channels
from ctm_dist.compat_args import config_from_args
from ctm_dist.model import (
    CTM,
    OUR_FIELDS,
    CTMConfig,
    LSTMBaseline,
    LSTMConfig,
    ModelConfig,
    build_model,
    kind_of_fields,
)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OUR_EXPORT_FORMAT_PREFIX = "ctm-dist-export/"
# owner/name, as the Hub spells repository ids
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_config(document: Any) -> bool:
    """Whether a ``config.json`` holds constructor arguments (not one of our exports' documents)."""
    return isinstance(document, dict) and not str(document.get("format", "")).startswith(
        OUR_EXPORT_FORMAT_PREFIX
    )


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` that is not a path here (a Hub repository id)."""
    return bool(_REPO_ID.match(text)) and not os.path.exists(text)


def is_hub_source(text: str) -> bool:
    """``hf://owner/name``, or ``owner/name`` that is not a local path."""
    return text.startswith("hf://") or looks_like_repo_id(text)


def config_from_hub(
    arguments: Mapping[str, Any], state: Mapping[str, torch.Tensor], **overrides: Any
) -> ModelConfig:
    """The config of a model saved by the mixin: its constructor arguments, and the input channels
    (which the reference infers lazily) read off its weights."""
    config_type = LSTMConfig if kind_of_fields(dict(arguments)) == "lstm" else CTMConfig
    known = set(config_type.__dataclass_fields__) - set(OUR_FIELDS) - {"in_channels"}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise CheckpointError(
            f"{CONFIG_FILE} has arguments {unknown} that the {config_type.__name__} does not take"
        )
    values = dict(arguments)
    values["in_channels"] = input_channels(values.get("backbone_type", "none"), state)
    return config_from_args(
        config_type, values, "model", overrides, source=f"{CONFIG_FILE} describes"
    )


def load_hub_directory(directory: str | os.PathLike, **overrides: Any) -> CTM | LSTMBaseline:
    """The model in a local Hub-layout directory, in eval mode, loaded strictly."""
    name = os.fspath(directory)
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            arguments = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{name}: unreadable {CONFIG_FILE}: {err}") from None
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{name}: {CONFIG_FILE} must hold a mapping of constructor arguments")
    try:
        state = load_file(os.path.join(directory, MODEL_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{name}: unreadable {MODEL_FILE}: {err}") from None
    model = build_model(config_from_hub(arguments, state, **overrides))
    check_state_dict(model, state, name)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def download(repo_id: str, revision: str | None = None) -> str:
    """A local copy of Hub repository ``repo_id`` (only its config and weights); its directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is no local path; loading it as a Hugging Face Hub id needs "
            "huggingface_hub (pip install 'ctm-dist[hub]'), or download the repository and pass its directory"
        ) from None
    try:
        return snapshot_download(
            repo_id, revision=revision, allow_patterns=[CONFIG_FILE, MODEL_FILE]
        )
    except Exception as err:  # offline, unknown repository, gated...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{repo_id!r} is no local path, and fetching it from the Hugging Face Hub failed: {first}"
        ) from None
