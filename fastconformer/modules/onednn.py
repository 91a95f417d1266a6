"""oneDNN's fused inner product and convolution for CPU inference, and the prepacked weights they
read.

``onednn_linear``: a linear layer with its activation (exact GELU) or its residual add in one
call of ``mkldnn::_linear_pointwise`` (the primitive inductor's CPU backend emits).
``onednn_conv_add_``: a convolution accumulated into its residual's buffer in one call of
``mkldnn::_convolution_pointwise_`` (oneDNN's sum post-op). ``onednn_conv_packed``: a convolution
with its BatchNorm folded, reading a packed copy of the folded weight. On the CPU, no autograd:
callers take them only where :func:`fastconformer.dispatch.use_onednn` (float32) or
:func:`fastconformer.dispatch.onednn_autocast_bf16` (bfloat16 under CPU autocast, the inner
product only) allows.
Unlike ``F.linear`` (``aten::addmm``, which calls the BLAS torch was built with: MKL, whose code
path on AMD CPUs is about half as fast at these shapes) it runs oneDNN's own kernels.

Packed weights (opt-in: :func:`fastconformer.modules.prepack.prepack_weights` registers a model's):
the primitive otherwise reorders the weight into its blocked layout on every call; a registered
weight is reordered once (``mkldnn::_reorder_linear_weight``) and the copy kept beside the
parameter, which stays as it is (same state_dict); when a copy is rebuilt:
:mod:`fastconformer.modules.derived`. Another Parameter put in a registered one's place is not
registered and is read as it is. A registered convolution keeps its folded weight packed per input
shape (``mkldnn::_reorder_convolution_weight``), rebuilt when the convolution's or its BatchNorm's
tensors change (:func:`fastconformer.modules.conv_block.fold_sources`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .derived import DerivedTensors

__all__ = ["conv_registered_for_packing", "onednn_conv_add_", "onednn_conv_packed", "onednn_linear", "packed_copies",
           "register_conv_for_packing", "register_for_packing", "registered_for_packing"]

ACTIVATIONS = ("none", "gelu")  # no ReLU: oneDNN's maps NaN to 0, torch's keeps it

PACKED = DerivedTensors("parameters")  # parameter -> {dtype: its oneDNN-packed copy}
# convolution -> {(input shape, channels_last, eps, geometry): (its folded weight packed for that input, folded
# bias)}; oneDNN's blocked weight layout depends on the input's shape (packed without it, the primitive reorders
# again on every call), so one copy per shape: the first CONV_SHAPES_MAX shapes a convolution meets, the others
# run unpacked
CONV_SHAPES_MAX = 4
PACKED_CONVS = DerivedTensors("convolution weights", keys_max=CONV_SHAPES_MAX)


def _packed(weight: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor | None:
    """The packed ``dtype`` copy of a parameter registered by :func:`register_for_packing`, (re)built
    when the parameter changed; None for any other tensor."""
    return PACKED.get(weight, (weight,), dtype, lambda: torch.ops.mkldnn._reorder_linear_weight(
        weight.detach().flatten(1).to(dtype), rows))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, activation: str = "none",
                  residual: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``, or ``x @ weight.T + bias + residual``, as one oneDNN
    inner product computing in ``dtype``.

    x (..., in) on the CPU (any strides), weight (out, in) or a 1x1 convolution's (out, in, 1, 1),
    bias (out,) or None, activation ``"none"`` or ``"gelu"`` (exact), residual of the
    output's shape -> (..., out) in ``dtype``. ``dtype`` float32, or bfloat16 as CPU autocast
    computes a linear layer (x, weight and bias rounded to bfloat16, fp32 accumulation, the
    activation applied before the one rounding of the output). A weight registered by
    :func:`register_for_packing` is read from its packed copy. No autograd."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"onednn_linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    w = _packed(weight, dtype, x.numel() // max(x.shape[-1], 1))
    if w is None:
        w = weight.flatten(1).to(dtype)
    x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
    pointwise = torch.ops.mkldnn._linear_pointwise
    if residual is not None:
        return pointwise.binary(x, residual.to(dtype), w, bias, "add")
    return pointwise(x, w, bias, activation, [], "none" if activation == "gelu" else "")


def onednn_conv_add_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     conv: torch.nn.Conv2d) -> torch.Tensor:
    """``residual += conv2d(x, weight, bias)`` with ``conv``'s stride, padding, dilation and groups,
    as one oneDNN convolution whose sum post-op reads and writes ``residual``; returns ``residual``.

    x (B, C_in, H, W), weight (C_out, C_in/groups, kh, kw), bias (C_out,) or None, residual the
    output's shape (B, C_out, H', W') in x's memory format (NCHW or channels_last); float32 CPU
    tensors; the same float32 sums as ``out = F.conv2d(...); out += residual``. No autograd;
    ``residual`` is overwritten."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, weight, bias, *_conv_params(conv), "add",
                                                           None, None, [], None)


