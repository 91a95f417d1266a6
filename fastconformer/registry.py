"""The registry of Conformer variants (timm style): ``create_model(name)`` and ``list_models()``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch.nn as nn

from .reference import Conformer

__all__ = ["VARIANTS", "Variant", "create_model", "list_models", "resolve_name"]


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
        from .checkpoint import load_checkpoint

        load_checkpoint(model, pretrained, strict=True)
    if fast:
        from .convert import convert

        convert(model)
    return model
