"""Weights people can share: saving them (safetensors or torch.save), the Hugging Face Hub, and the
``pretrained_cfg`` that travels with them. :func:`fastconformer.registry.load_pretrained` loads
them into a model.

A ``pretrained_cfg`` (timm's keys) says how the weights expect their inputs: ``input_size``
(C, H, W), ``interpolation``, ``crop_pct``, ``mean``, ``std``, plus ``num_classes`` and
``architecture``. It is written into a safetensors file's metadata and, by :func:`save_pretrained`,
into ``config.json`` beside it; :func:`fastconformer.data.create_transform` builds the evaluation
transform from it.

``pretrained="hf-hub:ORG/REPO"`` (or ``hf-hub:ORG/REPO@REVISION``) reads ``model.safetensors``
and ``config.json`` of that Hub repository through ``huggingface_hub`` (the optional extra
``fastconformer[hub]``): from its cache, downloading only what is missing there unless
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Mapping

import torch
import torch.nn as nn

from .checkpoint import is_safetensors
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HF_HUB_PREFIX", "default_pretrained_cfg", "read_pretrained_cfg", "resolve_pretrained", "save_checkpoint",
           "save_pretrained", "unwrap_model"]

HF_HUB_PREFIX = "hf-hub:"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_CFG_KEY = "pretrained_cfg"  # of the safetensors metadata and of config.json
_TORCH_SUFFIXES = (".pth", ".pt")


def default_pretrained_cfg(architecture: str | None, num_classes: int) -> dict[str, Any]:
    """The official evaluation setting of every published variant: 224x224 crops of images whose
    short side was resized (bicubic) to 224 / 0.875 = 256, normalised with the ImageNet mean/std."""
    return {"architecture": architecture, "input_size": (3, 224, 224), "interpolation": "bicubic",
            "crop_pct": 0.875, "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "num_classes": num_classes}


def _model_cfg(model: nn.Module) -> dict[str, Any]:
    """model's pretrained_cfg (the default one if it has none), with its current num_classes."""
    cfg = getattr(model, "pretrained_cfg", None) or default_pretrained_cfg(None, model.num_classes)
    return {**cfg, "num_classes": model.num_classes}


def _checked_cfg(cfg: object, origin: str) -> dict[str, Any]:
    """A pretrained_cfg read from JSON: a dict, its lists as tuples."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{origin}: its pretrained_cfg must be a JSON object, got {type(cfg).__name__}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _json(text: str, origin: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin}: not valid JSON ({err})") from err


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside the wrappers it may be in: torch.compile's, DataParallel's and DDP's,
    :func:`~fastconformer.onednn_graph`'s (unwrapped by type: any other module is its own)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a Conformer), got {type(model).__name__}")
    from .onednn_graph import OneDNNGraph  # above this leaf; imported by the package already

    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # torch.compile's wrapper exists once dynamo is loaded
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, OneDNNGraph):
            model = model.model
        elif dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> pathlib.Path:
    """Write model's state_dict (official keys: a reference and a fast model write the same file)
    to ``path``, by its suffix: ``.safetensors`` (tensors only, with the model's pretrained_cfg as
    JSON under the metadata key ``pretrained_cfg``) or ``.pth``/``.pt`` (``torch.save`` of the
    state_dict, as the official checkpoints hold it). A wrapped model (torch.compile, DataParallel,
    DDP, :func:`~fastconformer.onednn_graph`) writes the model it wraps; any other module is
    written as it is (the pretrained_cfg only for a Conformer). Returns the path."""
    model = unwrap_model(model)
    path = pathlib.Path(path)
    if is_safetensors(path):
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        metadata = {"format": "pt"}
        if hasattr(model, "num_classes"):  # a Conformer (ours or the official code's): its pretrained_cfg
            metadata[_CFG_KEY] = json.dumps(_model_cfg(model))
        save_file(tensors, os.fspath(path), metadata=metadata)
    elif path.suffix in _TORCH_SUFFIXES:
        torch.save(model.state_dict(), path)
    else:
        raise ValueError(f"cannot tell the format of {os.fspath(path)!r} from its suffix; "
                         "use .safetensors, .pth or .pt")
    return path


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> pathlib.Path:
    """Write a Hub repository's files into ``directory`` (created if needed): ``model.safetensors``
    (:func:`save_checkpoint`) and ``config.json`` with ``architecture``, ``num_classes`` and the
    ``pretrained_cfg``. Upload the folder as it is (e.g. ``huggingface_hub.upload_folder``) and
    ``create_model(name, pretrained="hf-hub:ORG/REPO")`` reads it back. Returns the directory."""
    model = unwrap_model(model)
    if not hasattr(model, "num_classes"):
        raise TypeError(f"save_pretrained writes a Conformer's repository (its config.json names the architecture "
                        f"and num_classes), got a {type(model).__name__}; save_checkpoint writes any module")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, directory / WEIGHTS_NAME)
    cfg = _model_cfg(model)
    config = {"architecture": cfg["architecture"], "num_classes": cfg["num_classes"], _CFG_KEY: cfg}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_pretrained_cfg(path: str | os.PathLike) -> dict[str, Any] | None:
    """The pretrained_cfg in a safetensors file's metadata, or None if it has none."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file ({err})") from err
    text = metadata.get(_CFG_KEY)
    origin = f"{os.fspath(path)!r}'s metadata"
    return None if text is None else _checked_cfg(_json(text, origin), origin)


