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
the output dtype at the end. The expand's GEMM runs in its weight's dtype, which is also its
output's; the tokens may be wider (fp32 tokens, fp16/bf16 weight under autocast): they are rounded
to the weight's dtype in registers, as autocast's cast would round them, instead of being copied
first. fp32 dots use TF32 only where torch's matmuls would
(:func:`fastconformer.kernels.dot_precision`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import LaunchConfig, autocast_off, dot_precision, launch, tile_shape, tl_dtype

_EXPAND_BLOCK_M = 64
_EXPAND_BLOCK_NS = (16, 32, 64)
_EXPAND_BLOCK_K = 32
_EXPAND_WARPS = 8
_EXPAND_STAGES = 3
_EXPAND_BW_BLOCK_M = 64  # the expand's backward GEMM: tokens x embed dims, K over channels
_EXPAND_BW_BLOCK_N = 64
_EXPAND_BW_BLOCK_K = 32
_EXPAND_BW_WARPS = 8
_EXPAND_BW_STAGES = 2
_ELEMENTWISE_TILE = 2048  # elements per program of the upsample-add
_ELEMENTWISE_WARPS = 8  # 8 elements per thread
_BACKWARD_TILE = 1024  # low-resolution elements per program of the upsample-add's backward
_BACKWARD_WARPS = 4


@triton.jit
def _tile(ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a row-major (ROWS, COLS) matrix: (row indices (BLOCK_R,), column
    indices (BLOCK_C,), their masks, the row indices as int64)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols, rows < ROWS, cols < COLS, rows.to(tl.int64)


@triton.jit
def fcu_up_expand_kernel(
    tok_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
    N, C, D,
    stride_tb, stride_tn, stride_td, stride_wc, stride_wd,
    apply_relu,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M tokens x BLOCK_N channels) tile of batch element program_id(2): its tokens
    are the (N, D) matrix starting one row into x_t[b] (the cls row is skipped), read in x_t's dtype
    and rounded to the weight's, its output the row-major (N, C) matrix out[b]."""
    batch = tl.program_id(2).to(tl.int64)
    rows, cols, row_mask, col_mask, _ = _tile(N, C, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = tok_ptr + batch * stride_tb + (rows + 1)[:, None] * stride_tn + ks[None, :] * stride_td
    b_ptrs = w_ptr + cols[None, :] * stride_wc + ks[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = ks < D - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(w_ptr.dtype.element_ty)
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
def fcu_up_expand_backward_kernel(
    grad_ptr, out_ptr, w_ptr, scale_ptr, grad_tok_ptr, masked_ptr,
    N, C, D,
    stride_wc, stride_wd,
    apply_relu,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M tokens x BLOCK_N embed dims) tile of grad x_t[b] = (g' * scale) @ W for batch
    element program_id(2), g' = grad_out masked by the ReLU (out > 0), both read as the row-major
    (N, C) matrices of their channels_last (B, C, h, w) tensors. The result goes to rows 1.. of the
    (B, 1 + N, D) grad of x_t (the first token block also zeroes the cls row); the programs of the
    first embed-dim block also store g' (the weight grad's GEMM operand) as (B * N, C)."""
    batch = tl.program_id(2).to(tl.int64)
    rows, cols, row_mask, col_mask, _ = _tile(N, D, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    store_masked = tl.program_id(1) == 0
    g_offsets = batch * N * C + rows[:, None] * C + ks[None, :]
    w_ptrs = w_ptr + ks[:, None] * stride_wc + cols[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_mask = ks < C - k0
        a_mask = row_mask[:, None] & k_mask[None, :]
        g = tl.load(grad_ptr + g_offsets, mask=a_mask, other=0.0)
        if apply_relu != 0:
            g = tl.where(tl.load(out_ptr + g_offsets, mask=a_mask, other=0.0) > 0, g, 0.0)
        if store_masked:
            tl.store(masked_ptr + g_offsets, g.to(masked_ptr.dtype.element_ty), mask=a_mask)
        scale = tl.load(scale_ptr + k0 + ks, mask=k_mask, other=0.0)
        a = (g.to(tl.float32) * scale[None, :]).to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        g_offsets += BLOCK_K
        w_ptrs += BLOCK_K * stride_wc
    out_rows = batch * (N + 1) + rows + 1
    tl.store(grad_tok_ptr + out_rows[:, None] * D + cols[None, :], acc.to(grad_tok_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
    if tl.program_id(0) == 0:
        tl.store(grad_tok_ptr + batch * (N + 1) * D + cols, tl.zeros((BLOCK_N,), dtype=tl.float32).to(
            grad_tok_ptr.dtype.element_ty), mask=col_mask)


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
    rows, cols, row_mask, col_mask, rows64 = _tile(ROWS, COLS, BLOCK_R, BLOCK_C)
    mask = row_mask[:, None] & col_mask[None, :]
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


@triton.jit
def bn_relu_add_upsampled_backward_kernel(
    grad_ptr, x_ptr, scale_ptr, shift_ptr, grad_x_ptr, grad_low_ptr, partial_scale_ptr, partial_shift_ptr,
    ROWS, COLS, C, W, HW, w_low, hw_low, up,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One (BLOCK_R x BLOCK_C) tile of the low-resolution grad viewed as a row-major (ROWS, COLS)
    matrix, in x's layout: contiguous x: rows are (batch, channel) planes, columns the h*w
    low-resolution pixels; channels_last x: rows are (batch, low pixel), columns the C channels.

    The tile loops over the up x up window offsets: each step reads grad and x at those
    full-resolution pixels once, stores grad_x = grad * (bn > 0) * scale and accumulates
    grad_low (the nearest-upsampling adjoint) and, in fp32, the per-channel partial sums of
    grad * (bn > 0) * x (grad of scale) and grad * (bn > 0) (grad of shift). Partial sums go to
    row program_id(0) of a (programs, C) buffer (channels_last) or to column program_id(1) of a
    (ROWS, programs) buffer (contiguous)."""
    rows, cols, row_mask, col_mask, rows64 = _tile(ROWS, COLS, BLOCK_R, BLOCK_C)
    mask = row_mask[:, None] & col_mask[None, :]
    if CHANNELS_LAST:
        low_pixel = rows64 % hw_low
        # Offset of the window's top-left full-resolution element, and the step between pixels.
        base = ((rows64 // hw_low) * HW + (low_pixel // w_low) * up * W + (low_pixel % w_low) * up) * C
        base = base[:, None] + cols[None, :]
        step_w = C
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)[None, :]
    else:
        channel = rows % C
        base = rows64[:, None] * HW + ((cols // w_low) * up * W + (cols % w_low) * up)[None, :]
        step_w = 1
        scale = tl.load(scale_ptr + channel, mask=row_mask, other=0.0)[:, None]
        shift = tl.load(shift_ptr + channel, mask=row_mask, other=0.0)[:, None]
    grad_low = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    grad_scale = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    grad_shift = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for di in range(up):
        for dj in range(up):
            offsets = base + (di * W + dj) * step_w
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g_pre = tl.where(x * scale + shift > 0, g, 0.0)
            tl.store(grad_x_ptr + offsets, (g_pre * scale).to(grad_x_ptr.dtype.element_ty), mask=mask)
            grad_low += g
            grad_scale += g_pre * x
            grad_shift += g_pre
    tl.store(grad_low_ptr + rows64[:, None] * COLS + cols[None, :], grad_low.to(grad_low_ptr.dtype.element_ty),
             mask=mask)
    if CHANNELS_LAST:
        partial = tl.program_id(0) * C + cols
        tl.store(partial_scale_ptr + partial, tl.sum(grad_scale, axis=0), mask=col_mask)
        tl.store(partial_shift_ptr + partial, tl.sum(grad_shift, axis=0), mask=col_mask)
    else:
        partial = rows64 * tl.num_programs(1) + tl.program_id(1)
        tl.store(partial_scale_ptr + partial, tl.sum(grad_scale, axis=1), mask=row_mask)
        tl.store(partial_shift_ptr + partial, tl.sum(grad_shift, axis=1), mask=row_mask)


def fcu_up_expand_config(C: int, dtype: torch.dtype, precision: str) -> LaunchConfig:
    """fcu_up_expand_kernel's config for C output channels, the GEMM (weight's) ``dtype`` and the dot
    precision: BLOCK_N = next_pow2(C) within 16..64, but at most 32 for fp32 without TF32, whose dot runs on
    FMA units, where a 64-channel tile spills."""
    widest = _EXPAND_BLOCK_NS[-2] if dtype == torch.float32 and precision == "ieee" else _EXPAND_BLOCK_NS[-1]
    block_n = max(_EXPAND_BLOCK_NS[0], min(widest, triton.next_power_of_2(C)))
    return LaunchConfig(dict(DOT_PRECISION=precision, BLOCK_M=_EXPAND_BLOCK_M, BLOCK_N=block_n,
                             BLOCK_K=_EXPAND_BLOCK_K), num_warps=_EXPAND_WARPS, num_stages=_EXPAND_STAGES)


@triton_op("fastconformer::fcu_up_expand", mutates_args=())
def fcu_up_expand_op(x_t: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     H: int, W: int, apply_relu: bool) -> torch.Tensor:
    """x_t (B, 1+H*W, D) any strides, in weight's dtype or fp32, weight (C, D), scale/shift (C,)
    fp32 contiguous -> (B, C, H, W) channels_last in weight's dtype."""
    B, _, D = x_t.shape
    C = weight.shape[0]
    N = H * W
    out = torch.empty((B, C, H, W), device=x_t.device, dtype=weight.dtype, memory_format=torch.channels_last)
    config = fcu_up_expand_config(C, weight.dtype, dot_precision(weight.dtype))
    grid = (triton.cdiv(N, _EXPAND_BLOCK_M), triton.cdiv(C, config.constexprs["BLOCK_N"]), B)
    launch(wrap_triton(fcu_up_expand_kernel), grid, (
        x_t, weight, scale, shift, out, N, C, D,
        x_t.stride(0), x_t.stride(1), x_t.stride(2), weight.stride(0), weight.stride(1), int(apply_relu)), config)
    return out


def _expand_setup_context(ctx, inputs, output):
    x_t, weight, scale, _, _, _, apply_relu = inputs
    ctx.save_for_backward(x_t, weight, scale, output if apply_relu else None)


def fcu_up_expand_backward_config(dtype: torch.dtype, precision: str) -> LaunchConfig:
    """fcu_up_expand_backward_kernel's config (tokens x embed dims, K over channels): fp32 without
    TF32 runs the dot on FMA units, which takes a (16, 32) W tile (16: the smallest tl.dot K that
    triton 3.6 compiles)."""
    if dtype == torch.float32 and precision == "ieee":
        block_n, block_k = _EXPAND_BW_BLOCK_N // 2, 16
    else:
        block_n, block_k = _EXPAND_BW_BLOCK_N, _EXPAND_BW_BLOCK_K
    return LaunchConfig(dict(DOT_PRECISION=precision, BLOCK_M=_EXPAND_BW_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k),
                        num_warps=_EXPAND_BW_WARPS, num_stages=_EXPAND_BW_STAGES)


@triton_op("fastconformer::fcu_up_expand_backward", mutates_args=())
def fcu_up_expand_backward_op(grad_out: torch.Tensor, out: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor,
                              scale: torch.Tensor,
                              apply_relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out and the forward's out (B, C, h, w) channels_last in weight's dtype, x_t (B, 1+N, D)
    in weight's dtype or fp32, weight (C, D), scale (C,) fp32 -> (grad x_t (B, 1+N, D) contiguous
    in x_t's dtype with a zero cls row, grad weight (C, D) in weight's dtype, grad scale (C,) fp32,
    grad shift (C,) fp32).

    One Triton GEMM masks grad_out by the ReLU, scales it and multiplies with W straight into the
    token layout, storing the masked grad g' on the way; the weight grad is g'^T @ tokens
    (torch.matmul), scaled per channel, and the scale's grad reuses it: sum_(b,n) g' * (tokens @ W^T)
    = rowsum(W * (g'^T @ tokens)), so the forward GEMM is not recomputed."""
    B, _, D = x_t.shape
    C = weight.shape[0]
    N = out.shape[2] * out.shape[3]
    grad_x_t = torch.empty((B, N + 1, D), device=x_t.device, dtype=x_t.dtype)
    masked = torch.empty((B * N, C), device=x_t.device, dtype=weight.dtype)
    config = fcu_up_expand_backward_config(weight.dtype, dot_precision(weight.dtype))
    grid = (triton.cdiv(N, _EXPAND_BW_BLOCK_M), triton.cdiv(D, config.constexprs["BLOCK_N"]), B)
    launch(wrap_triton(fcu_up_expand_backward_kernel), grid, (
        grad_out, out, weight, scale, grad_x_t, masked, N, C, D, weight.stride(0), weight.stride(1),
        int(apply_relu)), config)
    with autocast_off(x_t.device):
        # (C, D), against the tokens as the forward's GEMM saw them (rounded to weight's dtype)
        grad_w_unscaled = masked.t() @ x_t[:, 1:].reshape(B * N, D).to(weight.dtype)
    grad_weight = (grad_w_unscaled.float() * scale[:, None]).to(weight.dtype)
    grad_scale = (grad_w_unscaled.float() * weight.float()).sum(1)
    grad_shift = masked.sum(0, dtype=torch.float32)
    return grad_x_t, grad_weight, grad_scale, grad_shift


def _expand_backward(ctx, grad_out):
    """d/d(x_t, weight, scale, shift) of act(scale * (tokens @ W^T) + shift): one Triton GEMM for
    grad x_t, torch.matmul for the weight."""
    x_t, weight, scale, out = ctx.saved_tensors
    grad_out = grad_out.to(weight.dtype).contiguous(memory_format=torch.channels_last)
    grad_x_t, grad_weight, grad_scale, grad_shift = fcu_up_expand_backward_op(
        grad_out, grad_out if out is None else out, x_t, weight, scale, out is not None)
    needs = ctx.needs_input_grad
    return (grad_x_t if needs[0] else None, grad_weight if needs[1] else None, grad_scale if needs[2] else None,
            grad_shift if needs[3] else None, None, None, None)


fcu_up_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)


def bn_relu_add_upsampled_config(C: int, channels_last: bool) -> LaunchConfig:
    """bn_relu_add_upsampled_kernel's config: _ELEMENTWISE_TILE-element tiles in x's layout; one
    stage (no loop)."""
    block_r, block_c = tile_shape(_ELEMENTWISE_TILE, C, channels_last)
    return LaunchConfig(dict(CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_C=block_c),
                        num_warps=_ELEMENTWISE_WARPS, num_stages=1)


def bn_relu_add_upsampled_backward_config(C: int, channels_last: bool) -> LaunchConfig:
    """bn_relu_add_upsampled_backward_kernel's config: _BACKWARD_TILE low-resolution elements per
    program in x's layout; one stage (the window loop is not software-pipelined)."""
    block_r, block_c = tile_shape(_BACKWARD_TILE, C, channels_last)
    return LaunchConfig(dict(CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_C=block_c),
                        num_warps=_BACKWARD_WARPS, num_stages=1)


@triton_op("fastconformer::bn_relu_add_upsampled", mutates_args=())
def bn_relu_add_upsampled_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, low: torch.Tensor,
                             up: int) -> torch.Tensor:
    """x (B, C, H, W) contiguous or channels_last, scale/shift (C,) fp32, low (B, C, H/up, W/up) any
    strides -> (B, C, H, W) in x's dtype and memory format."""
    B, C, H, W = x.shape
    channels_last = not x.is_contiguous()
    out = torch.empty_like(x)
    rows, cols = (B * H * W, C) if channels_last else (B * C, H * W)
    config = bn_relu_add_upsampled_config(C, channels_last)
    grid = (triton.cdiv(rows, config.constexprs["BLOCK_R"]), triton.cdiv(cols, config.constexprs["BLOCK_C"]))
    launch(wrap_triton(bn_relu_add_upsampled_kernel), grid, (
        x, scale, shift, low, out, rows, cols, C, W, H * W, up,
        low.stride(0), low.stride(1), low.stride(2), low.stride(3)), config)
    return out


def _upsample_add_setup_context(ctx, inputs, output):
    x, scale, shift, _low, up = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.up = up  # low has x's dtype (the dispatch checked it), so grad low is returned in it as computed


@triton_op("fastconformer::bn_relu_add_upsampled_backward", mutates_args=())
def bn_relu_add_upsampled_backward_op(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                                      shift: torch.Tensor, up: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor]:
    """grad_out and x (B, C, H, W) of one dtype and one memory format (contiguous or channels_last),
    scale/shift (C,) fp32 -> (grad x (B, C, H, W) like x, grad low (B, C, H/up, W/up) in x's dtype
    and memory format, grad scale (C,) fp32, grad shift (C,) fp32)."""
    B, C, H, W = x.shape
    h, w = H // up, W // up
    channels_last = not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x = torch.empty_like(x)
    grad_low = torch.empty((B, C, h, w), device=x.device, dtype=x.dtype, memory_format=fmt)
    rows, cols = (B * h * w, C) if channels_last else (B * C, h * w)
    config = bn_relu_add_upsampled_backward_config(C, channels_last)
    grid = (triton.cdiv(rows, config.constexprs["BLOCK_R"]), triton.cdiv(cols, config.constexprs["BLOCK_C"]))
    partial_shape = (grid[0], C) if channels_last else (rows, grid[1])
    partial_scale = torch.empty(partial_shape, device=x.device, dtype=torch.float32)
    partial_shift = torch.empty(partial_shape, device=x.device, dtype=torch.float32)
    launch(wrap_triton(bn_relu_add_upsampled_backward_kernel), grid, (
        grad_out, x, scale, shift, grad_x, grad_low, partial_scale, partial_shift,
        rows, cols, C, W, H * W, w, h * w, up), config)
    if channels_last:
        grad_scale, grad_shift = partial_scale.sum(0), partial_shift.sum(0)
    else:
        grad_scale, grad_shift = (p.view(B, C, -1).sum((0, 2)) for p in (partial_scale, partial_shift))
    return grad_x, grad_low, grad_scale, grad_shift


def _upsample_add_backward(ctx, grad_out):
    """d/d(x, scale, shift, low) of relu(scale * x + shift) + upsample(low): one Triton pass over grad_out."""
    x, scale, shift = ctx.saved_tensors
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    grad_x, grad_low, grad_scale, grad_shift = bn_relu_add_upsampled_backward_op(
        grad_out.to(x.dtype).contiguous(memory_format=fmt), x, scale, shift, ctx.up)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_scale if needs[1] else None, grad_shift if needs[2] else None,
            grad_low if needs[3] else None, None)


bn_relu_add_upsampled_op.register_autograd(_upsample_add_backward, setup_context=_upsample_add_setup_context)


def fcu_up_expand_triton(x_t: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         H: int, W: int, apply_relu: bool) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.fcu_up.fcu_up_expand` (same arguments and result)."""
    tl_dtype(x_t.dtype), tl_dtype(weight.dtype)  # TypeError unless float32, float16 or bfloat16
    return fcu_up_expand_op(x_t, weight.flatten(1), scale.float().contiguous(), shift.float().contiguous(),
                            int(H), int(W), bool(apply_relu))


def bn_relu_add_upsampled_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, low: torch.Tensor,
                                 up: int) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.fcu_up.bn_relu_add_upsampled` (same arguments and result)."""
    tl_dtype(x.dtype)  # TypeError unless float32, float16 or bfloat16
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return bn_relu_add_upsampled_op(x, scale.float().contiguous(), shift.float().contiguous(), low, int(up))

