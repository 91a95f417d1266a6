"""The fused FCU expand (transformer -> CNN) and the fusion block's upsample-add.

Reference (``fastconformer.reference.FCUUp`` then ``ConvBlock.forward(x, x_t)``)::

    x_r  = x_t[:, 1:].transpose(1, 2).reshape(B, D, h, w)
    low  = relu(bn(conv_project(x_r)))                                # (B, C, h, w)
    up   = F.interpolate(low, size=(h * s, w * s))                    # (B, C, H, W), written
    x    = conv2(relu(bn1(conv1(x))) + up)                            # up read back

Fused, two ops (each ``@fused_op``: a PyTorch implementation here, a Triton kernel in
``fastconformer.kernels.fcu_up``):

- :func:`fcu_up_expand`: ``act(scale * (tokens @ W^T) + shift)`` -> the low-resolution
  (B, C, h, w) map (channels_last) straight from the (B, 1+N, D) tokens (no transpose copy).
  The conv bias and, in eval mode, the BatchNorm are folded into the per-channel fp32
  ``scale``/``shift``.
- :func:`bn_relu_add_upsampled`: ``relu(scale * x + shift) + low[:, :, i // s, j // s]``, conv2's
  input, with bn1 folded into scale/shift; the Triton kernel never materialises the upsampled
  tensor.

BatchNorm: scale/shift are computed on every call from the live parameters and buffers
(:func:`batch_norm_scale_shift`), nothing is cached. Eval mode uses the running statistics.
Train mode (batch statistics):

- the expand's bn needs the whole conv output before it can normalise it, so the expand kernel
  stops after the conv bias (GEMM + bias, low resolution) and ``bn`` runs as the module itself
  on that (B, C, h, w) map, followed by a ReLU: statistics over (B, h, w), running-stat updates,
  gradients and SyncBatchNorm's cross-process reduction are nn.BatchNorm2d's own;
- bn1 works on the full-resolution conv1 output, so only its statistics are computed with torch
  (aten's one-pass BatchNorm statistics kernel, fp32, over (B, H, W)) and the normalisation runs
  inside the upsample-add pass. The running statistics are updated as ``nn.BatchNorm2d.forward``
  does (momentum, or the cumulative average when momentum is None; unbiased running_var;
  num_batches_tracked) and gradients flow through the batch statistics. A SyncBatchNorm
  training inside an initialised process group runs as the module itself instead (its
  statistics are reduced across processes) and only its output enters the fused op.

Dtypes: float32, float16, bfloat16 on both backends (math in fp32); the PyTorch implementations
also take float64 (math in fp64), for exact checks; the Triton twins raise TypeError for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..dispatch import exporting, fused_op, no_autograd, onednn_bf16, use_onednn
from ..reference import FCUUp
from .base import FusedModule, NotFusableError
from .onednn import onednn_linear

__all__ = ["FusedFCUUp", "batch_norm_scale_shift", "bn_relu_add_upsampled", "check_bn_relu_add_upsampled_args",
           "check_expand_args", "fcu_up_expand", "syncs_across_processes", "uses_batch_stats"]


def _math_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype per-channel math runs in: float32, or float64 when any of ``tensors`` is."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_channel_vectors(name: str, C: int, *vectors: torch.Tensor) -> None:
    for what, v in zip(("scale", "shift"), vectors):
        if not isinstance(v, torch.Tensor) or v.shape != (C,):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}: {what} must be a ({C},) tensor, one value per channel, got {shape}")


def _is_size(v: object) -> bool:
    """An int, or the 0-dim tensor a size is while ``torch.jit.trace`` records it."""
    traced = (torch.jit.is_tracing() and isinstance(v, torch.Tensor) and v.ndim == 0
              and v.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8))
    return traced or (isinstance(v, int) and not isinstance(v, bool))


def check_expand_args(x_t: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      H: int, W: int, apply_relu: bool = False) -> None:
    """Raise ValueError/TypeError unless x_t is (B, 1 + H*W, D) tokens, weight a (C, D) or
    (C, D, 1, 1) 1x1 conv weight of x_t's dtype (or fp16/bf16 for fp32 tokens, as under autocast),
    and scale, shift (C,)."""
    if not isinstance(x_t, torch.Tensor) or x_t.ndim != 3:
        shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
        raise ValueError(f"fcu_up_expand: x_t must be (B, 1 + H*W, D) tokens, got {shape}")
    if not all(_is_size(v) and v > 0 for v in (H, W)):
        raise ValueError(f"fcu_up_expand: H and W (the token grid) must be positive ints, got {H!r} and {W!r}")
    _, T, D = x_t.shape
    if T != 1 + H * W:
        raise ValueError(f"fcu_up_expand: x_t must hold 1 + H*W = {1 + H * W} tokens (cls + a {H}x{W} grid), "
                         f"got shape {tuple(x_t.shape)}")
    if weight.ndim not in (2, 4) or weight.shape[2:] not in ((), (1, 1)):
        raise ValueError(f"fcu_up_expand: weight must be a (C, D) or (C, D, 1, 1) 1x1 conv weight, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[1] != D:
        raise ValueError(f"fcu_up_expand: x_t's last dim must be the conv's {weight.shape[1]} input channels, "
                         f"got x_t of shape {tuple(x_t.shape)}")
    narrower = x_t.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16)
    if not x_t.is_floating_point() or (weight.dtype != x_t.dtype and not narrower):
        raise TypeError(f"fcu_up_expand: x_t and weight must share one floating dtype (or be float32 tokens with "
                        f"a float16/bfloat16 weight), got {x_t.dtype} and {weight.dtype}")
    _check_channel_vectors("fcu_up_expand", weight.shape[0], scale, shift)


def check_bn_relu_add_upsampled_args(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, low: torch.Tensor,
                                     up: int) -> None:
    """Raise ValueError/TypeError unless x is (B, C, H, W), low (B, C, H / up, W / up) of x's
    dtype and scale, shift (C,)."""
    for name, t in (("x", x), ("low", low)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"bn_relu_add_upsampled: {name} must be a 4-D (B, C, H, W) tensor, got {shape}")
    if not isinstance(up, int) or up < 1:
        raise ValueError(f"bn_relu_add_upsampled: up (the upsampling factor) must be a positive int, got {up!r}")
    B, C, H, W = x.shape
    expected = (B, C, H // up, W // up)
    if H % up or W % up or tuple(low.shape) != expected:
        raise ValueError(f"bn_relu_add_upsampled: low must be x's shape {tuple(x.shape)} downsampled by up={up}, "
                         f"i.e. {expected} with H and W multiples of up, got {tuple(low.shape)}")
    if not x.is_floating_point() or low.dtype != x.dtype:
        raise TypeError(f"bn_relu_add_upsampled: x and low must share one floating dtype, got {x.dtype} and "
                        f"{low.dtype}")
    _check_channel_vectors("bn_relu_add_upsampled", C, scale, shift)


@fused_op(triton_impl="fcu_up:fcu_up_expand_triton", check=check_expand_args)
def fcu_up_expand(x_t: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, H: int,
                  W: int, apply_relu: bool) -> torch.Tensor:
    """The FCU expand's 1x1 conv with a per-channel affine and optional ReLU, on the token grid.

    x_t (B, 1 + H*W, D) (cls row first, any strides), weight (C, D, 1, 1) or (C, D) of x_t's
    dtype (or float16/bfloat16 with float32 tokens: the GEMM dtype autocast gives the conv), scale
    and shift (C,) -> (B, C, H, W) in weight's dtype, channels_last:
    ``out[b, c, i, j] = act(scale[c] * sum_d weight[c, d] * x_t[b, 1 + i*W + j, d] + shift[c])``
    with act = ReLU when ``apply_relu``, else the identity; x_t rounded to weight's dtype first. While
    exporting (ONNX): the grid rows as a (B, D, H, W) map into one 1x1 convolution with the scale
    folded into its weight and shift as its bias (the reference's conv + BatchNorm, folded), then ReLU.
    In CPU float32 inference where :func:`~fastconformer.dispatch.use_onednn` allows: the same folding,
    as one oneDNN inner product, then the ReLU. In bfloat16 CPU inference with ``apply_relu``
    (the eval-mode expand) where :func:`~fastconformer.dispatch.onednn_bf16` allows: a bfloat16 GEMM
    rounded to bfloat16 (as the reference's convolution under autocast), then the affine and ReLU in
    float32."""
    C = weight.shape[0]
    if exporting():
        grid = x_t[:, 1:].transpose(1, 2).unflatten(2, (H, W))  # (B, D, H, W)
        folded = (weight.view(C, -1, 1, 1) * scale.view(C, 1, 1, 1)).to(grid.dtype)  # scale in float32, as the kernel
        y = F.conv2d(grid, folded, shift.to(grid.dtype))
        return y.relu() if apply_relu else y
    if use_onednn(x_t, weight, scale, shift):  # scale folded into the weight, shift as the bias
        y = onednn_linear(x_t, weight.flatten(1) * scale.view(C, 1), shift)
        out = y[:, 1:].transpose(1, 2).unflatten(2, (H, W)).contiguous(memory_format=torch.channels_last)
        return out.relu_() if apply_relu else out  # torch's ReLU: oneDNN's ReLU post-op turns NaN into 0
    # fp32 GEMM (as the kernel accumulates; fp64 for fp64 inputs), one rounding at the end;
    # autocast must not recast it. bfloat16 CPU inference of the eval-mode expand (ReLU applied,
    # BatchNorm folded; no batch statistics read the result): a bfloat16 GEMM (fp32 accumulation,
    # oneDNN; aten's fp32 GEMM calls MKL) rounded to bfloat16 as the reference's convolution is.
    # All rows, cls included, so that the strided tokens are not copied (but rounded, when wider).
    math = _math_dtype(x_t)
    bf16_inference = apply_relu and weight.dtype == torch.bfloat16 and onednn_bf16(x_t, weight, scale, shift)
    with torch.autocast(x_t.device.type, enabled=False):
        if bf16_inference:
            y = F.linear(x_t.to(weight.dtype), weight.flatten(1))  # (B, 1 + N, C)
        else:
            y = F.linear(x_t.to(weight.dtype).to(math), weight.flatten(1).to(math))
    out = torch.addcmul(shift.to(math).view(C, 1), y[:, 1:].transpose(1, 2), scale.to(math).view(C, 1))
    if apply_relu:
        out = out.relu_()
    return out.unflatten(2, (H, W)).to(weight.dtype)


@fused_op(triton_impl="fcu_up:bn_relu_add_upsampled_triton", check=check_bn_relu_add_upsampled_args)
def bn_relu_add_upsampled(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, low: torch.Tensor,
                          up: int) -> torch.Tensor:
    """The fusion block's conv2 input: ``relu(scale * x + shift) + nearest_upsample(low, up)``.

    x (B, C, H, W) (conv1's output; contiguous or channels_last), scale and shift (C,) (bn1
    folded), low (B, C, H / up, W / up) of x's dtype -> (B, C, H, W) in x's dtype and memory
    format. The Triton kernel reads low through the index map (i // up, j // up) and rounds once
    (fp32 math); this implementation rounds the normalised x to x's dtype before the add, as the
    reference's bn1 does."""
    # x * scale + shift in one pass: an eval-mode batch_norm with zero mean and unit variance.
    math = _math_dtype(x)
    scale, shift = scale.to(math), shift.to(math)
    y = F.batch_norm(x, torch.zeros_like(scale), torch.ones_like(scale), scale, shift, False, 0.0, 0.0).relu_()
    if not no_autograd(x, scale, shift, low):
        return _AddUpsampled.apply(y, low, up)  # a new tensor: the ReLU keeps y for its backward
    y_blocks, low_blocks = _upsample_blocks(y, low, up)
    y_blocks.add_(low_blocks)
    return y


def _upsample_blocks(y: torch.Tensor, low: torch.Tensor, up: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of y (B, C, H, W) and of low (B, C, H / up, W / up) (or of a copy of it) that
    broadcast against each other as ``y + nearest_upsample(low, up)``, laid out for y's format."""
    B, C, H, W = y.shape
    h, w = H // up, W // up
    if up == 1:
        return y, low
    if y.is_contiguous():
        # Rows of W pixels innermost: broadcast low over the up rows of each block only, from a
        # copy upsampled along W (1/up of the full size), so the add's inner loop stays long.
        low_w = low[..., None].expand(B, C, h, w, up).reshape(B, C, h, W).contiguous()
        return y.unflatten(2, (h, up)), low_w[:, :, :, None, :]
    # channels innermost: broadcast over both block dims, low read in the same layout
    low = low.contiguous(memory_format=torch.channels_last)
    return y.unflatten(3, (w, up)).unflatten(2, (h, up)), low[:, :, :, None, :, None]


class _AddUpsampled(torch.autograd.Function):
    """``y + nearest_upsample(low, up)`` into a new tensor, y (B, C, H, W), low (B, C, H / up,
    W / up). Backward sums the gradient over each up x up window with a sum-pooling kernel
    (autograd's reduction over the broadcast dims of the block views is ~40x slower on the CPU)."""

    @staticmethod
    def forward(ctx, y, low, up):
        ctx.up = up
        y_blocks, low_blocks = _upsample_blocks(y, low, up)
        return (y_blocks + low_blocks).reshape(y.shape)

    @staticmethod
    def backward(ctx, grad):
        grad_low = grad if ctx.up == 1 else F.avg_pool2d(grad, ctx.up, divisor_override=1)
        return grad, grad_low, None


def syncs_across_processes(bn: nn.Module) -> bool:
    """Whether ``bn`` is a SyncBatchNorm that reduces its batch statistics over a process group
    now (training, process group initialised): then it must run as the module itself."""
    return (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized())


class _BatchMeanVar(torch.autograd.Function):
    """Per-channel mean and biased variance of a (B, C, H, W) batch over (B, H, W), (C,) each in
    fp32 (fp64 for fp64 batches):
    forward with aten's one-pass BatchNorm statistics kernel (fast in either memory format, where
    torch.var_mean over dims (0, 2, 3) is not), backward analytic."""

    @staticmethod
    def forward(ctx, batch):
        # The kernel returns its input's dtype: fp16/bf16 batches are read as fp32 (a copy).
        mean, var = torch.ops.aten.batch_norm_update_stats(batch.to(_math_dtype(batch)), None, None, 0.0)
        ctx.save_for_backward(batch, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        batch, mean = ctx.saved_tensors
        n = batch.numel() // batch.shape[1]
        channel = (1, -1, 1, 1)
        # (batch - mean) * 2 grad_var / n + grad_mean / n, as one pass over the batch.
        slope = torch.zeros_like(mean) if grad_var is None else grad_var * (2.0 / n)
        offset = -(mean * slope) if grad_mean is None else grad_mean / n - mean * slope
        return torch.addcmul(offset.view(channel), batch.to(mean.dtype), slope.view(channel)).to(batch.dtype)


def uses_batch_stats(bn: _BatchNorm) -> bool:
    """Whether ``bn`` normalises with its input's batch statistics (as ``nn.BatchNorm2d`` decides:
    in training, or when it keeps no running statistics)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def batch_norm_scale_shift(bn: _BatchNorm, batch: torch.Tensor | None = None,
                           conv_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) ``scale``, ``shift`` (float32, float64 for float64 inputs) with
    ``bn(v + conv_bias) == v * scale + shift`` per channel
    (``conv_bias``, the bias of the convolution before bn, defaults to none).

    When :func:`uses_batch_stats`: the batch statistics of ``batch`` (B, C, H, W) (bn's input,
    conv_bias included) over (B, H, W), updating the running statistics and num_batches_tracked
    exactly as ``nn.BatchNorm2d.forward`` does; else the running statistics (``batch`` is not
    needed). Differentiable in ``batch``, ``conv_bias`` and bn's weight and bias."""
    if uses_batch_stats(bn):
        if batch is None:
            raise ValueError("batch_norm_scale_shift: this BatchNorm normalises with batch statistics, pass the batch")
        n = batch.numel() // batch.shape[1]
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(batch.shape)}")
        mean, var = _BatchMeanVar.apply(batch)
        if bn.training and bn.track_running_stats:
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            with torch.no_grad():  # (1 - factor) * running + factor * batch, unbiased variance
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_((var * (n / (n - 1))).to(bn.running_var.dtype), factor)
    else:
        math = _math_dtype(bn.running_mean, bn.weight)
        mean, var = bn.running_mean.to(math), bn.running_var.to(math)
    math = mean.dtype
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(math)
    if conv_bias is not None:
        mean = mean - conv_bias.to(math)
    if bn.bias is None:
        return scale, -(mean * scale)
    return scale, torch.addcmul(bn.bias.to(math), mean, scale, value=-1.0)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run a convolution in on ``device``, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class FusedFCUUp(FusedModule):
    """Drop-in for ``FCUUp`` (same constructor, parameter and buffer names, state_dict; built as
    every fused module is: :class:`~fastconformer.modules.base.FusedModule`):
    ``forward(x_t, H, W)``: x_t (B, 1 + H*W, inplanes) -> (B, outplanes, H*up_stride, W*up_stride),
    and :meth:`forward_low_res` for the (B, outplanes, H, W) map before the upsampling.

    ``conv_project`` stays an ``nn.Conv2d`` (1x1, stride 1, no padding, one group) and ``bn`` a
    BatchNorm (so ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts it); the ReLU is fused, so
    the act must be ``nn.ReLU``."""

    reference = FCUUp

    def _adopt(self, module: nn.Module) -> None:
        self._require(module, ("conv_project", "bn", "act", "up_stride"))
        conv, bn, act = module.conv_project, module.bn, module.act
        if not isinstance(act, nn.ReLU):
            raise NotFusableError(f"FusedFCUUp fuses a ReLU: act must be nn.ReLU, got {act!r}")
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1) or conv.stride != (1, 1) \
                or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise NotFusableError(f"FusedFCUUp: conv_project must be a 1x1 nn.Conv2d (stride 1, no padding, one "
                                  f"group), got {conv!r}")
        if not isinstance(bn, _BatchNorm):
            raise NotFusableError(f"FusedFCUUp: bn must be a BatchNorm layer, got {bn!r}")
        self.up_stride = module.up_stride
        self.conv_project = conv
        self.bn = bn

    def forward_low_res(self, x_t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x_t (B, 1 + H*W, inplanes) -> relu(bn(conv_project(tokens))) (B, outplanes, H, W),
        channels_last (contiguous when bn uses batch statistics on the CPU), in x_t's dtype (the
        autocast dtype under autocast)."""
        if not isinstance(x_t, torch.Tensor):
            raise TypeError(f"x_t must be a (B, 1 + H*W, D) tensor of tokens, got {type(x_t).__name__}")
        weight, bias = self.conv_project.weight, self.conv_project.bias
        dtype = _autocast_dtype(x_t.device)
        if dtype is not None:  # the conv's dtype; fp32 tokens are rounded to it inside fcu_up_expand, not copied
            weight = weight.to(dtype)
            if x_t.dtype != torch.float32:
                x_t = x_t.to(dtype)
        if uses_batch_stats(self.bn):
            # Batch statistics need the whole conv output first: the kernel stops after the conv
            # bias and the BatchNorm (statistics, running-stat updates, SyncBatchNorm's reduction)
            # runs as itself on the low-resolution map.
            ones = torch.ones(weight.shape[0], device=weight.device, dtype=_math_dtype(weight))
            conv_out = fcu_up_expand(x_t, weight, ones, torch.zeros_like(ones) if bias is None else bias, H, W, False)
            if conv_out.device.type == "cpu":  # torch's channels_last BatchNorm backward is less precise there
                conv_out = conv_out.contiguous()
            return F.relu(self.bn(conv_out), inplace=True)
        scale, shift = batch_norm_scale_shift(self.bn, conv_bias=bias)
        return fcu_up_expand(x_t, weight, scale, shift, H, W, True)

    def forward(self, x_t: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """x_t (B, 1 + H*W, inplanes) -> (B, outplanes, H*up_stride, W*up_stride), as FCUUp."""
        low = self.forward_low_res(x_t, H, W)
        return F.interpolate(low, size=(H * self.up_stride, W * self.up_stride))

    def extra_repr(self) -> str:
        return f"up_stride={self.up_stride}"