def _hub_files(spec: str) -> tuple[str, dict[str, Any] | None]:
    """(local path of model.safetensors, pretrained_cfg from config.json or None) for
    ``ORG/REPO[@REVISION]``, through huggingface_hub's cache."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise ImportError(f"pretrained='{HF_HUB_PREFIX}{spec}' needs huggingface_hub: "
                          "pip install 'fastconformer[hub]'") from None
    repo_id, _, revision = spec.partition("@")
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name:
        raise ValueError(f"pretrained={HF_HUB_PREFIX}{spec!r}: expected '{HF_HUB_PREFIX}ORG/REPO' or "
                         f"'{HF_HUB_PREFIX}ORG/REPO@REVISION'")

    def download(filename: str) -> str:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None)

    try:
        weights = download(WEIGHTS_NAME)
    except (OSError, ValueError, EntryNotFoundError, huggingface_hub.errors.HfHubHTTPError) as err:
        reason = str(err).strip().split("\n")[0]
        raise OSError(f"{HF_HUB_PREFIX}{spec}: cannot get {WEIGHTS_NAME} from the Hugging Face Hub or its cache "
                      f"({type(err).__name__}: {reason})") from err
    try:
        config_path = download(CONFIG_NAME)
    except EntryNotFoundError:
        return weights, None
    return weights, _config_cfg(config_path, f"{HF_HUB_PREFIX}{spec} {CONFIG_NAME}")


def _config_cfg(path: str | os.PathLike, origin: str) -> dict[str, Any] | None:
    """The pretrained_cfg in a config.json written by :func:`save_pretrained`, None if it has none."""
    config = _json(pathlib.Path(path).read_text(), origin)
    if not isinstance(config, dict):
        raise ValueError(f"{origin}: must be a JSON object, got {type(config).__name__}")
    cfg = config.get(_CFG_KEY)
    return None if cfg is None else _checked_cfg(cfg, origin)


def _folder_files(directory: str | os.PathLike) -> tuple[str, dict[str, Any] | None]:
    """(path of model.safetensors, pretrained_cfg from config.json or None) of a folder written by
    :func:`save_pretrained`."""
    directory = pathlib.Path(directory)
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file():
        raise IsADirectoryError(f"{os.fspath(directory)!r} is a folder without {WEIGHTS_NAME}: pretrained= takes a "
                                f"checkpoint file, or a folder written by save_pretrained")
    return os.fspath(weights), _config_cfg(config, os.fspath(config)) if config.is_file() else None


def resolve_pretrained(source: str | os.PathLike | Mapping) -> tuple[str | os.PathLike | Mapping,
                                                                     dict[str, Any] | None]:
    """(what to read the weights from, the pretrained_cfg travelling with them or None) for a
    ``pretrained=`` source: ``"hf-hub:ORG/REPO[@REVISION]"`` becomes the cached model.safetensors
    and its config.json's cfg (else the one in the file's metadata), a folder written by
    :func:`save_pretrained` likewise its files; a .safetensors path brings
    the cfg in its metadata; any other source comes back as it is, without a cfg."""
    cfg = None
    if isinstance(source, str) and source.startswith(HF_HUB_PREFIX):
        source, cfg = _hub_files(source[len(HF_HUB_PREFIX):])
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        source, cfg = _folder_files(source)
    if cfg is None and isinstance(source, (str, os.PathLike)) and is_safetensors(source) and os.path.isfile(source):
        cfg = read_pretrained_cfg(source)
    return source, cfg
