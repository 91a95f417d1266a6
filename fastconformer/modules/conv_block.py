"""The CNN branch's bottleneck with BatchNorm folded into its convolutions in eval mode.

In eval mode ``bn(conv(x)) == conv'(x)`` with ``w' = w * s`` and ``b' = beta - mean * s`` where
``s = gamma / sqrt(var + eps)`` (exact in real arithmetic). The folded weights are recomputed from
the live parameters and running statistics on every call, so nothing can go stale after
``train()``/``eval()`` switches, optimizer steps or ``load_state_dict``; only a model given to
:func:`~fastconformer.prepack_weights` keeps them, folded and packed for oneDNN per input shape,
rebuilt when a source changes (:func:`fold_sources`: the running statistics' version counters do
not move in a train-mode forward, ``num_batches_tracked``'s does). In train mode the block runs
the reference's ops unchanged (batch statistics, running-stat updates).

In float32 CPU inference (:func:`~fastconformer.dispatch.use_onednn`) conv3 + bn3 and the residual
add run as one oneDNN convolution accumulating into the residual's buffer, when that buffer is
scratch nobody reads again: the residual branch's own output, or a map the caller hands over
(:meth:`FusedConvBlock.forward_from_conv2`). The block's input is never written.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import use_onednn
from ..reference import ConvBlock
from .base import FusedModule
from .onednn import conv_registered_for_packing, onednn_conv_add_, onednn_conv_packed

__all__ = ["FusedConvBlock", "conv_bn", "fold_conv_bn", "fold_sources", "folds"]


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution equal to eval-mode ``bn(conv(x))``.

    Computed in float32 (or the parameters' dtype if wider) and returned in conv.weight's dtype
    and memory format; weight (C_out, C_in/groups, kh, kw), bias (C_out,)."""
    compute = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = bn.weight.to(compute) * torch.rsqrt(bn.running_var.to(compute) + bn.eps)
    shift = bn.bias.to(compute) - bn.running_mean.to(compute) * scale
    if conv.bias is not None:
        shift = shift + conv.bias.to(compute) * scale
    weight = conv.weight.to(compute) * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), shift.to(conv.weight.dtype)


def folds(bn: nn.BatchNorm2d) -> bool:
    """Whether :func:`conv_bn` folds ``bn`` (eval mode with running statistics): one functional
    convolution then, which no module hook sees."""
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def fold_sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, ...]:
    """The tensors :func:`fold_conv_bn` reads, and ``num_batches_tracked``: BatchNorm's kernel
    updates the running statistics in train mode without moving their version counters, while the
    module's forward counts every update in ``num_batches_tracked`` with an ``add_`` that does."""
    sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if bn.num_batches_tracked is not None:
        sources = (*sources, bn.num_batches_tracked)
    return sources if conv.bias is None else (*sources, conv.bias)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``: one folded convolution in eval mode (in float32 CPU inference with a packed
    folded weight where :func:`~fastconformer.prepack_weights` registered ``conv``), the two
    reference ops (modules) in train mode."""
    if not folds(bn):
        return bn(conv(x))
    if (not torch.compiler.is_compiling() and conv_registered_for_packing(conv)  # a dict lookup dynamo cannot trace
            and bn.affine and conv.padding_mode == "zeros" and x.dim() == 4):
        sources = fold_sources(conv, bn)
        if use_onednn(x, *(t for t in sources if t.is_floating_point())):
            y = onednn_conv_packed(x, conv, sources, bn.eps, lambda: fold_conv_bn(conv, bn))
            if y is not None:
                return y
    weight, bias = fold_conv_bn(conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class FusedConvBlock(FusedModule):
    """Drop-in for the reference ``ConvBlock`` (same constructor arguments and submodules, so the
    same state_dict; built as every fused module is: :class:`~fastconformer.modules.base.FusedModule`).

    ``forward(x, x_t=None, return_x_2=True)``: x (B, inplanes, H, W) -> x (B, outplanes, H', W')
    and, with return_x_2, conv2's activation (B, outplanes/4, H', W'); ``x_t`` (B, outplanes/4, H, W)
    is added to conv2's input. Any float dtype, NCHW or channels_last (the output keeps the
    input's memory format, as the reference's convolutions do).
    """

    reference = ConvBlock

    def _adopt(self, block: nn.Module) -> None:
        names = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3")
        self._require(block, names)
        for name in names:
            setattr(self, name, getattr(block, name))
        self.res_conv = bool(getattr(block, "res_conv", False))
        if self.res_conv:
            self.residual_conv = block.residual_conv
            self.residual_bn = block.residual_bn
        self.drop_block = getattr(block, "drop_block", None)
        self.drop_path = getattr(block, "drop_path", None)

    def _conv_bn(self, x, conv, bn):
        if self.drop_block is not None:  # DropBlock sits between BN and ReLU: keep the reference order
            return self.drop_block(bn(conv(x)))
        return conv_bn(x, conv, bn)

    def forward(self, x, x_t=None, return_x_2=True):
        h = self.act1(self._conv_bn(x, self.conv1, self.bn1))
        return self.forward_from_conv2(h if x_t is None else h + x_t, x, return_x_2)

    def forward_from_conv2(self, h: torch.Tensor, residual: torch.Tensor, return_x_2: bool = True,
                           residual_is_scratch: bool = False):
        """The block from conv2 on: conv2's input h (B, outplanes/4, H, W) and the block's input
        ``residual`` (B, inplanes, H, W) -> as :meth:`forward` (the fusion block of a
        :class:`~fastconformer.modules.conv_trans_block.FusedConvTransBlock` computes h its own way).
        ``residual_is_scratch``: nobody reads ``residual`` after this call, so the output may be
        summed into its buffer (and returned in it)."""
        x2 = self.act2(self._conv_bn(h, self.conv2, self.bn2))
        if self.res_conv:  # the residual branch's output is this block's own, unless its modules (and hooks) ran
            residual_is_scratch = folds(self.residual_bn)
            residual = conv_bn(residual, self.residual_conv, self.residual_bn)
        if residual_is_scratch and self._sums_into(residual, x2):
            x = onednn_conv_add_(residual, x2, *fold_conv_bn(self.conv3, self.bn3), self.conv3)
        else:
            x = self._conv_bn(x2, self.conv3, self.bn3)
            if self.drop_path is not None:
                x = self.drop_path(x)
            x += residual
        x = self.act3(x)
        if return_x_2:
            return x, x2
        return x

    def _sums_into(self, residual: torch.Tensor, x2: torch.Tensor) -> bool:
        """Whether conv3 + bn3 + residual may run as :func:`onednn_conv_add_` into ``residual``:
        float32 CPU inference (:func:`use_onednn`), bn3 foldable, no DropBlock or active DropPath
        between them, a 1x1 stride-1 unpadded conv3, and ``residual`` of its output's shape and of
        x2's memory format (the layout the output would have)."""
        conv, bn = self.conv3, self.bn3
        if (not folds(bn) or not bn.affine or self.drop_block is not None
                or (self.drop_path is not None and self.drop_path.training)):
            return False
        if (conv.kernel_size, conv.stride, conv.padding, conv.padding_mode) != ((1, 1), (1, 1), (0, 0), "zeros"):
            return False
        if residual.shape != (x2.shape[0], conv.out_channels, *x2.shape[2:]):
            return False
        layout = torch.channels_last if x2.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if not (x2.is_contiguous(memory_format=layout) and residual.is_contiguous(memory_format=layout)):
            return False
        sources = [x2, residual, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return use_onednn(*sources, *([] if conv.bias is None else [conv.bias]))
