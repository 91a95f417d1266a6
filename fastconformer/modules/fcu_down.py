"""The fused FCU squeeze (CNN -> transformer), a drop-in for :class:`fastconformer.reference.FCUDown`.

``fcu_down``: average pool first, then the 1x1 projection (pool and a 1x1 convolution commute, and
the bias passes through an average unchanged: dw_stride^2 fewer MACs and no (B, D, H, W)
intermediate), + bias, LayerNorm, exact GELU, written after x_t's cls row; optionally + x_t, the
transformer block's input in a ConvTransBlock (Triton kernel: ``fastconformer.kernels.fcu_down``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import exporting, fused_op, use_onednn
from ..reference import FCUDown
from .base import FusedModule, NotFusableError
from .onednn import onednn_linear

__all__ = ["FusedFCUDown", "check_fcu_down_inputs", "fcu_down"]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_dw_stride(dw_stride: object) -> None:
    if isinstance(dw_stride, bool) or not isinstance(dw_stride, int) or dw_stride < 1:
        raise ValueError(f"dw_stride must be a positive int, got {dw_stride!r}")


def check_fcu_down_inputs(x2: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int, eps: float = 0.0,
                          add_x_t: bool = False) -> None:
    """Raise ValueError (shapes, dw_stride) or TypeError (dtypes) for arguments :func:`fcu_down` cannot take."""
    _check_dw_stride(dw_stride)
    if weight.dim() not in (2, 4) or _shape(weight)[2:] not in ((), (1, 1)):
        raise ValueError(f"weight must be the 1x1 projection's (D, C_in, 1, 1) or (D, C_in) tensor, got shape "
                         f"{_shape(weight)}")
    D, C = weight.shape[:2]
    if x2.dim() != 4 or x2.shape[1] != C:
        raise ValueError(f"x2 must be a (B, C_in={C}, H, W) tensor, got shape {_shape(x2)}")
    B, _, H, W = x2.shape
    if H % dw_stride or W % dw_stride or H == 0 or W == 0:
        raise ValueError(f"x2's spatial size {H}x{W} must be positive and divisible by dw_stride={dw_stride}")
    N = (H // dw_stride) * (W // dw_stride)
    if _shape(x_t) != (B, N + 1, D):
        raise ValueError(f"x_t must be (B, 1 + N, D) = ({B}, {N + 1}, {D}) for x2 of shape {_shape(x2)} and "
                         f"dw_stride={dw_stride}, got shape {_shape(x_t)}")
    for name, p in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if _shape(p) != (D,):
            raise ValueError(f"{name} must have shape ({D},), got {_shape(p)}")
    if not torch.is_autocast_enabled(x2.device.type) and x2.dtype != weight.dtype:
        raise TypeError(f"x2 ({x2.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast")


@fused_op(triton_impl="fcu_down:fcu_down_triton", check=check_fcu_down_inputs)
def fcu_down(x2: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int, eps: float,
             add_x_t: bool = False) -> torch.Tensor:
    """The squeeze: x2 (B, C_in, H, W) (any layout), x_t (B, 1 + N, D), weight (D, C_in, 1, 1) or
    (D, C_in), bias / ln_weight / ln_bias (D,) -> (B, 1 + N, D), N = (H / dw_stride)(W / dw_stride):
    row 0 is x_t[:, 0], rows 1.. are GELU(LayerNorm_eps(avgpool(x2) projected + bias)) in token order
    (row-major over the pooled grid). With ``add_x_t`` it returns that + x_t. Same dtype as the
    reference FCUDown (x_t's promoted with the tokens'), under autocast too. While exporting (ONNX)
    the projection stays a 1x1 convolution (on the pooled map), as in the reference's graph; in CPU
    inference where :func:`~fastconformer.dispatch.use_onednn` allows, it runs as oneDNN's inner product."""
    # stride and normalized shape spelled as constants, which a traced graph keeps as the ops' attributes
    pooled = F.avg_pool2d(x2, dw_stride, dw_stride) if dw_stride > 1 else x2
    if exporting():
        tokens = F.conv2d(pooled, weight.view(weight.shape[0], -1, 1, 1), bias).flatten(2).transpose(1, 2)
    elif use_onednn(x2, x_t, weight, bias, ln_weight, ln_bias):
        tokens = onednn_linear(pooled.flatten(2).transpose(1, 2), weight, bias)
    else:
        tokens = F.linear(pooled.flatten(2).transpose(1, 2), weight.flatten(1), bias)  # (B, N, D)
    tokens = F.gelu(F.layer_norm(tokens, ln_weight.shape, ln_weight, ln_bias, eps))
    out = torch.cat([x_t[:, :1], tokens], dim=1)
    return out + x_t if add_x_t else out


class FusedFCUDown(FusedModule):
    """Drop-in for :class:`fastconformer.reference.FCUDown` with the same constructor arguments and
    state_dict keys (``conv_project.weight/bias``, ``ln.weight/bias``; built as every fused module
    is: :class:`~fastconformer.modules.base.FusedModule`).

    ``forward(x2, x_t, add_x_t=False)``: x2 (B, inplanes, H, W) (NCHW or channels_last), x_t
    (B, 1 + N, outplanes) -> (B, 1 + N, outplanes), N = (H / dw_stride)(W / dw_stride): what the
    reference returns, or with ``add_x_t`` that + x_t (the transformer block's input, in one pass).
    fp32, fp16, bf16; autocast gives the reference's output dtype. The squeeze must be a biased
    1x1 nn.Conv2d, an affine nn.LayerNorm over its outputs and the exact (erf) GELU, pooled over
    dw_stride windows.
    """

    reference = FCUDown

    def _adopt(self, module: nn.Module) -> None:
        self._require(module, ("conv_project", "ln", "act", "dw_stride"))
        conv, ln, act, dw_stride = module.conv_project, module.ln, module.act, module.dw_stride
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.bias is not None):
            raise NotFusableError(f"conv_project must be a biased 1x1 nn.Conv2d (stride 1, no padding, groups 1), "
                                  f"got {conv}")
        if not (isinstance(ln, nn.LayerNorm) and ln.normalized_shape == (conv.out_channels,)
                and ln.weight is not None and ln.bias is not None):
            raise NotFusableError(f"ln must be an affine nn.LayerNorm({conv.out_channels}), got {ln}")
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise NotFusableError(f"the fused squeeze applies the exact (erf) GELU; act must be nn.GELU(), got {act}")
        try:
            _check_dw_stride(dw_stride)
        except ValueError as err:
            raise NotFusableError(str(err)) from None
        pool = getattr(module, "sample_pooling", None)
        window = (dw_stride, (dw_stride, dw_stride))
        if pool is not None and not all(v in window for v in (pool.kernel_size, pool.stride)):
            raise NotFusableError(f"sample_pooling must average dw_stride={dw_stride} windows, got {pool}")
        self.dw_stride = dw_stride
        self.conv_project = conv
        self.ln = ln

    def forward(self, x2: torch.Tensor, x_t: torch.Tensor, add_x_t: bool = False) -> torch.Tensor:
        """x2 (B, inplanes, H, W), x_t (B, 1 + N, outplanes) -> (B, 1 + N, outplanes)."""
        return fcu_down(x2, x_t, self.conv_project.weight, self.conv_project.bias, self.ln.weight, self.ln.bias,
                        self.dw_stride, self.ln.eps, add_x_t)

    def extra_repr(self) -> str:
        return f"dw_stride={self.dw_stride}"
