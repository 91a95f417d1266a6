"""The reference Conformer: plain PyTorch, the oracle every fused path is checked against.

A faithful re-implementation of the official Conformer (Peng et al., ICCV 2021,
github.com/pengzhiliang/Conformer, ``conformer.py``): the same module tree, state_dict keys
and shapes, eps values, initialisation, module construction order (so a fixed seed draws the
same weights) and the same order of floating-point operations. No kernels, no shortcuts.

Shapes use B = batch, C = CNN channels, D = embed_dim, N = number of patch tokens.
"""

from __future__ import annotations

import numbers
import operator
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .features import FeatureInfo, take_indices

__all__ = [
    "check_image_batch",
    "drop_path",
    "DropPath",
    "Mlp",
    "Attention",
    "Block",
    "ConvBlock",
    "FCUDown",
    "FCUUp",
    "Med_ConvBlock",
    "ConvTransBlock",
    "Conformer",
    "ConformerFeatures",
    "default_out_indices",
]


def check_image_batch(x, in_chans: int, patch_size: int, weight_dtype: torch.dtype | None = None) -> None:
    """Raise TypeError/ValueError unless x is a floating (B, in_chans, H, W) tensor with H and W
    positive multiples of patch_size, of ``weight_dtype`` (the model's) unless autocast is on."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32, float16 or bfloat16), got {x.dtype}; "
                        "convert images with .float() and normalise them first")
    if weight_dtype is not None and x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x is {x.dtype} but the model's weights are {weight_dtype}: convert one to the other "
                        "(x.to(...) or model.to(...)) or run under torch.autocast")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"x must have {in_chans} channels in dim 1 (B, {in_chans}, H, W), got shape "
                         f"{tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H == 0 or W == 0 or H % patch_size or W % patch_size:
        raise ValueError(f"x's height and width must be positive multiples of the patch size {patch_size}, "
                         f"got {H}x{W}")


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample: zero whole samples with probability ``drop_prob`` and
    rescale the kept ones by 1 / (1 - drop_prob). Identity in eval mode or when drop_prob is 0.

    The draw and the order of operations are those of timm 0.3.2, the version the official
    repository pins: one ``torch.rand`` of shape (B, 1, ...) in x's dtype, mask
    ``floor(keep_prob + rand)``, output ``x.div(keep_prob) * mask``. Later timm versions draw with
    ``bernoulli_`` and scale the mask instead, which gives other masks and values for the same seed.
    With ``drop_prob`` 1 every sample is zeroed (timm 0.3.2 returns NaN there).
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = (keep_prob + torch.rand(mask_shape, dtype=x.dtype, device=x.device)).floor_()
    if keep_prob == 0.0:  # every sample dropped: zeros, where timm's x.div(0) * 0 gives NaN
        return x * mask
    return x.div(keep_prob) * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout on (..., in_features)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, dim) with an explicit (B, heads, N, N) score matrix."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        # As in the official code, a falsy qk_scale (None or 0) means head_dim ** -0.5.
        self.scale = qk_scale or head_dim**-0.5

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)

        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def _layer_norm_1e6(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def _batch_norm_1e6(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-6)


class Block(nn.Module):
    """Pre-norm transformer block on (B, N, dim): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=_layer_norm_1e6):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ConvBlock(nn.Module):
    """ResNet bottleneck on (B, inplanes, H, W) -> (B, outplanes, H/stride, W/stride).

    ``forward(x, x_t)`` adds ``x_t`` (B, outplanes/4, H, W) to conv2's input (the fusion block's
    coupling); with ``return_x_2`` it also returns conv2's activation x2 (B, outplanes/4, H', W').
    """

    def __init__(self, inplanes, outplanes, stride=1, res_conv=False, act_layer=nn.ReLU, groups=1,
                 norm_layer=_batch_norm_1e6, drop_block=None, drop_path=None):
        super().__init__()
        expansion = 4
        med_planes = outplanes // expansion

        self.conv1 = nn.Conv2d(inplanes, med_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = norm_layer(med_planes)
        self.act1 = act_layer(inplace=True)

        self.conv2 = nn.Conv2d(med_planes, med_planes, kernel_size=3, stride=stride, groups=groups, padding=1,
                               bias=False)
        self.bn2 = norm_layer(med_planes)
        self.act2 = act_layer(inplace=True)

        self.conv3 = nn.Conv2d(med_planes, outplanes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.act3 = act_layer(inplace=True)

        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, padding=0, bias=False)
            self.residual_bn = norm_layer(outplanes)

        self.res_conv = res_conv
        self.drop_block = drop_block
        self.drop_path = drop_path

    def zero_init_last_bn(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x, x_t=None, return_x_2=True):
        residual = x

        x = self.conv1(x)
        x = self.bn1(x)
        if self.drop_block is not None:
            x = self.drop_block(x)
        x = self.act1(x)

        x = self.conv2(x) if x_t is None else self.conv2(x + x_t)
        x = self.bn2(x)
        if self.drop_block is not None:
            x = self.drop_block(x)
        x2 = self.act2(x)

        x = self.conv3(x2)
        x = self.bn3(x)
        if self.drop_block is not None:
            x = self.drop_block(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.res_conv:
            residual = self.residual_conv(residual)
            residual = self.residual_bn(residual)

        x += residual
        x = self.act3(x)

        if return_x_2:
            return x, x2
        return x


class FCUDown(nn.Module):
    """Feature Coupling Unit, CNN -> transformer ("squeeze").

    ``forward(x, x_t)``: x (B, inplanes, H, W), x_t (B, 1+N, outplanes) -> (B, 1+N, outplanes) with
    N = (H/dw_stride)(W/dw_stride): 1x1 conv, average pool, LayerNorm (eps 1e-6), GELU, and x_t's
    cls row prepended.
    """

    def __init__(self, inplanes, outplanes, dw_stride, act_layer=nn.GELU, norm_layer=_layer_norm_1e6):
        super().__init__()
        self.dw_stride = dw_stride

        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=1, padding=0)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)

        self.ln = norm_layer(outplanes)
        self.act = act_layer()

    def forward(self, x, x_t):
        x = self.conv_project(x)  # (B, D, H, W)

        x = self.sample_pooling(x).flatten(2).transpose(1, 2)
        x = self.ln(x)
        x = self.act(x)

        x = torch.cat([x_t[:, 0][:, None, :], x], dim=1)
        return x


