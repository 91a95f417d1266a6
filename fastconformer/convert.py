"""``convert(model)``: turn a reference Conformer (ours or one built by the official repository's
code) into the fast model in place, keeping every state_dict key.

What changes:
- every ConvTransBlock -> FusedConvTransBlock: fused squeeze (pool-first GEMM + LayerNorm + GELU,
  + x_t for the transformer's input), fused expand (GEMM + BatchNorm + ReLU at low resolution) and
  the fusion block's bn1 + ReLU + upsample-add in one pass;
- every transformer Block -> FusedBlock (residual adds fused with the next LayerNorm) holding a
  FusedAttention (flash-style kernel on CUDA; on the CPU SDPA, or in float32 inference one oneDNN
  Graph partition);
- every CNN bottleneck -> FusedConvBlock (BatchNorm folded into the convolutions in eval mode; in
  float32 CPU inference conv3 summed into the residual's buffer where that is the block's own);
- the stem's conv1 + bn1 folded in eval mode, and (``channels_last=True``) the CNN branch run in
  channels_last memory format (NCHW for training on the CPU).

Modules are matched by structure and attribute names, not by class.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .dispatch import check_environment
from .modules.conv_block import FusedConvBlock, conv_bn
from .modules.conv_trans_block import FusedConvTransBlock
from .modules.fcu_down import FusedFCUDown
from .modules.transformer import FusedBlock
from .reference import Conformer, ConformerFeatures, check_image_batch

__all__ = ["convert", "convert_conv_trans_block", "is_converted", "FastConformer", "FastConformerFeatures",
           "FastConformerMixin"]

_CONFORMER_ATTRS = ("cls_token", "conv1", "bn1", "act1", "maxpool", "conv_1", "trans_patch_conv", "trans_1",
                    "fin_stage", "pooling", "conv_cls_head", "trans_norm", "trans_cls_head")


class FastConformerMixin:
    """What a converted Conformer runs differently (mixed into the model's own class, so
    ``isinstance(model, Conformer)`` still holds and the official class works too): its blocks, run
    through the fused modules by :meth:`_blocks`, which the reference's ``forward``,
    ``forward_features`` and ``forward_intermediates`` consume."""

    channels_last = True  # set by convert()

    def _blocks(self, x):
        """The reference's ``_blocks`` (yield each block's CNN map and tokens) with the stem's
        conv1 + bn1 folded and the CNN branch in the layout :meth:`_cnn_channels_last` picks; maps
        come in that layout (:meth:`_output_map` gives them the input's)."""
        check_image_batch(x, self.conv1.in_channels, self.trans_patch_conv.kernel_size[0] * 4, self.conv1.weight.dtype)
        x = x.contiguous(memory_format=torch.channels_last if self._cnn_channels_last(x) else torch.contiguous_format)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x_base = self.maxpool(self.act1(conv_bn(x, self.conv1, self.bn1)))
        x = self.conv_1(x_base, return_x_2=False)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = self.trans_1(torch.cat([cls_tokens, x_t], dim=1))
        yield x, x_t
        for i in range(2, self.fin_stage):
            x, x_t = getattr(self, f"conv_trans_{i}")(x, x_t)
            yield x, x_t

    def _output_map(self, x_map: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x_map in the input x's memory format (channels_last for a channels_last x, else
        contiguous), as the reference returns its maps, whatever layout the CNN branch ran in."""
        return x_map.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)

    def _cnn_channels_last(self, x: torch.Tensor) -> bool:
        """Whether the CNN branch runs channels_last for input ``x``: as :func:`convert` chose,
        except in train mode on the CPU, where torch's channels_last BatchNorm backward is less
        precise than its NCHW one (the reference's own fp32 gradients would be the better ones)."""
        return self.channels_last and not (self.training and x.device.type == "cpu")


class FastConformer(FastConformerMixin, Conformer):
    """The class a converted :class:`fastconformer.reference.Conformer` takes (importable, so whole
    models pickle); build one with ``create_model(name, fast=True)`` or :func:`convert`."""


class FastConformerFeatures(FastConformerMixin, ConformerFeatures):
    """The class a converted :class:`fastconformer.reference.ConformerFeatures` takes; build one
    with ``create_model(name, features_only=True, fast=True)``."""


_FAST_CLASSES: dict[type, type] = {Conformer: FastConformer, ConformerFeatures: FastConformerFeatures}

# The official repository's Conformer writes its forward inline; converted, it runs these of the
# reference instead, which go through the mixin's _blocks.
_REFERENCE_FORWARDS = ("forward", "forward_features", "forward_head")


def _fast_class(cls: type) -> type:
    if issubclass(cls, FastConformerMixin):
        return cls
    if cls not in _FAST_CLASSES:
        forwards = {} if issubclass(cls, Conformer) else {n: getattr(Conformer, n) for n in _REFERENCE_FORWARDS}
        namespace = {"__module__": __name__, **forwards}
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (FastConformerMixin, cls), namespace)
    return _FAST_CLASSES[cls]


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`convert`."""
    return isinstance(model, FastConformerMixin)


def convert_conv_trans_block(block: nn.Module) -> FusedConvTransBlock:
    """One ConvTransBlock (ours or the official repository's) as :func:`convert` runs it: a
    :class:`FusedConvTransBlock` (which fuses the expand and the fusion block) whose cnn_block,
    squeeze and transformer block are the fused modules too (the same parameters)."""
    fused = FusedConvTransBlock.from_reference(block)
    fused.cnn_block = FusedConvBlock.from_reference(fused.cnn_block)
    fused.squeeze_block = FusedFCUDown.from_reference(fused.squeeze_block)
    fused.trans_block = FusedBlock.from_reference(fused.trans_block)
    return fused


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x is channels_last and not also contiguous (e.g. not a 1x1 map, which is both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _contiguous_conv_weights(module: nn.Module) -> None:
    # The layout of the CNN branch follows its input (FastConformerMixin._cnn_channels_last): with
    # channels_last weights a convolution would run channels_last whatever its input.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous()


def convert(model: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """Convert a Conformer to the fast model in place and return it.

    model: a :class:`fastconformer.reference.Conformer` or a model built by the official
    repository's ``Conformer`` (matched by structure). channels_last: run the CNN branch in
    channels_last memory format (faster convolutions on CPUs with oneDNN and on GPUs), except in
    train mode on the CPU, which always runs NCHW: torch's channels_last BatchNorm backward there
    is several times less precise than its NCHW one. Converting a converted model again only
    applies a new ``channels_last``. Parameters keep their identity (an optimizer built before
    conversion stays valid), convolution weights are stored contiguous (NCHW), and state_dict
    keys are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a Conformer), got {type(model).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    check_environment()  # here, not first inside a traced forward (torch.compile would bury the message)
    missing = [a for a in _CONFORMER_ATTRS if not hasattr(model, a)]
    if missing:
        raise TypeError(f"convert() expects a Conformer (reference or official); {type(model).__name__} lacks "
                        f"{', '.join(missing)}")
    model.conv_1 = FusedConvBlock.from_reference(model.conv_1)
    model.trans_1 = FusedBlock.from_reference(model.trans_1)
    for i in range(2, model.fin_stage):
        name = f"conv_trans_{i}"
        setattr(model, name, convert_conv_trans_block(getattr(model, name)))
    _contiguous_conv_weights(model)
    model.__class__ = _fast_class(type(model))
    model.channels_last = channels_last
    if getattr(model, "norm_eval", False) or getattr(model, "frozen_stem", False):
        model.train(model.training)  # the fused blocks set their BatchNorms' modes: reapply the model's options
    return model
