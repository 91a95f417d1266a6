"""A ConvTransBlock whose expand and fusion-block input run fused.

``FusedConvTransBlock`` is a drop-in for ``ConvTransBlock`` (same constructor, submodule names
and state_dict). What changes is the coupling back into the CNN branch: the expand
(:class:`~fastconformer.modules.fcu_up.FusedFCUUp`) stops at its low-resolution
(B, C/4, H/dw_stride, W/dw_stride) map, and the fusion block's bn1 + ReLU + "+ x_t" runs as one
elementwise pass (:func:`~fastconformer.modules.fcu_up.bn_relu_add_upsampled`) reading that map
through the nearest-upsampling index map. The rest of the fusion block (conv2, bn2, ReLU, conv3,
bn3, the residual branch) runs with the fusion block's own submodules; cnn_block, squeeze_block,
trans_block and med_block run as whatever modules the block holds.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..reference import ConvTransBlock
from .conv_block import conv_bn
from .fcu_down import FusedFCUDown
from .fcu_up import FusedFCUUp, batch_norm_scale_shift, bn_relu_add_upsampled, syncs_across_processes

__all__ = ["FusedConvTransBlock"]


class FusedConvTransBlock(nn.Module):
    """Drop-in for ``ConvTransBlock``.

    ``forward(x, x_t)``: x (B, inplanes, H, W), x_t (B, 1 + N, embed_dim) ->
    (x (B, outplanes, H', W'), x_t (B, 1 + N, embed_dim)), as the reference."""

    def __init__(self, inplanes, outplanes, res_conv, stride, dw_stride, embed_dim, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 last_fusion=False, num_med_block=0, groups=1):
        super().__init__()
        # Built as the reference builds it (same construction order, so a seed draws the same weights).
        self._adopt(ConvTransBlock(inplanes, outplanes, res_conv, stride, dw_stride, embed_dim, num_heads=num_heads,
                                   mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
                                   attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                                   last_fusion=last_fusion, num_med_block=num_med_block, groups=groups))

    @classmethod
    def from_reference(cls, block: nn.Module) -> "FusedConvTransBlock":
        """A FusedConvTransBlock holding ``block``'s submodules (the same Parameter and buffer
        objects, no copies), its expand_block converted to FusedFCUUp. ``block`` is a
        ConvTransBlock of fastconformer.reference or of the official repository."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(block)
        return fused

    def _adopt(self, block: nn.Module) -> None:
        fusion = block.fusion_block
        if getattr(fusion, "drop_block", None) is not None:
            raise ValueError("FusedConvTransBlock: the fusion block's drop_block sits between bn1 and its ReLU, "
                             "which run fused; a fusion block with drop_block is not supported")
        if not isinstance(fusion.act1, nn.ReLU) or not isinstance(fusion.bn1, _BatchNorm):
            raise TypeError(f"FusedConvTransBlock: the fusion block's bn1 and act1 must be a BatchNorm and a ReLU "
                            f"(they run fused), got {fusion.bn1!r} and {fusion.act1!r}")
        # Registration order as in ConvTransBlock, so state_dict keys come in the same order.
        self.cnn_block = block.cnn_block
        self.fusion_block = fusion
        if block.num_med_block > 0:
            self.med_block = block.med_block
        self.squeeze_block = block.squeeze_block
        expand = block.expand_block
        self.expand_block = expand if isinstance(expand, FusedFCUUp) else FusedFCUUp.from_reference(expand)
        self.trans_block = block.trans_block
        self.dw_stride = block.dw_stride
        self.embed_dim = block.embed_dim
        self.num_med_block = block.num_med_block
        self.last_fusion = block.last_fusion
        self.train(block.training)

    def fusion_forward(self, x: torch.Tensor, x_t_low: torch.Tensor) -> torch.Tensor:
        """The fusion block's ``forward(x, upsample(x_t_low), return_x_2=False)`` with bn1, act1,
        the upsampling and the add fused: x (B, C, H, W), x_t_low (B, C/4, H/dw_stride, W/dw_stride)
        -> (B, C, H', W')."""
        fb = self.fusion_block
        residual = x
        x = fb.conv1(x)
        if syncs_across_processes(fb.bn1):
            x = fb.bn1(x)
            scale, shift = torch.ones(x.shape[1], device=x.device), torch.zeros(x.shape[1], device=x.device)
        else:
            scale, shift = batch_norm_scale_shift(fb.bn1, x)
        x = bn_relu_add_upsampled(x, scale, shift, x_t_low, self.dw_stride)
        x = fb.act2(conv_bn(x, fb.conv2, fb.bn2))
        x = conv_bn(x, fb.conv3, fb.bn3)
        if fb.drop_path is not None:
            x = fb.drop_path(x)
        if fb.res_conv:
            residual = conv_bn(residual, fb.residual_conv, fb.residual_bn)
        x += residual
        return fb.act3(x)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        x = self.fusion_forward(x, x_t_low)

        return x, x_t
