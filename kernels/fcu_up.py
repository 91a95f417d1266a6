"""The FCU expand (tokens -> CNN) and the upsample-add that consumes it, as two Triton kernels.

``fcu_up_expand_kernel``: ``out = act(scale * (tokens @ weight^T) + shift)`` straight from the
(B, 1+N, D) tokens: the cls row is skipped by a pointer offset, the (B, D, h, w) transpose is
never copied, and the 1x1 conv's GEMM over D, its bias, the BatchNorm and the ReLU happen in one
pass (bias and BatchNorm arrive folded into the per-channel fp32 ``scale``/``shift``). The result
is the low-resolution (B, C, h, w) map, stored channels_last (physically (B, N, C), which is
the GEMM tile's natural row-major order).

``bn_relu_add_upsampled_kernel``: the fusion block's conv2 input
``relu(scale * x + shift) + low[:, :, i // s, j // s]``: bn1 (folded into scale/shift) and act1
on conv1's output x, plus the expand's result read through the nearest-upsampling index map, so
the (B, C, H, W) upsampled tensor is never written.

Dtypes: fp32, fp16, bf16 in and out; accumulation, BatchNorm and ReLU in fp32, one rounding to
the output dtype at the end. fp32 dots use TF32 only where torch's matmuls would
(:func:`fastconformer.kernels.allow_tf32`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastconformer.modules.fcu_up import check_bn_relu_add_upsampled_args, check_expand_args

from . import CompileSpec, allow_tf32, tl_dtype

_EXPAND_BLOCK_M = 64
_EXPAND_BLOCK_NS = (16, 32, 64)
_EXPAND_BLOCK_K = 32
_EXPAND_WARPS = 8
_EXPAND_STAGES = 3
_ELEMENTWISE_TILE = 2048  # elements per program of the upsample-add
_ELEMENTWISE_WARPS = 8  # 8 elements per thread
_CHANNEL_BLOCKS = (16, 32, 64, 128)  # channels_last: a tile row is BLOCK_C channels of one pixel
_PIXEL_BLOCK = 128  # contiguous (NCHW): a tile row is BLOCK_C pixels of one (batch, channel) plane


@triton.jit
def fcu_up_expand_kernel(
    tok_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
    N, C, D,
    stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
    apply_relu,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M tokens x BLOCK_N channels) tile of batch element program_id(2): its tokens
    are the (N, D) matrix starting one row into x_t[b] (the cls row is skipped), its output the
    row-major (N, C) matrix out[b]."""
    batch = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    col_mask = cols < C
    a_ptrs = tok_ptr + batch * stride_tb + (rows + 1)[:, None] * stride_tn + ks[None, :] * stride_td
    b_ptrs = w_ptr + cols[None, :] * stride_wc + ks[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = ks < D - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_td
        b_ptrs += BLOCK_K * stride_wd

    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    y = acc * scale[None, :] + shift[None, :]
    y = tl.where((y < 0) & (apply_relu != 0), 0.0, y)  # NaN stays NaN, as torch.relu
    out_ptrs = out_ptr + batch * N * C + rows[:, None] * C + cols[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def bn_relu_add_upsampled_kernel(
    x_ptr, scale_ptr, shift_ptr, low_ptr, out_ptr,
    ROWS, COLS, C, W, HW, up,
    stride_lb, stride_lc, stride_lh, stride_lw,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (BLOCK_R x BLOCK_C) tile of x and out viewed as a row-major (ROWS, COLS) matrix.

    Contiguous x: rows are (batch, channel) planes, columns the H*W pixels of a plane.
    channels_last x: rows are (batch, pixel), columns the C channels. Either way the index
    decoding is one vector per tile side; low is read at (batch, channel, i // up, j // up)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < ROWS
    col_mask = cols < COLS
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    if CHANNELS_LAST:
        pixel = rows64 % HW
        low_rows = (rows64 // HW) * stride_lb + (pixel // W // up) * stride_lh + (pixel % W // up) * stride_lw
        low_cols = cols * stride_lc
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    else:
        channel = rows % C
        low_rows = (rows64 // C) * stride_lb + channel * stride_lc
        low_cols = (cols // W // up) * stride_lh + (cols % W // up) * stride_lw
        scale = tl.load(scale_ptr + channel, mask=row_mask, other=0.0)[:, None]
        shift = tl.load(shift_ptr + channel, mask=row_mask, other=0.0)[:, None]
    offsets = rows64[:, None] * COLS + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + low_rows[:, None] + low_cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * scale + shift
    y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(out_ptr + offsets, (y + low).to(out_ptr.dtype.element_ty), mask=mask)


def _expand_block_ns(dtype: torch.dtype, precision: str) -> tuple[int, ...]:
    """The BLOCK_N choices for ``dtype`` and dot precision: fp32 without TF32 runs the dot on FMA
    units, where a 64-channel tile spills, so it stops at 32."""
    return _EXPAND_BLOCK_NS[:-1] if dtype == torch.float32 and precision == "ieee" else _EXPAND_BLOCK_NS


def _expand_config(C: int, dtype: torch.dtype) -> tuple[int, str]:
    """(BLOCK_N, dot input precision) for C output channels of ``dtype``."""
    precision = "tf32" if allow_tf32(dtype) else "ieee"
    choices = _expand_block_ns(dtype, precision)
    return max(choices[0], min(choices[-1], triton.next_power_of_2(C))), precision


def _elementwise_config(C: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the upsample-add for C channels in the given layout."""
    block_c = (max(_CHANNEL_BLOCKS[0], min(_CHANNEL_BLOCKS[-1], triton.next_power_of_2(C))) if channels_last
               else _PIXEL_BLOCK)
    return _ELEMENTWISE_TILE // block_c, block_c


@triton_op("fastconformer::fcu_up_expand", mutates_args=())
def fcu_up_expand_op(x_t: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     H: int, W: int, apply_relu: bool) -> torch.Tensor:
    """x_t (B, 1+H*W, D) any strides, weight (C, D), scale/shift (C,) fp32 contiguous ->
    (B, C, H, W) channels_last in x_t's dtype."""
    B, _, D = x_t.shape
    C = weight.shape[0]
    N = H * W
    out = torch.empty((B, C, H, W), device=x_t.device, dtype=x_t.dtype, memory_format=torch.channels_last)
    block_n, precision = _expand_config(C, x_t.dtype)
    grid = (triton.cdiv(N, _EXPAND_BLOCK_M), triton.cdiv(C, block_n), B)
    wrap_triton(fcu_up_expand_kernel)[grid](
        x_t, weight, scale, shift, out, N, C, D,
        x_t.stride(0), x_t.stride(1), x_t.stride(2), weight.stride(0), weight.stride(1), int(apply_relu),
        DOT_PRECISION=precision, BLOCK_M=_EXPAND_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_EXPAND_BLOCK_K,
        num_warps=_EXPAND_WARPS, num_stages=_EXPAND_STAGES)
    return out


def _expand_setup_context(ctx, inputs, output):
    x_t, weight, scale, _, _, _, apply_relu = inputs
    ctx.save_for_backward(x_t, weight, scale, output if apply_relu else None)


def _expand_backward(ctx, grad_out):
    """Recompute the GEMM with torch ops: d/d(x_t, weight, scale, shift) of act(scale * (tokens @ W^T) + shift)."""
    x_t, weight, scale, out = ctx.saved_tensors
    B, C = x_t.shape[0], weight.shape[0]
    grad_pre = grad_out.float() if out is None else grad_out.float() * (out > 0)
    grad_pre = grad_pre.permute(0, 2, 3, 1).reshape(B, -1, C)  # (B, N, C)
    tokens = x_t[:, 1:].float()
    grad_x_t = grad_weight = grad_scale = grad_shift = None
    grad_acc = grad_pre * scale
    if ctx.needs_input_grad[0]:
        grad_x_t = torch.zeros(x_t.shape, device=x_t.device, dtype=x_t.dtype)
        grad_x_t[:, 1:] = grad_acc @ weight.float()
    if ctx.needs_input_grad[1]:
        grad_weight = torch.einsum("bnc,bnd->cd", grad_acc, tokens).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_scale = (grad_pre * (tokens @ weight.float().t())).sum((0, 1))
    if ctx.needs_input_grad[3]:
        grad_shift = grad_pre.sum((0, 1))
    return grad_x_t, grad_weight, grad_scale, grad_shift, None, None, None


fcu_up_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)


@triton_op("fastconformer::bn_relu_add_upsampled", mutates_args=())
def bn_relu_add_upsampled_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, low: torch.Tensor,
                             up: int) -> torch.Tensor:
    """x (B, C, H, W) contiguous or channels_last, scale/shift (C,) fp32, low (B, C, H/up, W/up) any
    strides -> (B, C, H, W) in x's dtype and memory format."""
    B, C, H, W = x.shape
    channels_last = not x.is_contiguous()
    out = torch.empty_like(x)
    rows, cols = (B * H * W, C) if channels_last else (B * C, H * W)
    block_r, block_c = _elementwise_config(C, channels_last)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    wrap_triton(bn_relu_add_upsampled_kernel)[grid](
        x, scale, shift, low, out, rows, cols, C, W, H * W, up,
        low.stride(0), low.stride(1), low.stride(2), low.stride(3),
        CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_ELEMENTWISE_WARPS)
    return out


def _upsample_add_setup_context(ctx, inputs, output):
    x, scale, shift, low, up = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.up = up
    ctx.low_dtype = low.dtype


def _upsample_add_backward(ctx, grad_out):
    """d/d(x, scale, shift, low) of relu(scale * x + shift) + upsample(low), with torch ops."""
    x, scale, shift = ctx.saved_tensors
    B, C, H, W = x.shape
    up = ctx.up
    xf = x.float()
    channel = (1, C, 1, 1)
    grad = grad_out.float()
    grad_pre = grad * ((xf * scale.view(channel) + shift.view(channel)) > 0)
    grad_x = (grad_pre * scale.view(channel)).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_scale = (grad_pre * xf).sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
    grad_shift = grad_pre.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
    grad_low = None
    if ctx.needs_input_grad[3]:
        grad_low = grad.reshape(B, C, H // up, up, W // up, up).sum((3, 5)).to(ctx.low_dtype)
    return grad_x, grad_scale, grad_shift, grad_low, None


bn_relu_add_upsampled_op.register_autograd(_upsample_add_backward, setup_context=_upsample_add_setup_context)


def fcu_up_expand_triton(x_t: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         H: int, W: int, apply_relu: bool) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.fcu_up.fcu_up_expand` (same arguments and result)."""
    check_expand_args(x_t, weight, scale, shift, H, W)
    tl_dtype(x_t.dtype)  # TypeError unless float32, float16 or bfloat16
    return fcu_up_expand_op(x_t, weight.flatten(1), scale.float().contiguous(), shift.float().contiguous(),
                            int(H), int(W), bool(apply_relu))


def bn_relu_add_upsampled_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, low: torch.Tensor,
                                 up: int) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.fcu_up.bn_relu_add_upsampled` (same arguments and result)."""
    check_bn_relu_add_upsampled_args(x, scale, shift, low, up)
    tl_dtype(x.dtype)  # TypeError unless float32, float16 or bfloat16
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return bn_relu_add_upsampled_op(x, scale.float().contiguous(), shift.float().contiguous(), low, int(up))


def compile_specs():
    """Every (kernel, dtype, dot precision, block shape) the two launchers can pick."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ptr = tl_dtype(dtype)
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for precision in precisions:
            for block_n in _expand_block_ns(dtype, precision):
                yield CompileSpec(
                    name=f"fcu_up_expand[{ptr[1:]},{precision},BLOCK_N={block_n}]",
                    kernel=fcu_up_expand_kernel,
                    signature={"tok_ptr": ptr, "w_ptr": ptr, "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                               "out_ptr": ptr, "N": "i32", "C": "i32", "D": "i32",
                               "stride_tb": "i32", "stride_tn": "i32", "stride_td": "i32", "stride_wc": "i32",
                               "stride_wd": "i32", "apply_relu": "i32", "DOT_PRECISION": "constexpr",
                               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                    constexprs={"DOT_PRECISION": precision, "BLOCK_M": _EXPAND_BLOCK_M, "BLOCK_N": block_n,
                                "BLOCK_K": _EXPAND_BLOCK_K},
                    num_warps=_EXPAND_WARPS, num_stages=_EXPAND_STAGES,
                )
        layouts = [(False, _PIXEL_BLOCK)] + [(True, c) for c in _CHANNEL_BLOCKS]
        for channels_last, channels in layouts:
            block_r, block_c = _elementwise_config(channels, channels_last)
            layout = "channels_last" if channels_last else "contiguous"
            yield CompileSpec(
                name=f"bn_relu_add_upsampled[{ptr[1:]},{layout},BLOCK_C={block_c}]",
                kernel=bn_relu_add_upsampled_kernel,
                signature={"x_ptr": ptr, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "low_ptr": ptr, "out_ptr": ptr,
                           "ROWS": "i32", "COLS": "i32", "C": "i32", "W": "i32", "HW": "i32", "up": "i32",
                           "stride_lb": "i32", "stride_lc": "i32", "stride_lh": "i32",
                           "stride_lw": "i32", "CHANNELS_LAST": "constexpr", "BLOCK_R": "constexpr",
                           "BLOCK_C": "constexpr"},
                constexprs={"CHANNELS_LAST": channels_last, "BLOCK_R": block_r, "BLOCK_C": block_c},
                num_warps=_ELEMENTWISE_WARPS,
            )
