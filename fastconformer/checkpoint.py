"""Reading Conformer checkpoints (a leaf: torch, and safetensors for its files): the official
repository's, DeiT-style training containers, DataParallel/DDP prefixes and MMPretrain's layout,
from torch.save files, always through ``torch.load(weights_only=True)``, or from safetensors files;
and what a model would reject of a state_dict. Loading into a model, with the variant names in the
error, is :func:`fastconformer.registry.load_checkpoint`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

__all__ = ["CheckpointMismatchError", "convert_mmpretrain", "is_safetensors", "mismatch_report", "read_state_dict"]

# Harmless classes that training scripts put next to the weights (the official script saves its
# argparse Namespace under 'args'); everything else that is not a tensor or a container is refused.
_SAFE_GLOBALS = [argparse.Namespace]

# How the two formats torch.save writes begin: a zip archive, or (legacy format) a pickle whose first
# object is torch's magic number (the LONG1 opcode and its 10 bytes, after the protocol header).
_ZIP_HEADER = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]
_EXPECTED_FILE = "expected a file written by torch.save (or a .safetensors file)"
SAFETENSORS_SUFFIX = ".safetensors"
_EXPECTED_SAFETENSORS = "expected a file written by safetensors (e.g. fastconformer.save_checkpoint)"

# Keys under which training scripts store the state_dict, searched in this order (nested too).
_CONTAINERS = ("model", "state_dict", "module")

# What wrappers put before every key: DataParallel/DDP, torch.compile, fastconformer.onednn_graph.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

# MMPretrain's names for the transformer block's submodules -> the official ones.
_MMPRETRAIN_RENAMES = (
    (re.compile(r"\.ln1\."), ".norm1."),
    (re.compile(r"\.ln2\."), ".norm2."),
    (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."),
    (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model (the message lists them)."""


def _not_a_checkpoint(head: bytes) -> str | None:
    """Why a file beginning with ``head`` cannot be a torch.save file, or None if it may be one."""
    if not head:
        return "empty file"
    if head.startswith(_ZIP_HEADER) or (head.startswith(b"\x80") and _LEGACY_MAGIC in head):
        return None
    if head.startswith(b"\x80"):
        return "a pickle that torch.save did not write: it does not begin with torch's magic number"
    return f"not a torch.save zip archive or pickle: starts with {head[:16]!r}"


def _existing_file(path: str | os.PathLike, expected: str) -> str:
    """path as a str; IsADirectoryError or FileNotFoundError (saying ``expected``) unless it is a file."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name!r} is a directory, not a checkpoint file ({expected}); a folder written by "
                                f"save_pretrained is read by create_model(pretrained=...)")
    if not os.path.exists(name):
        raise FileNotFoundError(f"no checkpoint file {name!r} ({expected})")
    return name


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a safetensors file (by its suffix, ``.safetensors``)."""
    return os.fspath(path).endswith(SAFETENSORS_SUFFIX)


def _safetensors_load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU (the format holds tensors and a string
    header only: there is nothing in it to execute)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = _existing_file(path, _EXPECTED_SAFETENSORS)
    try:
        return load_file(name, device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{name!r} is not a readable safetensors file ({err}); {_EXPECTED_SAFETENSORS} "
                         f"- is it truncated or damaged?") from err


