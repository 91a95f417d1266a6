"""Residual add + LayerNorm in one pass: ``s = x + y; n = LayerNorm(s)``, returning both.

In a pre-norm transformer block every residual add is followed by the next LayerNorm
(``x + attn(...)`` then ``norm2``; in a ConvTransBlock ``x_st + x_t`` then ``norm1``), so the sum
is written once and normalised from registers instead of being read back.

Shapes: x, y (M, D) rows (any leading dims are flattened by the caller), weight and bias (D,).
Dtypes: fp32, fp16, bf16 in and out, x and y each in its own (under autocast the residual stream x
is fp32 and y, a linear layer's output, fp16/bf16: y is widened in registers, not copied first);
the sum is in the promoted dtype, as torch's ``x + y`` rounds it (exactly what
``F.layer_norm(x + y)`` sees); the mean, variance and normalisation are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import LaunchConfig, launch, row_loop_programs

MAX_D = 4096
_BLOCK_DS = (128, 256, 512, 1024, 2048, 4096)
# The backward: at most this many programs (4 per SM on an H100's 132), each summing dweight/dbias
# over its rows (deterministic partial sums), in tiles of _BACKWARD_TILE elements (BLOCK_R rows).
_BACKWARD_PROGRAMS = 4 * 132
_BACKWARD_TILE = 2048


@triton.jit
def add_layer_norm_kernel(
    x_ptr, y_ptr, sum_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    D, eps,
    BLOCK_D: tl.constexpr,
):
    """One program per row: s = x + y in the sum's dtype (stored), then out = (s - mean) * rstd * w + b."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0)
    s = x.to(sum_ptr.dtype.element_ty) + y.to(sum_ptr.dtype.element_ty)  # in the promoted dtype, as torch rounds it
    tl.store(sum_ptr + row * D + cols, s, mask=mask)

    s32 = s.to(tl.float32)
    mean = tl.sum(s32, axis=0) / D
    centred = tl.where(mask, s32 - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = centred * rstd * w + b
    tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def add_layer_norm_backward_kernel(
    grad_out_ptr, grad_sum_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, grad_s_ptr, partial_w_ptr, partial_b_ptr,
    M, D, rows_per_program,
    HAS_GRAD_SUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [program_id(0) * rows_per_program, ...) of the LayerNorm backward, BLOCK_R rows at a
    time (a (BLOCK_R, BLOCK_D) tile: BLOCK_R rows' loads in flight at once), in fp32:
    grad_s = rstd * (w * g - mean(w * g) - n * mean(w * g * n)) (+ grad_sum, the sum's own
    incoming gradient), n = (s - mean) * rstd; the program's partial sums of g * n (dweight) and
    g (dbias) go to row program_id(0) of the (programs, D) fp32 buffers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tile = tl.arange(0, BLOCK_R)[:, None] * D + cols[None, :]  # offsets within a tile of whole rows (int32)
    partial_w = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    partial_b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    tile_start = first.to(tl.int64) * D  # a scalar carried through the loop: one 64-bit offset, not a tile of them
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        g = tl.load(grad_out_ptr + tile_start + tile, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + tile_start + tile, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        n = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wg = w * g
        c_n = tl.sum(wg * n, axis=1) / D
        c_1 = tl.sum(wg, axis=1) / D
        grad_s = (wg - c_1[:, None] - n * c_n[:, None]) * rstd[:, None]
        if HAS_GRAD_SUM:
            grad_s += tl.load(grad_sum_ptr + tile_start + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_s_ptr + tile_start + tile, grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
        partial_w += g * n
        partial_b += g
        tile_start += BLOCK_R * D
    tl.store(partial_w_ptr + pid * D + cols, tl.sum(partial_w, axis=0), mask=col_mask)
    tl.store(partial_b_ptr + pid * D + cols, tl.sum(partial_b, axis=0), mask=col_mask)


def _block_d(D: int) -> int:
    """The padded row width: next_pow2(D), at least 128."""
    return max(_BLOCK_DS[0], triton.next_power_of_2(D))


def add_layer_norm_config(D: int) -> LaunchConfig:
    """add_layer_norm_kernel's config for rows of D elements: one row per program, 256 elements per
    warp (1 to 8 warps); one stage (no loop)."""
    block_d = _block_d(D)
    return LaunchConfig(dict(BLOCK_D=block_d), num_warps=min(max(block_d // 256, 1), 8), num_stages=1)


def add_layer_norm_backward_config(D: int, has_grad_sum: bool) -> LaunchConfig:
    """add_layer_norm_backward_kernel's config: tiles of BLOCK_R whole rows, _BACKWARD_TILE elements
    (one row from BLOCK_D 2048 on), 256 elements per warp (at most 16: BLOCK_D 4096 spills at 8 on
    sm_90, the weight and the partial sums living across the row loop); one stage: the row loop is
    not software-pipelined, a tile's rows are its loads in flight."""
    block_d = _block_d(D)
    block_r = max(1, _BACKWARD_TILE // block_d)
    return LaunchConfig(dict(HAS_GRAD_SUM=has_grad_sum, BLOCK_R=block_r, BLOCK_D=block_d),
                        num_warps=min(max(block_r * block_d // 256, 1), 16), num_stages=1)


@triton_op("fastconformer::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y (M, D) contiguous, each fp32, fp16 or bf16 -> (sum (M, D) in their promoted dtype, normed
    (M, D) in out_dtype, mean (M,) fp32, rstd (M,) fp32)."""
    M, D = x.shape
    s = torch.empty_like(x, dtype=torch.promote_types(x.dtype, y.dtype))
    out = torch.empty_like(x, dtype=out_dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    launch(wrap_triton(add_layer_norm_kernel), (M,), (x, y, s, out, weight, bias, mean, rstd, D, eps),
           add_layer_norm_config(D))
    return s, out, mean, rstd


def _setup_context(ctx, inputs, output):
    x, y, weight, bias, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, bias, mean, rstd)
    ctx.dtypes = x.dtype, y.dtype


@triton_op("fastconformer::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward_op(grad_out: torch.Tensor, grad_sum: torch.Tensor | None, s: torch.Tensor,
                               weight: torch.Tensor, mean: torch.Tensor,
                               rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out, s (M, D) contiguous of one dtype, grad_sum (M, D) like s or None, weight (D,),
    mean/rstd (M,) fp32 -> (grad of the sum (M, D) in s's dtype, grad weight (D,) fp32,
    grad bias (D,) fp32)."""
    M, D = s.shape
    grad_s = torch.empty_like(s)
    config = add_layer_norm_backward_config(D, grad_sum is not None)
    programs, rows_per_program = row_loop_programs(M, config.constexprs["BLOCK_R"], _BACKWARD_PROGRAMS)
    partial_w = torch.empty((programs, D), device=s.device, dtype=torch.float32)
    partial_b = torch.empty((programs, D), device=s.device, dtype=torch.float32)
    launch(wrap_triton(add_layer_norm_backward_kernel), (programs,), (
        grad_out, grad_out if grad_sum is None else grad_sum, s, weight, mean, rstd, grad_s, partial_w, partial_b,
        M, D, rows_per_program), config)
    return grad_s, partial_w.sum(0), partial_b.sum(0)


def _backward(ctx, grad_sum, grad_out, _grad_mean, _grad_rstd):
    """One Triton pass: the LayerNorm backward plus the sum's incoming gradient."""
    s, weight, bias, mean, rstd = ctx.saved_tensors
    grad_out = torch.zeros_like(s) if grad_out is None else grad_out.to(s.dtype).contiguous()
    grad_sum = None if grad_sum is None else grad_sum.to(s.dtype).contiguous()
    grad_s, grad_w, grad_b = add_layer_norm_backward_op(grad_out, grad_sum, s, weight, mean, rstd)
    grad_w = grad_w.to(weight.dtype) if weight.requires_grad else None
    grad_b = grad_b.to(bias.dtype) if bias.requires_grad else None
    return (*(grad_s.to(dtype) for dtype in ctx.dtypes), grad_w, grad_b, None, None)


add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm_triton(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`fastconformer.modules.add_layer_norm` (same arguments and results, the
    same dtype rules as ``F.layer_norm(x + y)``: the sum in the promoted dtype, the normalised rows
    in float32 under autocast). x and y reach the kernel in their own dtypes: no widening copy."""
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(f"add_layer_norm's Triton kernel handles rows of at most {MAX_D} elements, got {D}")
    lead = torch.broadcast_shapes(x.shape, y.shape)[:-1]
    dtype = torch.promote_types(x.dtype, y.dtype)
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else dtype
    x, y = (t.expand(*lead, D).reshape(-1, D).contiguous() for t in (x, y))
    s, out, _, _ = add_layer_norm_op(x, y, weight.contiguous(), bias.contiguous(), float(eps), out_dtype)
    return s.view(*lead, D), out.view(*lead, D)

