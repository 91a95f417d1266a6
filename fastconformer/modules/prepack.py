"""``prepack_weights``: oneDNN-packed copies of the weights a fast model's CPU inference reads
(:mod:`fastconformer.modules.onednn`), registered for a whole model."""

from __future__ import annotations

import torch
import torch.nn as nn

from .conv_block import FusedConvBlock, fold_sources
from .fcu_down import FusedFCUDown
from .onednn import (conv_registered_for_packing, packed_copies, register_conv_for_packing, register_for_packing,
                     registered_for_packing)
from .transformer import FusedBlock

__all__ = ["prepack_weights", "prepacked_weights", "weights_packed_now"]


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights the fused modules of ``model`` run through ``onednn_linear`` unchanged:
    the transformer blocks' four linear layers and the squeezes' 1x1 projections."""
    weights = []
    for module in model.modules():
        if isinstance(module, FusedBlock):
            weights += [module.attn.qkv.weight, module.attn.proj.weight, module.mlp.fc1.weight, module.mlp.fc2.weight]
        elif isinstance(module, FusedFCUDown):
            weights.append(module.conv_project.weight)
    return weights


def _folded_convs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The (convolution, BatchNorm) pairs ``model``'s fused path folds through ``conv_bn``: the
    stem's and those of every fused CNN bottleneck."""
    pairs = []
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(getattr(model, "bn1", None), nn.BatchNorm2d):
        pairs.append((model.conv1, model.bn1))
    for module in model.modules():
        if isinstance(module, FusedConvBlock):
            pairs += [(module.conv1, module.bn1), (module.conv2, module.bn2), (module.conv3, module.bn3)]
            if module.res_conv:
                pairs.append((module.residual_conv, module.residual_bn))
    return [(conv, bn) for conv, bn in pairs if bn.affine and bn.track_running_stats]


def prepack_weights(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Keep oneDNN-packed copies of the weights ``model``'s fused modules read in CPU inference
    (``enabled``), or drop them (``enabled=False``); returns ``model``. Linear layers: float32, and
    bfloat16 under CPU autocast, each packed on first use. Convolutions with their BatchNorm folded
    (the stem's and the CNN bottlenecks', float32): packed for the input's shape and layout, which
    oneDNN's layout depends on, for the first four shapes each meets (so up to four copies of the
    CNN branch's weights; other shapes run unpacked).

    The packed copies are built on first use, live as long as their parameters and are not part
    of the state_dict; a copy of the model (``copy.deepcopy``) starts without them. See the module
    docstring of :mod:`fastconformer.modules.onednn` for when a packed copy is rebuilt (parameter
    version or storage changed) and when it is not (in-place writes through ``.data``: call this
    again). Autograd and CUDA tensors never read them: the fused path steps aside wherever a
    gradient could flow. ValueError for parameters created under ``torch.inference_mode``, or for a
    model without fused modules (the reference model: convert it first)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepack_weights takes an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"prepack_weights(enabled) takes a bool, got {type(enabled).__name__}")
    weights = _linear_weights(model)
    if enabled and not weights:
        raise ValueError(f"prepack_weights: {type(model).__name__} holds no fused transformer block or squeeze whose "
                         "weights it could pack; pass the fast model (fastconformer.convert(model), or "
                         "create_model(..., fast=True))")
    for weight in weights:
        register_for_packing(weight, enabled)
    for conv, bn in _folded_convs(model):
        register_conv_for_packing(conv, fold_sources(conv, bn), enabled)
    return model


def _registered(model: nn.Module) -> list[torch.Tensor | nn.Conv2d]:
    """``model``'s linear weights and convolutions that :func:`prepack_weights` registered."""
    return ([weight for weight in _linear_weights(model) if registered_for_packing(weight)]
            + [conv for conv, _ in _folded_convs(model) if conv_registered_for_packing(conv)])


def prepacked_weights(model: nn.Module) -> int:
    """How many of ``model``'s weights :func:`prepack_weights` registered (linear and convolution)."""
    return len(_registered(model))


def weights_packed_now(model: nn.Module) -> int:
    """How many of ``model``'s registered weights hold a packed copy now (copies are built on first
    use: after a CPU inference forward, those it read packed)."""
    return sum(packed_copies(owner) > 0 for owner in _registered(model))