class FCUUp(nn.Module):
    """Feature Coupling Unit, transformer -> CNN ("expand").

    ``forward(x, H, W)``: x (B, 1+H*W, inplanes) -> (B, outplanes, H*up_stride, W*up_stride): drop the
    cls row, 1x1 conv, BatchNorm (eps 1e-6), ReLU, nearest upsampling by up_stride.
    """

    def __init__(self, inplanes, outplanes, up_stride, act_layer=nn.ReLU, norm_layer=_batch_norm_1e6):
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=1, padding=0)
        self.bn = norm_layer(outplanes)
        self.act = act_layer()

    def forward(self, x, H, W):
        B, _, C = x.shape
        x_r = x[:, 1:].transpose(1, 2).reshape(B, C, H, W)
        x_r = self.act(self.bn(self.conv_project(x_r)))
        return F.interpolate(x_r, size=(H * self.up_stride, W * self.up_stride))


class Med_ConvBlock(ConvBlock):
    """Bottleneck without downsampling, (B, C, H, W) -> (B, C, H, W); ``num_med_block`` of them may
    follow the transformer block inside a ConvTransBlock (0 in every published variant). The
    official class spells out the same layers, in the same order, as a stride-1 ConvBlock with
    outplanes = inplanes and an identity residual."""

    def __init__(self, inplanes, act_layer=nn.ReLU, groups=1, norm_layer=_batch_norm_1e6, drop_block=None,
                 drop_path=None):
        super().__init__(inplanes, inplanes, stride=1, res_conv=False, act_layer=act_layer, groups=groups,
                         norm_layer=norm_layer, drop_block=drop_block, drop_path=drop_path)

    def forward(self, x):
        return super().forward(x, return_x_2=False)


