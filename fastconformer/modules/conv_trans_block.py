"""A ConvTransBlock whose expand and fusion-block input run fused.

``FusedConvTransBlock`` is a drop-in for ``ConvTransBlock`` (same constructor, submodule names
and state_dict). What changes is the coupling back into the CNN branch: the expand
(:class:`~fastconformer.modules.fcu_up.FusedFCUUp`) stops at its low-resolution
(B, C/4, H/dw_stride, W/dw_stride) map, and the fusion block's bn1 + ReLU + "+ x_t" runs as one
elementwise pass (:func:`~fastconformer.modules.fcu_up.bn_relu_add_upsampled`) reading that map
through the nearest-upsampling index map. The rest of the fusion block (conv2, bn2, ReLU, conv3,
bn3, the residual branch) is :meth:`FusedConvBlock.forward_from_conv2`, which may sum into the
cnn_block's output map when nothing else can hold it (``_cnn_output_unobserved``);
cnn_block, squeeze_block, trans_block and med_block run as whatever modules the block holds.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..dispatch import exporting
from ..reference import ConvTransBlock
from .base import FusedModule, NotFusableError
from .conv_block import FusedConvBlock, conv_bn
from .fcu_down import FusedFCUDown
from .fcu_up import FusedFCUUp, batch_norm_scale_shift, bn_relu_add_upsampled, syncs_across_processes

__all__ = ["FusedConvTransBlock"]


class FusedConvTransBlock(FusedModule):
    """Drop-in for ``ConvTransBlock`` (same constructor arguments, submodule names and state_dict;
    built as every fused module is: :class:`~fastconformer.modules.base.FusedModule`).

    ``forward(x, x_t)``: x (B, inplanes, H, W), x_t (B, 1 + N, embed_dim) ->
    (x (B, outplanes, H', W'), x_t (B, 1 + N, embed_dim)), as the reference. Adopting a block
    makes its expand a :class:`FusedFCUUp` and its fusion block a :class:`FusedConvBlock` (whose
    tail from conv2 on it runs); cnn_block, squeeze_block, trans_block and med_block stay the
    modules the block holds (:func:`fastconformer.convert` fuses those too)."""

    reference = ConvTransBlock

    def _adopt(self, block: nn.Module) -> None:
        self._require(block, ("cnn_block", "fusion_block", "squeeze_block", "expand_block", "trans_block",
                              "dw_stride", "embed_dim", "num_med_block", "last_fusion"))
        fusion = block.fusion_block
        if getattr(fusion, "drop_block", None) is not None:
            raise NotFusableError("FusedConvTransBlock: the fusion block's drop_block sits between bn1 and its ReLU, "
                                  "which run fused; a fusion block with drop_block is not supported")
        if not isinstance(getattr(fusion, "act1", None), nn.ReLU) or not isinstance(getattr(fusion, "bn1", None),
                                                                                     _BatchNorm):
            raise NotFusableError(f"FusedConvTransBlock: the fusion block's bn1 and act1 must be a BatchNorm and a "
                                  f"ReLU (they run fused), got {getattr(fusion, 'bn1', None)!r} and "
                                  f"{getattr(fusion, 'act1', None)!r}")
        # Registration order as in ConvTransBlock, so state_dict keys come in the same order.
        self.cnn_block = block.cnn_block
        self.fusion_block = FusedConvBlock.from_reference(fusion)
        if block.num_med_block > 0:
            self.med_block = block.med_block
        self.squeeze_block = block.squeeze_block
        self.expand_block = FusedFCUUp.from_reference(block.expand_block)
        self.trans_block = block.trans_block
        self.dw_stride = block.dw_stride
        self.embed_dim = block.embed_dim
        self.num_med_block = block.num_med_block
        self.last_fusion = block.last_fusion

    def fusion_forward(self, x: torch.Tensor, x_t_low: torch.Tensor, x_is_scratch: bool = False) -> torch.Tensor:
        """The fusion block's ``forward(x, upsample(x_t_low), return_x_2=False)`` with bn1, act1,
        the upsampling and the add fused: x (B, C, H, W), x_t_low (B, C/4, H/dw_stride, W/dw_stride)
        -> (B, C, H', W'). ``x_is_scratch``: nobody reads x afterwards (the residual add may be
        written into it)."""
        fb = self.fusion_block
        if exporting():  # plain ops (ONNX): bn1 folded into conv1 as in every CNN block, a nearest Resize added
            h = F.relu(conv_bn(x, fb.conv1, fb.bn1)) + F.interpolate(x_t_low, scale_factor=self.dw_stride)
            return fb.forward_from_conv2(h, x, return_x_2=False)
        h = fb.conv1(x)
        if syncs_across_processes(fb.bn1):
            h = fb.bn1(h)
            scale, shift = torch.ones(h.shape[1], device=h.device), torch.zeros(h.shape[1], device=h.device)
        else:
            scale, shift = batch_norm_scale_shift(fb.bn1, h)
        h = bn_relu_add_upsampled(h, scale, shift, x_t_low, self.dw_stride)
        return fb.forward_from_conv2(h, x, return_x_2=False, residual_is_scratch=x_is_scratch)

    def _cnn_output_unobserved(self) -> bool:
        """Whether nothing but this block can hold the map cnn_block returns: a
        :class:`FusedConvBlock` returns a new map (never its input), no med_block sits between, and
        no hook that would see the map is registered: global forward hooks or pre-hooks, hooks or
        pre-hooks of cnn_block or any of its submodules (its output), of the fusion block's conv1
        (its input). :meth:`forward` asks before cnn_block runs and again after (a hook that removes
        itself, or one added on the way)."""
        if self.num_med_block > 0 or not isinstance(self.cnn_block, FusedConvBlock):
            return False
        if _global_forward_hooks or _global_forward_pre_hooks:
            return False
        modules = (*self.cnn_block.modules(), self.fusion_block.conv1)
        return not any(module._forward_hooks or module._forward_pre_hooks for module in modules)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unobserved = self._cnn_output_unobserved()
        x, x2 = self.cnn_block(x)

        _, _, H, W = x2.shape

        if isinstance(self.squeeze_block, FusedFCUDown):  # x_st + x_t straight from the squeeze kernel
            x_t = self.trans_block(self.squeeze_block(x2, x_t, add_x_t=True))
        else:
            x_t = self.trans_block(self.squeeze_block(x2, x_t) + x_t)

        if self.num_med_block > 0:
            for m in self.med_block:
                x = m(x)

        x_t_low = self.expand_block.forward_low_res(x_t, H // self.dw_stride, W // self.dw_stride)
        x = self.fusion_forward(x, x_t_low, x_is_scratch=unobserved and self._cnn_output_unobserved())

        return x, x_t
