"""The registry of Conformer variants and the builder above the checkpoint reader (timm style):
``create_model(name)``, ``list_models()``, ``load_checkpoint(model, path)``, ``load_pretrained``
(what ``create_model(pretrained=...)`` loads) and ``guess_variant``."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import os
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .checkpoint import CheckpointMismatchError, mismatch_report, read_state_dict
from .hub import default_pretrained_cfg, resolve_pretrained, unwrap_model
from .reference import Conformer, ConformerFeatures

__all__ = ["VARIANTS", "Pretrained", "Variant", "create_model", "guess_variant", "list_models", "load_checkpoint",
           "load_pretrained", "pretrained_variant", "read_pretrained", "resolve_name"]

log = logging.getLogger(__name__)


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


def list_models(filter: str | list[str] | tuple[str, ...] = "") -> list[str]:
    """The registered variant names, smallest first; with ``filter`` (a shell-style wildcard
    pattern such as ``"*tiny*"``, or a list of them), those matching one of them, as timm's
    ``list_models``."""
    patterns = [filter] if isinstance(filter, str) else filter
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"filter must be a pattern string or a list or tuple of them, got {filter!r}")
    patterns = [p.lower() for p in patterns if p]
    return [name for name in VARIANTS if not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)]


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
            classes = _checkpoint_classes(state_dict)
            if classes == 0:
                return name, f"every key and shape matches {name}, without classifier heads"
            heads = "" if classes == 1000 else f", with {classes}-class heads"
            return name, f"every key and shape matches {name}{heads}"
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


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A ``pretrained=`` source read once (:func:`read_pretrained`): its state_dict in the official
    layout, the pretrained_cfg travelling with it (or None) and where it came from.
    :func:`create_model`, :func:`load_pretrained` and :func:`pretrained_variant` take it in place of
    the source, without reading the file again."""

    state_dict: OrderedDict
    cfg: dict[str, Any] | None
    origin: str


def read_pretrained(source: str | os.PathLike | Mapping | Pretrained) -> Pretrained:
    """Read a ``pretrained=`` source (:func:`create_model`'s kinds) once; a :class:`Pretrained` comes back as it is."""
    if isinstance(source, Pretrained):
        return source
    origin = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the state_dict"
    resolved, cfg = resolve_pretrained(source)
    return Pretrained(read_state_dict(resolved), cfg, origin)