def _torch_load(path: str | os.PathLike) -> object:
    name = _existing_file(path, _EXPECTED_FILE)
    with open(name, "rb") as f:
        problem = _not_a_checkpoint(f.read(32))
    if problem is not None:
        raise ValueError(f"{name!r} is not a PyTorch checkpoint ({problem}); {_EXPECTED_FILE}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {name!r}: it holds Python objects beyond tensors and plain containers, "
            f"and fastconformer only loads checkpoints with torch.load(weights_only=True) so that no code in a "
            f"checkpoint is ever executed. Re-save just the state_dict from a trusted environment "
            f"(torch.save(model.state_dict(), path)). {_unpickler_reason(err)}") from err
    except (OSError, MemoryError):
        raise
    except Exception as err:  # a damaged file fails anywhere in torch.load, with any exception type
        detail = str(err).strip().split("\n")[0]
        raise ValueError(f"{name!r} is not a readable PyTorch checkpoint ({type(err).__name__}: {detail}); "
                         f"{_EXPECTED_FILE} - is it truncated or damaged?") from err


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The sentence of torch's weights-only refusal that says what was refused (the rest of torch's
    message suggests loading with weights_only=False, which fastconformer never does)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    for line in (line.strip() for line in text.splitlines()):
        if line.startswith(("WeightsUnpickler error:", "Trying to load")):
            return line.split(" Please ", 1)[0]
    return "torch.load(weights_only=True) refused it"


def _official_name(name: str) -> str | None:
    """The official key (or module path, ``_metadata``'s keys) for an MMPretrain one; None outside
    ``backbone`` and ``head``."""
    for prefix in ("backbone", "head"):
        if name == prefix or name.startswith(prefix + "."):
            dotted = name[len(prefix):] + "."
            for pattern, replacement in _MMPRETRAIN_RENAMES:
                dotted = pattern.sub(replacement, dotted)
            return dotted[1:-1]
    return None


def _renamed(mapping: Mapping) -> OrderedDict:
    """mapping with its MMPretrain keys renamed by :func:`_official_name`, the others dropped."""
    renamed = ((_official_name(k), v) for k, v in mapping.items())
    return OrderedDict((name, v) for name, v in renamed if name is not None)


