"""The FCU squeeze (CNN -> tokens) in one kernel: average pool, 1x1 projection, bias, LayerNorm,
exact GELU, written into the token layout after x_t's cls row (optionally + x_t).

``out[b, 0] = x_t[b, 0]`` and ``out[b, 1 + t] = GELU(LayerNorm(W @ avgpool(x2)[b, :, t] + bias))``,
t = ph * w + pw over the (h, w) = (H / s, W / s) token grid, s = dw_stride. With ``add_x_t`` the
result is that + x_t (the transformer block's input in a ConvTransBlock; its cls row is
``2 * x_t[b, 0]``).

Pool and 1x1 convolution commute, so each program averages the s x s windows of x2 while loading
the GEMM's A operand (fp32 sums), rounds the means to x2's dtype and multiplies them with W on the
tensor cores (fp32 accumulation over C_in blocks): s^2 fewer MACs than convolving first and no
full-resolution intermediate. A program owns 16 whole token rows (all of D, so the LayerNorm
runs on the accumulator) and stores each row once: x2 is read once, the tokens written once.

Shapes: x2 (B, C_in, H, W) with any strides (NCHW, channels_last, views), weight (D, C_in)
contiguous, bias / LayerNorm weight and bias (D,) contiguous, x_t (B, 1 + N, D) with any batch and
token strides and unit stride along D; out (B, 1 + N, D) contiguous. D <= 1024.
Dtypes: x2 and weight share the GEMM dtype (fp32, fp16 or bf16); bias, LayerNorm parameters, x_t
and out share the token dtype: the GEMM dtype, or fp32 under mixed precision. The pool,
accumulation, LayerNorm and GELU are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import LaunchConfig, autocast_off, dot_precision, launch, row_loop_programs, tile_shape, tl_dtype

MAX_D = 1024
_BLOCK_DS = (128, 256, 512, 1024)
# num_warps of the forward by BLOCK_D: (dots on tensor cores: fp16, bf16, TF32; on FMA units: IEEE fp32).
_NUM_WARPS = {128: (8, 16), 256: (8, 16), 512: (8, 8), 1024: (16, 16)}
_BLOCK_M = 16  # tokens per program: the smallest tl.dot tile, so a (16, BLOCK_D) fp32 row block fits in registers
_RECOMPUTE_BLOCK_D = 128  # columns per program of the backward's GEMM recompute
_RECOMPUTE_WARPS = 4
# The row-wise backward: at most this many programs (4 per SM on an H100's 132; deterministic
# partial sums), in tiles of _ROW_TILE elements (BLOCK_R rows).
_BACKWARD_PROGRAMS = 4 * 132
_ROW_TILE = 2048
_POOL_BACKWARD_TILE = 2048  # elements of grad x2 per program of the pool adjoint
_POOL_BACKWARD_WARPS = 8
_BLOCK_P = 4  # window pixels averaged per load: dw_stride 2 in one step, 4 in 4, 8 in 16 (1: one of 4 lanes)
_TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


@triton.jit
def _token_segment(n_h, n_w, BLOCK_M: tl.constexpr):
    """The tokens of program_id(0): (image b, token row ph, clamped columns pw (BLOCK_M,), their
    validity mask, and ``rest``, the program's index within its image). Shared by the forward and
    the backward's recompute so that both walk the same token blocks."""
    pid = tl.program_id(0)
    n_seg = tl.cdiv(n_w, BLOCK_M)
    b = pid // (n_h * n_seg)
    rest = pid - b * (n_h * n_seg)
    ph = rest // n_seg
    pw = (rest - ph * n_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = pw < n_w
    return b, rest, ph, tl.minimum(pw, n_w - 1), row_mask


@triton.jit
def _pooled_projection(
    x_ptr, w_ptr, pooled_ptr, b64, ph, pw, row_mask, t_global, cols_c, C, dw_stride, inv_area,
    stride_xb, stride_xc, stride_xh, stride_xw,
    STORE_POOLED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """(BLOCK_M, BLOCK_D) fp32 accumulator of avgpool(x2) @ W^T for the tokens at window corners
    (ph, pw) of image b64: the s x s windows are averaged (fp32 sums) while loading the GEMM's A
    operand, rounded to x2's dtype and multiplied with W. With STORE_POOLED the rounded means of
    the rows in row_mask are also stored as rows t_global of the (B * N, C) pooled_ptr matrix
    (row_mask is used for nothing else)."""
    # Offset of each token's window corner in x2 (int64: batch strides can be large).
    x_rows = (b64 * stride_xb + (ph * dw_stride).to(tl.int64) * stride_xh
              + (pw * dw_stride).to(tl.int64) * stride_xw)
    ks = tl.arange(0, BLOCK_K)
    ps = tl.arange(0, BLOCK_P)
    area = dw_stride * dw_stride
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + ks
        k_mask = k < C
        a_ptrs = x_ptr + (x_rows[:, None] + (k.to(tl.int64) * stride_xc)[None, :])[:, :, None]
        # Average pool while loading A: BLOCK_P window pixels (row-major in the window) per load.
        window_sum = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for p0 in range(0, area, BLOCK_P):
            p = p0 + ps
            p_c = tl.minimum(p, area - 1)
            i = p_c // dw_stride
            pix = i * stride_xh + (p_c - i * dw_stride) * stride_xw
            v = tl.load(a_ptrs + pix[None, None, :], mask=k_mask[None, :, None] & (p < area)[None, None, :],
                        other=0.0)
            window_sum += tl.sum(v.to(tl.float32), axis=2)
        a = (window_sum * inv_area).to(x_ptr.dtype.element_ty)
        if STORE_POOLED:
            tl.store(pooled_ptr + t_global[:, None] * C + k[None, :], a, mask=row_mask[:, None] & k_mask[None, :])
        w = tl.load(w_ptr + k[:, None] + cols_c[None, :] * C, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def fcu_down_kernel(
    x_ptr, w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, xt_ptr, out_ptr,
    N, n_h, n_w, C, D, dw_stride, inv_area, eps, add_x_t,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_tb, stride_tn,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program per (image, token row, BLOCK_M-token segment of the row); the first program of
    each image also copies its cls row.

    Indices are clamped instead of masked wherever the extra lanes cannot reach the output (tokens
    past the row repeat its last token, columns past D repeat column D - 1): masks that live across
    the K loop cost more registers than the data they guard."""
    b, rest, ph, pw, row_mask = _token_segment(n_h, n_w, BLOCK_M)
    t = ph * n_w + pw  # token index within the image
    b64 = b.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    cols_c = tl.minimum(cols, D - 1)

    if rest == 0:
        cls = tl.load(xt_ptr + b64 * stride_tb + cols, mask=col_mask)
        if add_x_t != 0:
            cls += cls
        tl.store(out_ptr + b64 * (N + 1) * D + cols, cls, mask=col_mask)

    acc = _pooled_projection(x_ptr, w_ptr, x_ptr, b64, ph, pw, row_mask, t, cols_c, C, dw_stride, inv_area,
                             stride_xb, stride_xc, stride_xh, stride_xw, STORE_POOLED=False,
                             DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
                             BLOCK_P=BLOCK_P)

    # + bias, LayerNorm over the D valid columns, exact GELU, (+ x_t), all fp32.
    z = tl.where(col_mask[None, :], acc + tl.load(bias_ptr + cols_c).to(tl.float32)[None, :], 0.0)
    mean = tl.sum(z, axis=1) / D
    centred = tl.where(col_mask[None, :], z - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    ln_w = tl.load(ln_w_ptr + cols_c).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + cols_c).to(tl.float32)
    y = centred * (rstd[:, None] * ln_w[None, :]) + ln_b[None, :]
    y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    if add_x_t != 0:
        xt_rows = b64 * stride_tb + (t + 1).to(tl.int64) * stride_tn
        y += tl.load(xt_ptr + xt_rows[:, None] + cols_c[None, :]).to(tl.float32)
    out_rows = (b64 * (N + 1) + t + 1) * D
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def pooled_projection_kernel(
    x_ptr, w_ptr, bias_ptr, pooled_ptr, z_ptr,
    N, n_h, n_w, C, D, dw_stride, inv_area,
    stride_xb, stride_xc, stride_xh, stride_xw,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The backward's recompute, with the forward's exact arithmetic (its token blocks, pooling and
    K loop): the pre-LayerNorm rows z = avgpool(x2) @ W^T + bias, stored fp32 as (B * N, D), and
    the pooled rows (B * N, C) in x2's dtype (the weight grad's GEMM operand). No LayerNorm here,
    so a program owns BLOCK_D columns (program_id(1)) instead of whole rows; the programs of the
    first column block store the pooled rows."""
    b, _, ph, pw, row_mask = _token_segment(n_h, n_w, BLOCK_M)
    # valid rows, first column block only (integer product: the interpreter rejects bool & scalar masks)
    pooled_mask = (row_mask.to(tl.int32) * (tl.program_id(1) == 0).to(tl.int32)) != 0
    t_global = b.to(tl.int64) * N + ph * n_w + pw
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    cols_c = tl.minimum(cols, D - 1)
    acc = _pooled_projection(x_ptr, w_ptr, pooled_ptr, b.to(tl.int64), ph, pw, pooled_mask, t_global,
                             cols_c, C, dw_stride, inv_area, stride_xb, stride_xc, stride_xh, stride_xw,
                             STORE_POOLED=True, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                             BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P)
    z = acc + tl.load(bias_ptr + cols_c).to(tl.float32)[None, :]
    tl.store(z_ptr + t_global[:, None] * D + cols[None, :], z, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def layer_norm_gelu_backward_kernel(
    z_ptr, grad_ptr, ln_w_ptr, ln_b_ptr, grad_z_ptr, partial_bias_ptr, partial_ln_w_ptr, partial_ln_b_ptr,
    M, N, D, eps, stride_gb, stride_gn, rows_per_program,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token rows [program_id(0) * rows_per_program, ...) of the (B * N, D) fp32 pre-LayerNorm rows z,
    back through GELU(LayerNorm(z)), BLOCK_R rows at a time (a (BLOCK_R, BLOCK_D) tile: BLOCK_R rows'
    loads in flight at once), in fp32: grad_z in grad_z_ptr's dtype, and the program's partial
    sums of grad_z (bias), grad_y * n (LayerNorm weight) and grad_y (LayerNorm bias) in row
    program_id(0) of the (programs, D) fp32 buffers. grad_ptr is the (B, 1 + N, D) gradient of the
    output tokens (row t of image b at b * stride_gb + (1 + t) * stride_gn)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    ln_w = tl.load(ln_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    ln_b = tl.load(ln_b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tile = tl.arange(0, BLOCK_R)[:, None] * D + cols[None, :]  # offsets within a tile of whole z rows (int32)
    partial_bias = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    partial_ln_w = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    partial_ln_b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    tile_start = first.to(tl.int64) * D  # a scalar carried through the loop
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(z_ptr + tile_start + tile, mask=mask, other=0.0)
        image = rows // N
        g_rows = image.to(tl.int64) * stride_gb + (rows - image * N + 1).to(tl.int64) * stride_gn
        g = tl.load(grad_ptr + g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(z, axis=1) / D
        n = tl.where(mask, z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(n * n, axis=1) / D + eps)
        n = n * rstd[:, None]
        y = n * ln_w + ln_b
        # d GELU(y) / dy = Phi(y) + y * phi(y)
        grad_y = g * (0.5 * (1.0 + tl.erf(y * 0.7071067811865476)) + y * tl.exp(-0.5 * y * y) * 0.3989422804014327)
        grad_n = grad_y * ln_w
        c_1 = tl.sum(grad_n, axis=1) / D
        c_n = tl.sum(grad_n * n, axis=1) / D
        grad_z = tl.where(mask, (grad_n - c_1[:, None] - n * c_n[:, None]) * rstd[:, None], 0.0)
        tl.store(grad_z_ptr + tile_start + tile, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
        partial_bias += grad_z
        partial_ln_w += grad_y * n
        partial_ln_b += grad_y
        tile_start += BLOCK_R * D
    tl.store(partial_bias_ptr + pid * D + cols, tl.sum(partial_bias, axis=0), mask=col_mask)
    tl.store(partial_ln_w_ptr + pid * D + cols, tl.sum(partial_ln_w, axis=0), mask=col_mask)
    tl.store(partial_ln_b_ptr + pid * D + cols, tl.sum(partial_ln_b, axis=0), mask=col_mask)


@triton.jit
def avg_pool_backward_kernel(
    grad_pooled_ptr, grad_x_ptr,
    ROWS, COLS, C, W, HW, n_w, N, dw_stride, inv_area,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The s x s average pool's adjoint: grad_x[b, c, i, j] = grad_pooled[b, (i // s) * n_w + j // s, c]
    / s^2, grad_pooled (B * N, C) row-major, grad_x (B, C, H, W) viewed as a row-major (ROWS, COLS)
    matrix: (batch, channel) x pixels when contiguous, (batch, pixel) x channels when channels_last."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    rows64 = rows.to(tl.int64)
    if CHANNELS_LAST:
        pixel = rows64 % HW
        token = (rows64 // HW) * N + (pixel // W // dw_stride) * n_w + pixel % W // dw_stride
        src = token[:, None] * C + cols[None, :]
    else:
        token = ((rows64 // C) * N)[:, None] + ((cols // W // dw_stride) * n_w + cols % W // dw_stride)[None, :]
        src = token * C + (rows % C)[:, None]
    g = tl.load(grad_pooled_ptr + src, mask=mask, other=0.0).to(tl.float32) * inv_area
    tl.store(grad_x_ptr + rows64[:, None] * COLS + cols[None, :], g.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _block_d(D: int) -> int:
    """The padded row width of the row-wise kernels: next_pow2(D), at least 128."""
    return max(_BLOCK_DS[0], triton.next_power_of_2(D))


def fcu_down_config(D: int, gemm_dtype: torch.dtype, precision: str) -> LaunchConfig:
    """fcu_down_kernel's config for token rows of D elements: the whole row in one program, K steps
    of 16 (the smallest tl.dot K that triton 3.6 compiles), one stage (the K loop is not
    software-pipelined). Warps: chosen with the compile matrix, where no launch spills under
    triton 3.9 (kernels/COMPILE_MATRIX.md has what still spills under 3.6 to 3.8): at BLOCK_D 512,
    16 warps leave ptxas 64 registers on sm_80 and spill where 8 do not; at 1024, 8 warps spill
    (255 registers) where 16 do not, but for the TF32 dot under triton 3.6; at 128 and 256 the IEEE
    fp32 dot spills at 2, 4 and 8 warps and the TF32 one at 16."""
    block_d = _block_d(D)
    num_warps = _NUM_WARPS[block_d][precision == "ieee" and gemm_dtype == torch.float32]
    if block_d == 1024 and precision == "tf32" and _TRITON_VERSION < (3, 7):
        num_warps = 8  # triton 3.6 spills 8 B at 16 warps there (sm_80); 3.7 to 3.9 spill 48-56 B at 8 (sm_90)
    return LaunchConfig(dict(DOT_PRECISION=precision, BLOCK_M=_BLOCK_M, BLOCK_K=16, BLOCK_D=block_d,
                             BLOCK_P=_BLOCK_P), num_warps=num_warps, num_stages=1)


def pooled_projection_config(D: int, gemm_dtype: torch.dtype, precision: str) -> LaunchConfig:
    """pooled_projection_kernel's config: the forward's token blocks, K step (its rounding) and
    stages, over column blocks of _RECOMPUTE_BLOCK_D."""
    forward = fcu_down_config(D, gemm_dtype, precision)
    return LaunchConfig({**forward.constexprs, "BLOCK_D": _RECOMPUTE_BLOCK_D}, num_warps=_RECOMPUTE_WARPS,
                        num_stages=forward.num_stages)


def layer_norm_gelu_backward_config(D: int) -> LaunchConfig:
    """layer_norm_gelu_backward_kernel's config: tiles of BLOCK_R whole rows, _ROW_TILE elements, 8
    per thread (8 warps); one stage (the row loop is not software-pipelined: a tile's rows are its
    loads in flight)."""
    block_d = _block_d(D)
    block_r = max(1, _ROW_TILE // block_d)
    return LaunchConfig(dict(BLOCK_R=block_r, BLOCK_D=block_d), num_warps=max(1, block_r * block_d // 256),
                        num_stages=1)


def avg_pool_backward_config(C: int, channels_last: bool) -> LaunchConfig:
    """avg_pool_backward_kernel's config: _POOL_BACKWARD_TILE-element tiles in x2's layout; one
    stage (no loop)."""
    block_r, block_c = tile_shape(_POOL_BACKWARD_TILE, C, channels_last)
    return LaunchConfig(dict(CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_C=block_c),
                        num_warps=_POOL_BACKWARD_WARPS, num_stages=1)


@triton_op("fastconformer::fcu_down", mutates_args=())
def fcu_down_op(x2: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int, eps: float,
                add_x_t: bool) -> torch.Tensor:
    """x2 (B, C, H, W) any strides, x_t (B, 1+N, D) with unit stride along D, weight (D, C) and
    bias / ln_weight / ln_bias (D,) contiguous -> (B, 1+N, D) contiguous in x_t's dtype."""
    B, C, H, W = x2.shape
    D = weight.shape[0]
    n_w = W // dw_stride
    N = (H // dw_stride) * n_w
    out = torch.empty((B, N + 1, D), device=x2.device, dtype=x_t.dtype)
    if B == 0:
        return out
    n_h = H // dw_stride
    grid = (B * n_h * triton.cdiv(n_w, _BLOCK_M),)
    launch(wrap_triton(fcu_down_kernel), grid, (
        x2, weight, bias, ln_weight, ln_bias, x_t, out,
        N, n_h, n_w, C, D, dw_stride, 1.0 / (dw_stride * dw_stride), eps, int(add_x_t),
        *x2.stride(), x_t.stride(0), x_t.stride(1)), fcu_down_config(D, x2.dtype, dot_precision(x2.dtype)))
    return out


@triton_op("fastconformer::fcu_down_backward", mutates_args=())
def fcu_down_backward_op(grad_out: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out (B, 1+N, D) in the token dtype with unit stride along D, the forward's x2 (any
    strides), weight (D, C) and bias / ln_weight / ln_bias (D,) -> (grad x2 (B, C, H, W) in x2's
    dtype, channels_last when x2 is, else contiguous; grad weight (D, C) in weight's dtype; grad
    bias, grad ln_weight, grad ln_bias (D,) fp32). The cls row's gradient is not handled here.

    The pre-LayerNorm rows are recomputed (the forward's pooled GEMM with its exact arithmetic)
    into a transient (B * N, D) fp32 buffer that lives only during this backward, rather than
    saved by the forward, which would hold B * N * D fp32 per FCU from forward to backward (19 MB
    per block at Conformer-S, batch 64) to skip a GEMM with K = C_in. Then one row-wise kernel
    goes back through GELU and LayerNorm."""
    B, C, H, W = x2.shape
    D = weight.shape[0]
    s = dw_stride
    n_h, n_w = H // s, W // s
    N = n_h * n_w
    M = B * N
    dev = x2.device
    grad_z = torch.empty((M, D), device=dev, dtype=x2.dtype)
    pooled = torch.empty((M, C), device=dev, dtype=x2.dtype)
    row_config = layer_norm_gelu_backward_config(D)
    programs, rows_per_program = row_loop_programs(M, row_config.constexprs["BLOCK_R"], _BACKWARD_PROGRAMS)
    partials = [torch.zeros((programs, D), device=dev, dtype=torch.float32) for _ in range(3)]
    if M > 0:
        z = torch.empty((M, D), device=dev, dtype=torch.float32)
        grid = (B * n_h * triton.cdiv(n_w, _BLOCK_M), triton.cdiv(D, _RECOMPUTE_BLOCK_D))
        launch(wrap_triton(pooled_projection_kernel), grid, (
            x2, weight, bias, pooled, z, N, n_h, n_w, C, D, s, 1.0 / (s * s), *x2.stride()),
            pooled_projection_config(D, x2.dtype, dot_precision(x2.dtype)))
        launch(wrap_triton(layer_norm_gelu_backward_kernel), (programs,), (
            z, grad_out, ln_weight, ln_bias, grad_z, *partials, M, N, D, eps, grad_out.stride(0), grad_out.stride(1),
            rows_per_program), row_config)
    with autocast_off(dev):
        grad_pooled = grad_z @ weight  # (B * N, C)
        grad_weight = grad_z.t() @ pooled  # (D, C)
    channels_last = x2.dim() == 4 and x2.is_contiguous(memory_format=torch.channels_last) and not x2.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_x2 = torch.empty((B, C, H, W), device=dev, dtype=x2.dtype, memory_format=fmt)
    rows, cols = (B * H * W, C) if channels_last else (B * C, H * W)
    config = avg_pool_backward_config(C, channels_last)
    if rows > 0:
        grid = (triton.cdiv(rows, config.constexprs["BLOCK_R"]), triton.cdiv(cols, config.constexprs["BLOCK_C"]))
        launch(wrap_triton(avg_pool_backward_kernel), grid, (
            grad_pooled, grad_x2, rows, cols, C, W, H * W, n_w, N, s, 1.0 / (s * s)), config)
    grad_bias, grad_ln_w, grad_ln_b = (p.sum(0) for p in partials)
    return grad_x2, grad_weight, grad_bias, grad_ln_w, grad_ln_b


def _setup_context(ctx, inputs, output):
    x2, _, weight, bias, ln_weight, ln_bias, dw_stride, eps, add_x_t = inputs
    ctx.save_for_backward(x2, weight, bias, ln_weight, ln_bias)
    ctx.dw_stride, ctx.eps, ctx.add_x_t = dw_stride, eps, add_x_t


def _backward(ctx, grad_out):
    """The Triton backward (GELU, LayerNorm and pool adjoints; the two GEMMs with torch.matmul),
    plus the cls row's gradient; gradients in each input's dtype."""
    x2, weight, bias, ln_weight, ln_bias = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_x2, grad_w, grad_b, grad_ln_w, grad_ln_b = fcu_down_backward_op(
        grad_out, x2, weight, bias, ln_weight, ln_bias, ctx.dw_stride, ctx.eps)
    grad_x_t = None
    if ctx.needs_input_grad[1]:
        if ctx.add_x_t:
            grad_x_t = grad_out.clone()
            grad_x_t[:, 0] *= 2
        else:
            grad_x_t = torch.zeros_like(grad_out)
            grad_x_t[:, 0] = grad_out[:, 0]
    needs = ctx.needs_input_grad
    return (grad_x2 if needs[0] else None, grad_x_t, grad_w if needs[2] else None,
            grad_b.to(bias.dtype) if needs[3] else None, grad_ln_w.to(ln_weight.dtype) if needs[4] else None,
            grad_ln_b.to(ln_bias.dtype) if needs[5] else None, None, None, None)


fcu_down_op.register_autograd(_backward, setup_context=_setup_context)


def _gemm_and_token_dtypes(x2: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM dtype, LayerNorm output dtype) the reference module would use for x2 here: x2's dtype
    outside autocast; inside, the projection runs in the autocast dtype and layer_norm in fp32 on
    CUDA (autocast's fp32 op list) but in its input dtype on the CPU (not in any CPU list)."""
    device_type = x2.device.type
    if not torch.is_autocast_enabled(device_type):
        return x2.dtype, x2.dtype
    low = torch.get_autocast_dtype(device_type)
    return low, torch.float32 if device_type == "cuda" else low


def fcu_down_triton(x2: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int, eps: float,
                    add_x_t: bool = False) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.fcu_down` (same arguments and result)."""
    D = weight.shape[0]
    if D > MAX_D:
        raise ValueError(f"fcu_down's Triton kernel handles embed dims of at most {MAX_D}, got weight of shape "
                         f"{tuple(weight.shape)}")
    gemm_dtype, ln_dtype = _gemm_and_token_dtypes(x2)
    # The reference's torch.cat promotes the cls row (x_t's dtype) and the tokens (LayerNorm's dtype).
    token_dtype = torch.promote_types(x_t.dtype, ln_dtype)
    tl_dtype(gemm_dtype), tl_dtype(token_dtype)  # TypeError for dtypes the kernel is not built for
    params = [p.to(token_dtype).contiguous() for p in (bias, ln_weight, ln_bias)]
    x_t = x_t.to(token_dtype)
    if x_t.stride(-1) != 1:
        x_t = x_t.contiguous()
    return fcu_down_op(x2.to(gemm_dtype), x_t, weight.flatten(1).to(gemm_dtype).contiguous(), *params,
                       int(dw_stride), float(eps), bool(add_x_t))