class ConvTransBlock(nn.Module):
    """One Conformer stage block: CNN bottleneck, squeeze, transformer block, expand, fusion bottleneck.

    ``forward(x, x_t)``: x (B, inplanes, H, W), x_t (B, 1+N, embed_dim) ->
    (x (B, outplanes, H', W'), x_t (B, 1+N, embed_dim)).
    """

    def __init__(self, inplanes, outplanes, res_conv, stride, dw_stride, embed_dim, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 last_fusion=False, num_med_block=0, groups=1):
        super().__init__()
        expansion = 4
        self.cnn_block = ConvBlock(inplanes=inplanes, outplanes=outplanes, res_conv=res_conv, stride=stride,
                                   groups=groups)

        if last_fusion:
            self.fusion_block = ConvBlock(inplanes=outplanes, outplanes=outplanes, stride=2, res_conv=True,
                                          groups=groups)
        else:
            self.fusion_block = ConvBlock(inplanes=outplanes, outplanes=outplanes, groups=groups)

        if num_med_block > 0:
            self.med_block = nn.ModuleList(
                [Med_ConvBlock(inplanes=outplanes, groups=groups) for _ in range(num_med_block)]
            )

        self.squeeze_block = FCUDown(inplanes=outplanes // expansion, outplanes=embed_dim, dw_stride=dw_stride)
        self.expand_block = FCUUp(inplanes=embed_dim, outplanes=outplanes // expansion, up_stride=dw_stride)
        self.trans_block = Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                 qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                                 drop_path=drop_path_rate)

        self.dw_stride = dw_stride
        self.embed_dim = embed_dim
        self.num_med_block = num_med_block
        self.last_fusion = last_fusion

    def forward(self, x, x_t):
        x, x2 = self.cnn_block(x)

        _, _, H, W = x2.shape

        x_st = self.squeeze_block(x2, x_t)

        x_t = self.trans_block(x_st + x_t)

        if self.num_med_block > 0:
            for m in self.med_block:
                x = m(x)

        x_t_r = self.expand_block(x_t, H // self.dw_stride, W // self.dw_stride)
        x = self.fusion_block(x, x_t_r, return_x_2=False)

        return x, x_t


def _drop_zero_width_heads(module: nn.Module, state_dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook: the keys of a zero-width head (the official code's
    ``conv_cls_head`` for ``num_classes=0``, a Linear(C, 0)) carry nothing, and a model built with
    ``num_classes=0`` holds its heads as ``nn.Identity``: such keys are dropped, not refused."""
    for head in ("conv_cls_head", "trans_cls_head"):
        if isinstance(getattr(module, head, None), nn.Identity):
            for key in (f"{prefix}{head}.weight", f"{prefix}{head}.bias"):
                if key in state_dict and state_dict[key].numel() == 0:
                    del state_dict[key]


def _checked_num_classes(num_classes: object) -> int:
    """num_classes as an int (NumPy integers too); ValueError for anything but an integer >= 0."""
    try:
        value = None if isinstance(num_classes, bool) else operator.index(num_classes)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no heads), got {num_classes!r}")
    return value


class Conformer(nn.Module):
    """The Conformer classifier.

    ``forward(x)``: x (B, in_chans, H, W), H and W multiples of ``patch_size`` ->
    ``[conv_logits, trans_logits]``, each (B, num_classes). Official evaluation scores their sum.

    The model has ``depth`` blocks, counted from 0 as timm counts them: block 0 is ``conv_1`` with
    ``trans_1``, block i >= 1 is ``conv_trans_{i + 1}``. :meth:`forward_intermediates` returns what
    any of them computes, :meth:`prune_intermediate_layers` drops what follows the last one needed.

    Options of the official detection backbone (off by default; neither changes the state_dict):
    ``norm_eval`` keeps every BatchNorm in eval mode while the model trains (running statistics
    used, never updated); ``frozen_stem`` keeps the stem's ``conv1`` and ``bn1`` out of training
    (no gradients, bn1 in eval mode), which is what the official ``frozen_stages >= 0`` freezes.
    Both are applied by :meth:`train`.
    """

    def __init__(self, patch_size=16, in_chans=3, num_classes=1000, base_channel=64, channel_ratio=4,
                 num_med_block=0, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eval=False,
                 frozen_stem=False):
        super().__init__()
        if depth % 3 != 0:
            raise ValueError(f"depth must be a multiple of 3, got {depth}")
        if patch_size % 16 != 0:
            raise ValueError(f"patch_size must be a multiple of 16 (the last stage pools by patch_size // 16), "
                             f"got {patch_size}")
        num_classes = _checked_num_classes(num_classes)
        for name, p in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                        ("drop_path_rate", drop_path_rate)):
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability, from 0 to 1; got {p!r}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.depth = depth
        self.norm_eval = norm_eval
        self.frozen_stem = frozen_stem

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.trans_dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]

        # Classifier heads
        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pooling = nn.AdaptiveAvgPool2d(1)
        # official: a zero-width Linear for num_classes=0; an Identity as for trans_cls_head and in
        # reset_classifier(0) (timm's convention: the pooled features; no state_dict keys to match)
        self.conv_cls_head = nn.Linear(int(256 * channel_ratio), num_classes) if num_classes > 0 else nn.Identity()

        # Stem: (B, 3, H, W) -> (B, 64, H/4, W/4)
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Stage 1
        stage_1_channel = int(base_channel * channel_ratio)
        trans_dw_stride = patch_size // 4
        self.conv_1 = ConvBlock(inplanes=64, outplanes=stage_1_channel, res_conv=True, stride=1)
        self.trans_patch_conv = nn.Conv2d(64, embed_dim, kernel_size=trans_dw_stride, stride=trans_dw_stride,
                                          padding=0)
        self.trans_1 = Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                             qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                             drop_path=self.trans_dpr[0])

        block_kwargs = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                            num_med_block=num_med_block)

        # Stage 2: blocks 2 .. depth/3, full resolution
        init_stage = 2
        fin_stage = depth // 3 + 1
        for i in range(init_stage, fin_stage):
            self.add_module(f"conv_trans_{i}", ConvTransBlock(
                stage_1_channel, stage_1_channel, False, 1, dw_stride=trans_dw_stride,
                drop_path_rate=self.trans_dpr[i - 1], **block_kwargs))

        # Stage 3: the first block halves the resolution
        stage_2_channel = int(base_channel * channel_ratio * 2)
        init_stage = fin_stage
        fin_stage = fin_stage + depth // 3
        for i in range(init_stage, fin_stage):
            first = i == init_stage
            self.add_module(f"conv_trans_{i}", ConvTransBlock(
                stage_1_channel if first else stage_2_channel, stage_2_channel, first, 2 if first else 1,
                dw_stride=trans_dw_stride // 2, drop_path_rate=self.trans_dpr[i - 1], **block_kwargs))

        # Stage 4: the first block halves the resolution again, the last block's fusion halves it once more
        stage_3_channel = int(base_channel * channel_ratio * 2 * 2)
        init_stage = fin_stage
        fin_stage = fin_stage + depth // 3
        for i in range(init_stage, fin_stage):
            first = i == init_stage
            self.add_module(f"conv_trans_{i}", ConvTransBlock(
                stage_2_channel if first else stage_3_channel, stage_3_channel, first, 2 if first else 1,
                dw_stride=trans_dw_stride // 4, drop_path_rate=self.trans_dpr[i - 1],
                last_fusion=i == depth, **block_kwargs))
        self.fin_stage = fin_stage

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)
        self._register_load_state_dict_pre_hook(_drop_zero_width_heads, with_module=True)
        self.train()  # applies frozen_stem from the start

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)

    def train(self, mode: bool = True) -> "Conformer":
        """``nn.Module.train``, then the detection backbone's options (as the official backbone's
        ``train``): with ``frozen_stem``, bn1 in eval mode and conv1/bn1 without gradients; in
        training with ``norm_eval``, every BatchNorm in eval mode."""
        super().train(mode)
        if self.frozen_stem:
            self.bn1.eval()
            self.conv1.requires_grad_(False)
            self.bn1.requires_grad_(False)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    @torch.jit.ignore
    def no_weight_decay(self):
        """Parameter names the official training excludes from weight decay."""
        return {"cls_token"}

    @property
    def feature_info(self) -> list[dict]:
        """One dict per block, as timm's models list their stages: the CNN map's channels
        (``num_chs``), its ``reduction`` (input H / map H) and the ``module`` that produces it."""
        reduction = self.conv1.stride[0] * self.maxpool.stride
        infos = [dict(num_chs=self.conv_1.conv3.out_channels, reduction=reduction, module="conv_1")]
        for i in range(2, self.fin_stage):
            block = getattr(self, f"conv_trans_{i}")
            reduction *= block.cnn_block.conv2.stride[0] * block.fusion_block.conv2.stride[0]
            infos.append(dict(num_chs=block.fusion_block.conv3.out_channels, reduction=reduction,
                              module=f"conv_trans_{i}"))
        return infos

    def _blocks(self, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Run the model on x (B, in_chans, H, W), yielding after each block its CNN map
        (B, C, H / r, W / r) and its tokens (B, 1 + N, D), cls token first."""
        check_image_batch(x, self.in_chans, self.patch_size, self.conv1.weight.dtype)
        B = x.shape[0]
        cls_tokens = self.cls_token.expand(B, -1, -1)

        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))

        x = self.conv_1(x_base, return_x_2=False)

        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = torch.cat([cls_tokens, x_t], dim=1)
        x_t = self.trans_1(x_t)
        yield x, x_t

        for i in range(2, self.fin_stage):
            x, x_t = getattr(self, f"conv_trans_{i}")(x, x_t)
            yield x, x_t

    def _output_map(self, x_map: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A CNN map as the model returns it for the input x: here, as computed."""
        return x_map

    def forward_features(self, x):
        """x (B, in_chans, H, W) -> (CNN feature map (B, 256*channel_ratio, H/32, W/32),
        tokens (B, 1 + (H/patch)(W/patch), embed_dim), before trans_norm)."""
        for x_map, x_t in self._blocks(x):
            pass
        return self._output_map(x_map, x), x_t

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """What the blocks in ``indices`` compute, with timm's signature and semantics.

        x (B, in_chans, H, W) -> one tensor per block in ``indices``, in block order:
        ``output_fmt="NCHW"``: the CNN map after the block, (B, C, H / r, W / r) with C and r as in
        :attr:`feature_info`, in x's memory format; ``"NLC"``: the transformer tokens after the
        block, (B, 1 + N, D) with the cls token first, through ``trans_norm`` when ``norm`` (the CNN
        branch has no final norm: ``norm`` leaves NCHW maps as they are).

        indices: None (every block), n (the last n) or block indices (negative from the end).
        stop_early: run no block after the last one in ``indices`` (else all run, as in timm).
        Returns the list if ``intermediates_only``, else ``((map, tokens), list)`` with the pair
        after the last block run, as :meth:`forward_features` returns it (``forward_head`` takes it).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' (CNN maps) or 'NLC' (transformer tokens), got {output_fmt!r}")
        taken, last = take_indices(self.fin_stage - 1, indices)
        if not stop_early:
            last = self.fin_stage - 2
        intermediates = []
        for i, (x_map, x_t) in enumerate(self._blocks(x)):
            if i in taken:
                if output_fmt == "NCHW":
                    intermediates.append(self._output_map(x_map, x))
                else:
                    intermediates.append(self.trans_norm(x_t) if norm else x_t)
            if i == last:
                break
        if intermediates_only:
            return intermediates
        return (self._output_map(x_map, x), x_t), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (timm's semantics for ``indices``), with
        ``prune_head`` both heads (``reset_classifier(0)``) and with ``prune_norm`` trans_norm
        (each becomes ``nn.Identity``). Returns the sorted block indices."""
        taken, last = take_indices(self.fin_stage - 1, indices)
        for i in range(last + 2, self.fin_stage):
            delattr(self, f"conv_trans_{i}")
        self.fin_stage = last + 2
        if prune_norm:
            self.trans_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return taken

    def reset_classifier(self, num_classes: int) -> None:
        """New heads for ``num_classes`` classes: conv_cls_head (C -> num_classes) and
        trans_cls_head (D -> num_classes), initialised as the constructor initialises them
        (truncated normal, std 0.02, zero bias) on cls_token's device and dtype, in the model's
        train/eval mode; 0 makes both ``nn.Identity`` (forward_head then returns its pre-logits
        features), as ``num_classes=0`` at construction does."""
        num_classes = _checked_num_classes(num_classes)
        self.num_classes = num_classes
        if num_classes == 0:
            self.conv_cls_head, self.trans_cls_head = nn.Identity(), nn.Identity()
        else:
            factory = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
            self.conv_cls_head = nn.Linear(self.feature_info[-1]["num_chs"], num_classes, **factory)
            self.trans_cls_head = nn.Linear(self.embed_dim, num_classes, **factory)
            self.conv_cls_head.apply(self._init_weights)
            self.trans_cls_head.apply(self._init_weights)
        for head in (self.conv_cls_head, self.trans_cls_head):
            head.train(self.training)

    def forward_head(self, x, x_t=None, *, pre_logits: bool = False):
        """Feature map and tokens from :meth:`forward_features` (the pair, or the two) ->
        [conv_logits (B, num_classes), trans_logits (B, num_classes)]; with ``pre_logits`` the
        heads' inputs instead: [pooled map (B, C), cls token through trans_norm (B, D)]."""
        if x_t is None:
            if not isinstance(x, (tuple, list)) or len(x) != 2:
                raise TypeError("forward_head takes the (feature map, tokens) pair that forward_features returns, "
                                f"or the two; got {type(x).__name__}")
            x, x_t = x
        x_p = self.pooling(x).flatten(1)
        x_t = self.trans_norm(x_t)
        if pre_logits:
            return [x_p, x_t[:, 0]]
        conv_cls = self.conv_cls_head(x_p)
        tran_cls = self.trans_cls_head(x_t[:, 0])
        return [conv_cls, tran_cls]

    def forward(self, x):
        x, x_t = self.forward_features(x)
        return self.forward_head(x, x_t)


def default_out_indices(depth: int = 12) -> tuple[int, ...]:
    """The official detection backbone's taps as block indices: the last block of the second and
    third stages, the last two blocks (``conv_trans_4, 8, 11, 12``, i.e. 3, 7, 10, 11 for depth 12:
    strides 4, 8, 16, 32)."""
    return tuple(dict.fromkeys((depth // 3 - 1, 2 * depth // 3 - 1, depth - 2, depth - 1)))


class ConformerFeatures(Conformer):
    """The Conformer as a multi-scale CNN backbone: the official repository's detection backbone
    (``mmdetection/mmdet/models/backbones/Conformer.py``) with selectable taps.

    ``forward(x)``: x (B, in_chans, H, W) -> list of CNN maps, one per block in ``out_indices``
    (block indices, or n for the last n; default :func:`default_out_indices`: for Conformer-S 256,
    512, 1024, 1024 channels at strides 4, 8, 16, 32), in x's memory format; :attr:`feature_info`
    describes them. Built as the classifier is (so a seed draws the same weights), then pruned: no
    heads, no trans_norm, no block after the last tap (``prune_intermediate_layers``). Every other
    argument is Conformer's.
    """

    def __init__(self, out_indices: int | Sequence[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        if out_indices is None:
            out_indices = default_out_indices(self.depth)
        self.out_indices = tuple(self.prune_intermediate_layers(out_indices, prune_norm=True, prune_head=True))

    @property
    def feature_info(self) -> FeatureInfo:
        """The maps :meth:`forward` returns: ``channels()``, ``reduction()``, ``module_name()``."""
        return FeatureInfo(super().feature_info, self.out_indices)

    def forward(self, x):
        return self.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True)