def convert_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """MMPretrain ImageClassifier keys (``backbone.*``, ``head.*``, ``ln1``/``ln2``, ``ffn.layers``)
    -> the official Conformer keys. Keys of neither prefix (e.g. ``data_preprocessor.*``) are dropped;
    the module versions in ``state_dict._metadata``, if any, are renamed alike."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"convert_mmpretrain takes a state_dict (a mapping of names to tensors), "
                        f"got {type(state_dict).__name__}")
    out = _renamed(state_dict)
    if not out:
        raise ValueError("no MMPretrain keys (backbone.*, head.*) in the state_dict")
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = _renamed(metadata)
    return out


def _holds_tensors(obj: Mapping) -> bool:
    return any(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_state_dict(obj: Mapping, where: str, outer: tuple, looked: list[str]) -> Mapping | None:
    """The first mapping holding tensors under string keys: ``obj`` itself unless it has one of the
    ``_CONTAINERS`` keys, else the first of those (searched the same way) that holds one. What each
    place held instead is appended to ``looked``; ``outer`` are the mappings around obj."""
    names = [name for name in _CONTAINERS if name in obj]
    if not names:
        if _holds_tensors(obj):
            return obj
        keys = list(obj)
        listed = f"keys: {', '.join(map(repr, keys[:10]))}{' ...' if len(keys) > 10 else ''}" if keys else "empty"
        looked.append(f"{where} holds no tensors under parameter names ({listed})")
        return None
    for name in names:
        inner, place = obj[name], f"{where}[{name!r}]"
        if not isinstance(inner, Mapping):
            looked.append(f"{place} holds a {type(inner).__name__}, not a state_dict")
        elif any(inner is m for m in outer + (obj,)):
            looked.append(f"{place} refers back to a dict that holds it")
        else:
            found = _find_state_dict(inner, place, outer + (obj,), looked)
            if found is not None:
                return found
    return None


def read_state_dict(source: str | os.PathLike | Mapping) -> OrderedDict[str, torch.Tensor]:
    """A state_dict in the official key layout from a path or an already loaded object.

    A path ending in ``.safetensors`` is read with safetensors, any other with
    ``torch.load(weights_only=True)``; the same key conversions apply to both.
    Accepts a raw state_dict or a dict holding one under ``'model'``, ``'state_dict'`` or
    ``'module'`` (nested too; the first that holds tensors is used), keys that all carry a wrapper's
    prefix (``module.`` of DataParallel / DDP, ``_orig_mod.`` of torch.compile, ``model.`` of
    :func:`fastconformer.onednn_graph`; also nested) and MMPretrain's layout. The source's ``_metadata`` (the module
    versions ``nn.Module.state_dict()`` records) is kept, renamed along with the keys, so that
    ``load_state_dict`` treats the result as torch treats the source: BatchNorm's
    ``num_batches_tracked``, for one, may be missing only where no version 2 is recorded.
    """
    if isinstance(source, (str, os.PathLike)):
        obj = _safetensors_load(source) if is_safetensors(source) else _torch_load(source)
        origin = repr(os.fspath(source))
        if not isinstance(obj, Mapping):
            raise ValueError(f"{origin} holds a {type(obj).__name__}; expected a state_dict (a mapping of names to "
                             f"tensors) or a dict holding one")
    elif isinstance(source, Mapping):
        obj, origin = source, "the checkpoint"
    else:
        raise TypeError(f"a checkpoint must be a file path or a state_dict (a mapping of names to tensors), "
                        f"got {type(source).__name__}")
    looked: list[str] = []
    found = _find_state_dict(obj, "checkpoint", (), looked)
    if found is None:
        raise ValueError(f"no state_dict in {origin}: {'; '.join(looked)}; expected a mapping of parameter names to "
                         f"tensors, or a dict holding one under {', '.join(map(repr, _CONTAINERS))}")
    state_dict = OrderedDict((k, v) for k, v in found.items() if isinstance(k, str) and isinstance(v, torch.Tensor))
    metadata = getattr(found, "_metadata", None)
    if metadata is not None:
        state_dict._metadata = OrderedDict(metadata)
    while state_dict and (prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)),
                                         None)):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = convert_mmpretrain(state_dict)
    return state_dict


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors: the same modules,
    names, shapes and load hooks, no memory for the weights."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _dry_run(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """What ``model.load_state_dict(state_dict, strict=False)`` finds: (missing keys, unexpected
    keys, torch's error messages such as size mismatches). Torch itself finds them, loading into a
    meta copy of ``model``, so the model is untouched."""
    twin = _meta_copy(model)
    probe = OrderedDict((k, v.to("meta")) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        probe._metadata = metadata
    found = []  # the root module's post hook runs last and sees the final key lists, even if torch then raises
    twin.register_load_state_dict_post_hook(lambda module, incompatible_keys: found.append(incompatible_keys))
    try:
        with warnings.catch_warnings():
            # BatchNorm fills a missing num_batches_tracked with a real tensor: a no-op copy into the twin
            warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter", UserWarning)
            twin.load_state_dict(probe, strict=False)
        errors = []
    except RuntimeError as err:  # "Error(s) in loading state_dict for X:" and one tab-indented line per error
        errors = [line.strip() for line in str(err).split("\n\t")[1:]] or [str(err)]
    return list(found[-1].missing_keys), list(found[-1].unexpected_keys), errors


def _listed(keys: list[str], limit: int = 20) -> str:
    return f"({len(keys)}): {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}"


def mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
    """What ``model.load_state_dict(state_dict, strict)`` would reject, one line each (missing and
    unexpected keys under strict=True, size mismatches always), found on a meta copy of the model
    so that the model itself is left untouched; empty when the state_dict fits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    missing, unexpected, errors = _dry_run(model, state_dict)
    lines = []
    if strict and missing:
        lines.append(f"missing keys {_listed(missing)}")
    if strict and unexpected:
        lines.append(f"unexpected keys {_listed(unexpected)}")
    lines += errors[:20]
    if len(errors) > 20:
        lines.append(f"... and {len(errors) - 20} more errors")
    return lines
