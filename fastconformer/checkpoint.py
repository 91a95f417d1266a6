"""Loading Conformer checkpoints: the official repository's, DeiT-style training containers,
DataParallel/DDP prefixes and MMPretrain's layout, always through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointMismatchError", "load_checkpoint", "read_state_dict", "convert_mmpretrain", "guess_variant"]

# Harmless classes that training scripts put next to the weights (the official script saves its
# argparse Namespace under 'args'); everything else that is not a tensor or a container is refused.
_SAFE_GLOBALS = [argparse.Namespace]

# How the two formats torch.save writes begin: a zip archive, or (legacy format) a pickle whose first
# object is torch's magic number (the LONG1 opcode and its 10 bytes, after the protocol header).
_ZIP_HEADER = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]
_EXPECTED_FILE = "expected a file written by torch.save"

# Keys under which training scripts store the state_dict, searched in this order (nested too).
_CONTAINERS = ("model", "state_dict", "module")

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


def _torch_load(path: str | os.PathLike) -> object:
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name!r} is a directory, not a checkpoint file ({_EXPECTED_FILE})")
    if not os.path.exists(name):
        raise FileNotFoundError(f"no checkpoint file {name!r} ({_EXPECTED_FILE})")
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
            f"(torch.save(model.state_dict(), path)). Details: {err}") from err
    except (OSError, MemoryError):
        raise
    except Exception as err:  # a damaged file fails anywhere in torch.load, with any exception type
        detail = str(err).strip().split("\n")[0]
        raise ValueError(f"{name!r} is not a readable PyTorch checkpoint ({type(err).__name__}: {detail}); "
                         f"{_EXPECTED_FILE} - is it truncated or damaged?") from err


def convert_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMPretrain ImageClassifier keys (``backbone.*``, ``head.*``, ``ln1``/``ln2``, ``ffn.layers``)
    -> the official Conformer keys. Keys of neither prefix (e.g. ``data_preprocessor.*``) are dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        elif key.startswith("head."):
            key = key[len("head."):]
        else:
            continue
        key = "." + key
        for pattern, replacement in _MMPRETRAIN_RENAMES:
            key = pattern.sub(replacement, key)
        out[key[1:]] = value
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


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, torch.Tensor]:
    """A state_dict in the official key layout from a path or an already loaded object.

    Accepts a raw state_dict or a dict holding one under ``'model'``, ``'state_dict'`` or
    ``'module'`` (nested too; the first that holds tensors is used), keys prefixed ``module.``
    (DataParallel / DDP, also twice) and MMPretrain's layout.
    """
    if isinstance(source, (str, os.PathLike)):
        obj, origin = _torch_load(source), repr(os.fspath(source))
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
    state_dict = {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    while all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = convert_mmpretrain(state_dict)
    return state_dict


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _variant_shapes() -> dict[str, dict[str, tuple]]:
    from .reference import Conformer
    from .registry import VARIANTS

    with torch.device("meta"):
        return {name: _shapes(Conformer(**v.kwargs).state_dict()) for name, v in VARIANTS.items()}


def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> tuple[str | None, str]:
    """(variant name or None, a sentence on why) for a state_dict in the official layout.

    Classifier heads are ignored (checkpoints fine-tuned to other class counts still match)."""
    shapes = _shapes(state_dict)
    heads = ("trans_cls_head.", "conv_cls_head.")
    body = {k: s for k, s in shapes.items() if not k.startswith(heads)}
    for name, expected in _variant_shapes().items():
        if body == {k: s for k, s in expected.items() if not k.startswith(heads)}:
            return name, f"every key and shape matches {name}"
    patch = shapes.get("trans_patch_conv.weight")
    cls = shapes.get("cls_token")
    clues = []
    if patch is not None:
        clues.append(f"trans_patch_conv.weight is {patch}, i.e. patch size {patch[-1] * 4}")
    if cls is not None:
        clues.append(f"embed_dim {cls[-1]}")
    if "conv_cls_head.weight" in shapes:
        clues.append(f"channel_ratio {shapes['conv_cls_head.weight'][-1] // 256}")
    return None, "no registered variant matches exactly" + (f" ({', '.join(clues)})" if clues else "")


def _mismatch_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool) -> str | None:
    expected = _shapes(model.state_dict())
    got = _shapes(state_dict)
    missing = sorted(expected.keys() - got.keys()) if strict else []
    unexpected = sorted(got.keys() - expected.keys()) if strict else []
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if not (missing or unexpected or wrong):
        return None
    lines = ["checkpoint does not fit the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                     f"{' ...' if len(unexpected) > 20 else ''}")
    for k in wrong[:20]:
        lines.append(f"  shape mismatch for {k}: checkpoint {got[k]}, model {expected[k]}")
    if len(wrong) > 20:
        lines.append(f"  ... and {len(wrong) - 20} more shape mismatches")
    ckpt_variant, why = guess_variant(state_dict)
    model_variant, _ = guess_variant(model.state_dict())
    lines.append(f"  the checkpoint looks like {ckpt_variant or 'no registered variant'} ({why}); "
                 f"the model is {model_variant or 'a custom configuration'}")
    return "\n".join(lines)


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, strict: bool = True):
    """Load a checkpoint into a reference or fast Conformer (they share state_dict keys).

    path_or_state_dict: a file path or a loaded dict in any layout :func:`read_state_dict` accepts.
    strict: as in ``load_state_dict``. Raises CheckpointMismatchError listing missing and unexpected
    keys and shape mismatches, and naming the variant the checkpoint looks like. Returns the
    ``load_state_dict`` result (missing / unexpected keys when strict=False).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}")
    state_dict = read_state_dict(path_or_state_dict)
    report = _mismatch_report(model, state_dict, strict)
    if report is not None:
        raise CheckpointMismatchError(report)
    return model.load_state_dict(state_dict, strict=strict)
