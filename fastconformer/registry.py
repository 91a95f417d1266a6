"""The registry of Conformer variants and the builder above the checkpoint reader (timm style):
``create_model(name)``, ``list_models()``, ``load_checkpoint(model, path)`` and ``guess_variant``."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from .checkpoint import CheckpointMismatchError, mismatch_report, read_state_dict
from .reference import Conformer

__all__ = ["VARIANTS", "Variant", "create_model", "guess_variant", "list_models", "load_checkpoint", "resolve_name"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A published Conformer configuration: its official constructor arguments and size."""

    name: str
    kwargs: dict
    num_params: int
    top1: float  # official ImageNet-1k top-1 (%), 224x224


_COMMON = dict(depth=12, mlp_ratio=4, qkv_bias=True)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("conformer_tiny_patch16", dict(patch_size=16, channel_ratio=1, embed_dim=384, num_heads=6, **_COMMON),
                23_524_704, 81.3),
        Variant("conformer_small_patch16", dict(patch_size=16, channel_ratio=4, embed_dim=384, num_heads=6, **_COMMON),
                37_673_424, 83.4),
        Variant("conformer_small_patch32", dict(patch_size=32, channel_ratio=4, embed_dim=384, num_heads=6, **_COMMON),
                38_853_072, 82.0),
        Variant("conformer_base_patch16", dict(patch_size=16, channel_ratio=6, embed_dim=576, num_heads=9, **_COMMON),
                83_289_136, 84.1),
    )
}


def list_models() -> list[str]:
    """The registered variant names, smallest first."""
    return list(VARIANTS)


def resolve_name(name: str) -> str:
    """The registered spelling of ``name``; the official spellings (``Conformer_small_patch16``) are accepted."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(VARIANTS)}")
    return key


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


@functools.cache
def _variant_shapes() -> dict[str, dict[str, tuple]]:
    with torch.device("meta"):
        return {name: _shapes(Conformer(**v.kwargs).state_dict()) for name, v in VARIANTS.items()}


def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> tuple[str | None, str]:
    """(variant name or None, a sentence on why) for a state_dict in the official layout.

    Classifier heads (checkpoints fine-tuned to other class counts still match) and BatchNorm's
    ``num_batches_tracked`` counters (old checkpoints lack them) are ignored."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"guess_variant takes a state_dict (a mapping of names to tensors) in the official layout, "
                        f"got {type(state_dict).__name__}; read a checkpoint file with read_state_dict(path) first")
    shapes = _shapes(state_dict)

    def body(layout: dict[str, tuple]) -> dict[str, tuple]:
        return {k: s for k, s in layout.items()
                if not k.startswith(("trans_cls_head.", "conv_cls_head.")) and not k.endswith(".num_batches_tracked")}

    for name, expected in _variant_shapes().items():
        if body(shapes) == body(expected):
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



def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, strict: bool = True):
    """Load a checkpoint into a reference or fast Conformer (they share state_dict keys).

    path_or_state_dict: a file path or a loaded dict in any layout
    :func:`fastconformer.checkpoint.read_state_dict` accepts. strict: as in ``load_state_dict``,
    whose rules decide what fits. Raises CheckpointMismatchError, leaving the model untouched,
    listing missing and unexpected keys (strict=True) and size mismatches, and naming the variant
    the checkpoint looks like. Returns the ``load_state_dict`` result (missing / unexpected keys
    when strict=False).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state_dict = read_state_dict(path_or_state_dict)
    problems = mismatch_report(model, state_dict, strict)
    if problems:
        ckpt_variant, why = guess_variant(state_dict)
        model_variant, _ = guess_variant(model.state_dict())
        problems.append(f"the checkpoint looks like {ckpt_variant or 'no registered variant'} ({why}); "
                        f"the model is {model_variant or 'a custom configuration'}")
        raise CheckpointMismatchError("\n  ".join(["checkpoint does not fit the model:", *problems]))
    return model.load_state_dict(state_dict, strict=strict)


def create_model(name: str, *, pretrained: str | os.PathLike | Mapping | None = None, fast: bool = False,
                 **overrides: Any) -> nn.Module:
    """Build a Conformer variant.

    name: one of :func:`list_models` (official spellings accepted). pretrained: None (random
    weights) or a checkpoint path or loaded state_dict (any layout :func:`fastconformer.load_checkpoint`
    reads), loaded with strict=True; nothing is downloaded. fast: True returns the fused model
    (reference + :func:`fastconformer.convert`). overrides: any other Conformer constructor argument
    (num_classes, drop_path_rate, qk_scale, num_med_block, ...).
    """
    variant = VARIANTS[resolve_name(name)]
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be True or False, got {fast!r}")
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike, Mapping, type(None))):
        got = repr(pretrained) if isinstance(pretrained, bool) else type(pretrained).__name__
        raise TypeError(f"pretrained must be a checkpoint path, a state_dict or None (random weights), got {got}: "
                        f"fastconformer downloads no weights, pass the official or an MMPretrain checkpoint file")
    model = Conformer(**{**variant.kwargs, **overrides})
    if pretrained is not None:
        load_checkpoint(model, pretrained, strict=True)
    if fast:
        from .convert import convert

        convert(model)
    return model