def pretrained_variant(source: str | os.PathLike | Mapping | Pretrained) -> str:
    """The registered variant whose keys and shapes a ``pretrained=`` source's state_dict matches
    (:func:`guess_variant`: heads of any size, or none, count as a match). ValueError, naming the
    architecture its pretrained_cfg records if any, when none matches: a custom configuration, or
    a features_only or pruned model's checkpoint, which only ``create_model`` with that model's
    arguments builds."""
    weights = read_pretrained(source)
    name, why = guess_variant(weights.state_dict)
    if name is not None:
        return name
    origin, architecture = weights.origin, (weights.cfg or {}).get("architecture")
    recorded = f"; its metadata records {architecture} with other arguments" if isinstance(architecture, str) else ""
    raise ValueError(f"cannot tell which registered variant {origin} holds ({why}{recorded}): a custom configuration "
                     f"or a features_only/pruned model's checkpoint, which create_model(name, <that model's "
                     f"arguments>, pretrained=...) loads")


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, strict: bool = True):
    """Load a checkpoint into a reference or fast Conformer (they share state_dict keys).

    path_or_state_dict: a file path or a loaded dict in any layout
    :func:`fastconformer.checkpoint.read_state_dict` accepts. strict: as in ``load_state_dict``,
    whose rules decide what fits. Raises CheckpointMismatchError, leaving the model untouched,
    listing missing and unexpected keys (strict=True) and size mismatches, and naming the variant
    the checkpoint looks like. Returns the ``load_state_dict`` result (missing / unexpected keys
    when strict=False). A wrapped model (``torch.compile``, DataParallel / DDP,
    :func:`~fastconformer.onednn_graph`) loads into the model it wraps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    state_dict = read_state_dict(path_or_state_dict)
    problems = mismatch_report(model, state_dict, strict)
    if problems:
        ckpt_variant, why = guess_variant(state_dict)
        model_variant, _ = guess_variant(model.state_dict())
        problems.append(f"the checkpoint looks like {ckpt_variant or 'no registered variant'} ({why}); "
                        f"the model is {model_variant or 'a custom configuration'}")
        classes, own = _checkpoint_classes(state_dict), getattr(model, "num_classes", None)
        if own is not None and classes != own:
            held = (f"its heads are for {classes} classes" if classes else "it has no classifier heads")
            if _has_heads(model):
                problems.append(f"{held}, the model's are for {own}: create_model(name, pretrained=...) builds the "
                                f"model for the checkpoint's {classes} classes, create_model(name, pretrained=..., "
                                f"num_classes={own}) gives it fresh heads for {own}")
            else:
                problems.append(f"{held} and the model none: create_model(name, pretrained=..., num_classes=0) or "
                                f"features_only=True leaves the checkpoint's heads out")
        raise CheckpointMismatchError("\n  ".join(["checkpoint does not fit the model:", *problems]))
    return model.load_state_dict(state_dict, strict=strict)


_HEADS = ("conv_cls_head", "trans_cls_head")


def _modules_not_held(model: nn.Module) -> set[str]:
    """Top-level modules of the classifier that ``model`` is built without: heads or trans_norm
    held as nn.Identity (features_only, prune_intermediate_layers, num_classes=0) and the blocks
    after its last one."""
    names = {n for n in ("trans_norm", *_HEADS) if isinstance(getattr(model, n), nn.Identity)}
    names.update(f"conv_trans_{i}" for i in range(model.fin_stage, model.depth + 1))
    return names


def _fit_to_model(model: nn.Module, state_dict: OrderedDict, origin: str, fit_heads: bool) -> OrderedDict:
    """state_dict without the keys of modules the model is built without, and (``fit_heads``)
    with the model's own head weights where the checkpoint's heads have another shape, so that
    a strict load takes every other key. Each change is logged in one line."""
    not_held = _modules_not_held(model)
    dropped = [k for k in state_dict if k.split(".", 1)[0] in not_held]
    if dropped:
        modules = ", ".join(dict.fromkeys(k.split(".", 1)[0] for k in dropped))
        log.warning(f"{origin}: {len(dropped)} keys not loaded, of modules this model is built without "
                    f"(features_only, pruned or num_classes=0): {modules}")
        fitted = OrderedDict((k, v) for k, v in state_dict.items() if k not in set(dropped))
        if hasattr(state_dict, "_metadata"):
            fitted._metadata = state_dict._metadata
        state_dict = fitted
    own = model.state_dict()
    heads = [h for h in _HEADS if fit_heads and f"{h}.weight" in own
             and (f"{h}.weight" not in state_dict or state_dict[f"{h}.weight"].shape != own[f"{h}.weight"].shape)]
    if heads:
        classes = _checkpoint_classes(state_dict)
        for key in (f"{h}.{p}" for h in heads for p in ("weight", "bias")):
            if key in own:
                state_dict[key] = own[key]
        held = f"the checkpoint's are for {classes} classes" if classes else "the checkpoint has none"
        log.warning(f"{origin}: {' and '.join(heads)} not loaded: {held}, the model's for {model.num_classes}; "
                    f"they keep their fresh initialisation")
    return state_dict


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping | Pretrained, *,
                    fit_heads: bool = False) -> None:
    """Load ``source`` into a model built by :func:`fastconformer.create_model`, strictly, as
    ``create_model(pretrained=source)`` does.

    source: a checkpoint path (``.safetensors`` or a torch.save file, any layout
    :func:`fastconformer.load_checkpoint` reads), a folder written by
    :func:`fastconformer.save_pretrained`, a loaded state_dict, or ``"hf-hub:ORG/REPO"``
    (:func:`fastconformer.hub.resolve_pretrained`), or one of these read by :func:`read_pretrained`.
    Keys of modules the model is built without (a features_only or pruned model's heads and
    blocks) are left out, saying so in one log line; with
    ``fit_heads`` (``create_model`` was given ``num_classes``) heads of another shape are left out
    too, as the official ``--finetune`` does, and heads the checkpoint lacks keep the model's, in one
    line. Everything else must fit (CheckpointMismatchError otherwise). The pretrained_cfg that
    travels with the weights, if any, becomes ``model.pretrained_cfg`` (with the model's own
    architecture and num_classes).
    """
    _load_read(model, read_pretrained(source), fit_heads=fit_heads)


def _checkpoint_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The number of classes of the checkpoint's heads; 0 if it has none (a model built with
    num_classes=0, features_only or pruned wrote it)."""
    for head in _HEADS:
        weight = state_dict.get(f"{head}.weight")
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return weight.shape[0]
    return 0


