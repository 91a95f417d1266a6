"""``convert(model)``: turn a reference Conformer (ours or one built by the official repository's
code) into the fast model in place, keeping every state_dict key.

What changes:
- every ConvTransBlock -> FusedConvTransBlock: fused squeeze (pool-first GEMM + LayerNorm + GELU,
  + x_t for the transformer's input), fused expand (GEMM + BatchNorm + ReLU at low resolution) and
  the fusion block's bn1 + ReLU + upsample-add in one pass;
- every transformer Block -> FusedBlock (residual adds fused with the next LayerNorm) holding a
  FusedAttention (flash-style kernel on CUDA, SDPA elsewhere);
- every CNN bottleneck -> FusedConvBlock (BatchNorm folded into the convolutions in eval mode);
- the stem's conv1 + bn1 folded in eval mode, and (``channels_last=True``) the CNN branch run in
  channels_last memory format (NCHW for training on the CPU).

Modules are matched by structure and attribute names, not by class.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .modules.conv_block import FusedConvBlock, conv_bn
from .modules.conv_trans_block import FusedConvTransBlock
from .modules.fcu_down import FusedFCUDown
from .modules.transformer import FusedBlock
from .reference import Conformer, check_image_batch

__all__ = ["convert", "convert_conv_trans_block", "is_converted", "FastConformer", "FastConformerMixin"]

_CONFORMER_ATTRS = ("cls_token", "conv1", "bn1", "act1", "maxpool", "conv_1", "trans_patch_conv", "trans_1",
                    "fin_stage", "pooling", "conv_cls_head", "trans_norm", "trans_cls_head")


class FastConformerMixin:
    """forward / forward_features of a converted Conformer (mixed into the model's own class, so
    ``isinstance(model, Conformer)`` still holds and the official class works too)."""

    channels_last = True  # set by convert()

    def forward_features(self, x):
        """x (B, in_chans, H, W) -> (CNN feature map (B, C, H/32, W/32), tokens (B, 1+N, D)). The
        map has x's memory format (channels_last for a channels_last x, else contiguous), as the
        reference's, whatever layout the CNN branch ran in."""
        check_image_batch(x, self.conv1.in_channels, self.trans_patch_conv.kernel_size[0] * 4)
        out_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        x = x.contiguous(memory_format=torch.channels_last if self._cnn_channels_last(x) else torch.contiguous_format)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x_base = self.maxpool(self.act1(conv_bn(x, self.conv1, self.bn1)))
        x = self.conv_1(x_base, return_x_2=False)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = self.trans_1(torch.cat([cls_tokens, x_t], dim=1))
        for i in range(2, self.fin_stage):
            x, x_t = getattr(self, f"conv_trans_{i}")(x, x_t)
        return x.contiguous(memory_format=out_format), x_t

    def _cnn_channels_last(self, x: torch.Tensor) -> bool:
        """Whether the CNN branch runs channels_last for input ``x``: as :func:`convert` chose,
        except in train mode on the CPU, where torch's channels_last BatchNorm backward is less
        precise than its NCHW one (the reference's own fp32 gradients would be the better ones)."""
        return self.channels_last and not (self.training and x.device.type == "cpu")

    def forward_head(self, x, x_t):
        """Feature map and tokens -> [conv_logits, trans_logits], as the reference."""
        conv_cls = self.conv_cls_head(self.pooling(x).flatten(1))
        tran_cls = self.trans_cls_head(self.trans_norm(x_t)[:, 0])
        return [conv_cls, tran_cls]

    def forward(self, x):
        return self.forward_head(*self.forward_features(x))


class FastConformer(FastConformerMixin, Conformer):
    """The class a converted :class:`fastconformer.reference.Conformer` takes (importable, so whole
    models pickle); build one with ``create_model(name, fast=True)`` or :func:`convert`."""


_FAST_CLASSES: dict[type, type] = {Conformer: FastConformer}


def _fast_class(cls: type) -> type:
    if issubclass(cls, FastConformerMixin):
        return cls
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (FastConformerMixin, cls), {"__module__": __name__})
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


def _is_channels_last(x: torch.Tensor) -> bool:
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
    return model