def _conv_params(conv: torch.nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    """``conv``'s (padding, stride, dilation, groups) as the mkldnn convolution ops take them."""
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def onednn_conv_packed(x: torch.Tensor, conv: torch.nn.Conv2d, sources: tuple[torch.Tensor, ...], eps: float,
                       fold: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """``conv2d(x, *fold())`` with ``conv``'s stride, padding, dilation and groups as one oneDNN
    convolution reading a packed copy of the folded weight, for a convolution registered by
    :func:`register_conv_for_packing`: the copy is built (``fold()`` -> (weight, bias) in float32)
    on first use for x's shape and layout (and the convolution's geometry and the fold's ``eps``,
    plain numbers no version counter tracks) and rebuilt when one of ``sources`` (the tensors the
    fold reads) changed; None when ``conv`` is not registered or holds copies for CONV_SHAPES_MAX
    other keys already (the caller runs the convolution unpacked). x (B, C_in, H, W) float32 on the
    CPU, NCHW or channels_last; float32 sums as the unpacked convolution's, in the order of the
    kernel oneDNN picks for the packed layout (within ~1e-6 of it). No autograd."""
    params = _conv_params(conv)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = fold()
        if channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._reorder_convolution_weight(weight, *params, list(x.shape)), bias

    key = (tuple(x.shape), channels_last, eps, conv.padding, conv.stride, conv.dilation, conv.groups)
    packed = PACKED_CONVS.get(conv, sources, key, build)
    if packed is None:
        return None
    return torch.ops.mkldnn._convolution_pointwise(x, packed[0], packed[1], *params, "none", [], "")


def register_conv_for_packing(conv: torch.nn.Conv2d, sources: tuple[torch.Tensor, ...], enabled: bool = True) -> None:
    """Let :func:`onednn_conv_packed` keep packed folded weights for ``conv`` (``enabled``), or drop
    them; ``sources``: the tensors its fold reads (ValueError for inference tensors, as
    :func:`register_for_packing`)."""
    if enabled:
        PACKED_CONVS.register(conv, sources)
    else:
        PACKED_CONVS.unregister(conv)


def conv_registered_for_packing(conv: torch.nn.Conv2d) -> bool:
    """Whether :func:`register_conv_for_packing` registered ``conv`` (and did not drop it)."""
    return PACKED_CONVS.registered(conv)


def register_for_packing(weight: torch.Tensor, enabled: bool = True) -> None:
    """Let :func:`onednn_linear` read ``weight`` (a parameter) from a packed copy, built on first
    use (``enabled``), or drop that copy (``enabled=False``). ValueError for a tensor created under
    ``torch.inference_mode`` (it has no version counter to tell when it changed)."""
    if enabled:
        PACKED.register(weight, (weight,))
    else:
        PACKED.unregister(weight)


def packed_copies(owner: torch.Tensor | torch.nn.Conv2d) -> int:
    """How many packed copies a registered weight (dtypes) or convolution (input shapes) holds now."""
    return (PACKED_CONVS if isinstance(owner, torch.nn.Conv2d) else PACKED).built(owner)


def registered_for_packing(weight: torch.Tensor) -> bool:
    """Whether :func:`register_for_packing` registered ``weight`` (and did not drop it)."""
    return PACKED.registered(weight)