def _has_heads(model: nn.Module) -> bool:
    return not all(isinstance(getattr(model, h, None), (nn.Identity, type(None))) for h in _HEADS)


def _load_read(model: nn.Module, weights: Pretrained, fit_heads: bool) -> None:
    load_checkpoint(model, _fit_to_model(model, weights.state_dict, weights.origin, fit_heads), strict=True)
    if weights.cfg is not None:
        own = getattr(model, "pretrained_cfg", None) or default_pretrained_cfg(None, model.num_classes)
        model.pretrained_cfg = {**own, **weights.cfg, "architecture": own["architecture"],
                                "num_classes": model.num_classes}


def create_model(name: str, *, pretrained: str | os.PathLike | Mapping | Pretrained | None = None, fast: bool = False,
                 features_only: bool = False, out_indices: int | Sequence[int] | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a Conformer variant.

    name: one of :func:`list_models` (official spellings accepted). pretrained: None (random
    weights), a checkpoint path (``.safetensors`` or a torch.save file) or loaded state_dict (any
    layout :func:`fastconformer.load_checkpoint` reads), a folder written by
    :func:`fastconformer.save_pretrained`, ``"hf-hub:ORG/REPO"``, or any of these already read by
    :func:`read_pretrained`; loaded strictly by :func:`load_pretrained`, which leaves out what a
    features_only model has no place for and, when ``num_classes`` is given, heads of another
    shape or missing ones (one log line each). Without ``num_classes`` the model gets as many
    classes as the checkpoint's heads have (a checkpoint
    fine-tuned to 10 classes gives a 10-class model, a headless one a model without heads).
    fast: True returns the fused model (reference + :func:`fastconformer.convert`).
    features_only: True returns a :class:`~fastconformer.reference.ConformerFeatures`, whose forward
    gives the CNN maps of the blocks in ``out_indices`` (default: the official detection
    backbone's taps). overrides: any other Conformer constructor argument (num_classes,
    drop_path_rate, norm_eval, frozen_stem, ...). ``model.pretrained_cfg`` says how inputs are
    prepared (:func:`fastconformer.data.create_transform`).
    """
    variant = VARIANTS[resolve_name(name)]
    for flag, value in (("fast", fast), ("features_only", features_only)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the maps of a features_only=True model; for a classifier use "
                         "model.forward_intermediates(x, indices=...)")
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, os.PathLike, Mapping, Pretrained, type(None))):
        got = repr(pretrained) if isinstance(pretrained, bool) else type(pretrained).__name__
        raise TypeError(f"pretrained must be a checkpoint path, a state_dict, 'hf-hub:ORG/REPO' or None (random "
                        f"weights), got {got}: fastconformer has no default weights, name the official or an "
                        f"MMPretrain checkpoint file, or a Hub repository")
    kwargs = {**variant.kwargs, **overrides}
    model = ConformerFeatures(out_indices=out_indices, **kwargs) if features_only else Conformer(**kwargs)
    if pretrained is not None:
        weights = read_pretrained(pretrained)
        classes = _checkpoint_classes(weights.state_dict)
        if "num_classes" not in overrides and not features_only and classes != model.num_classes:
            model.reset_classifier(classes)  # a checkpoint fine-tuned to other classes (or headless) brings its own
    model.pretrained_cfg = default_pretrained_cfg(variant.name, model.num_classes)
    if pretrained is not None:
        _load_read(model, weights, fit_heads="num_classes" in overrides)
    if fast:
        from .convert import convert

        convert(model)
    return model
