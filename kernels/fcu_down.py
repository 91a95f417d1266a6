"""The FCU squeeze (CNN -> tokens) in one kernel: average pool, 1x1 projection, bias, LayerNorm,
exact GELU, written into the token layout after x_t's cls row (optionally + x_t).

``out[b, 0] = x_t[b, 0]`` and ``out[b, 1 + t] = GELU(LayerNorm(W @ avgpool(x2)[b, :, t] + bias))``,
t = ph * w + pw over the (h, w) = (H / s, W / s) token grid, s = dw_stride. With ``add_x_t`` the
result is that + x_t (the transformer block's input in a ConvTransBlock; its cls row is
``2 * x_t[b, 0]``).

Pool and 1x1 convolution commute, so each program averages the s x s windows of x2 while loading
the GEMM's A operand (fp32 sums, s a compile-time constant: the s^2 window loads of a K step are
unrolled and independent), rounds the means to x2's dtype and multiplies them with W on the tensor
cores (fp32 accumulation over C_in blocks, the loop software-pipelined): s^2 fewer MACs than
convolving first and no full-resolution intermediate. A program owns BLOCK_M tokens of the B * N
tokens flattened image-major (a tile may span images), all of D, so the LayerNorm runs on the
accumulators: D is held as two power-of-two column blocks, D = BLOCK_D + BLOCK_D_TAIL up to padding
of the tail (384 = 256 + 128, 576 = 512 + 64), not padded to the next power of two. x2 is read
once, the tokens written once.

Shapes: x2 (B, C_in, H, W) with unit channel stride (channels_last or a view of it: the ops copy
an NCHW x2 to channels_last first, :func:`_channels_innermost`), weight (D, C_in)
contiguous, bias / LayerNorm weight and bias (D,) contiguous, x_t and out (B, 1 + N, D) contiguous
(one offset per element serves both). D <= 1024.
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
_MIN_BLOCK = 16  # the narrowest tl.dot tile side
_RECOMPUTE_BLOCK_D = 128  # columns per program of the backward's GEMM recompute
_RECOMPUTE_WARPS = 4
# The row-wise backward: at most this many programs (4 per SM on an H100's 132; deterministic
# partial sums), in tiles of _ROW_TILE elements (BLOCK_R rows).
_BACKWARD_PROGRAMS = 4 * 132
_ROW_TILE = 2048
_POOL_BACKWARD_TILE = 2048  # elements of grad x2 per program of the pool adjoint
_POOL_BACKWARD_WARPS = 8


@triton.jit
def _token_tile(M, N, n_w, BLOCK_M: tl.constexpr):
    """The tokens of program_id(0): BLOCK_M consecutive ones of the M = B * N tokens flattened
    image-major, as (image b, token t within the image, its row ph and column pw on the token grid),
    each (BLOCK_M,) int32 and clamped to the last token (the extra lanes repeat it), and the mask of
    the tokens that exist. Shared by the forward and the backward's recompute."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = tokens < M
    tokens = tl.minimum(tokens, M - 1)
    b = tokens // N
    t = tokens - b * N
    ph = t // n_w
    return b, t, ph, t - ph * n_w, mask


@triton.jit
def _columns(start, D, BLOCK: tl.constexpr):
    """Columns start .. start + BLOCK - 1 of a D-wide row: (indices, mask of those < D, indices
    clamped to D - 1), each (BLOCK,)."""
    cols = start + tl.arange(0, BLOCK)
    return cols, cols < D, tl.minimum(cols, D - 1)


@triton.jit
def _window_means(x_ptr, x_rows, k, k_mask, stride_xc, stride_xh, stride_xw,
                  DW_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) GEMM A operand: the means of x2 over the DW_STRIDE x DW_STRIDE windows
    whose corners are at offsets x_rows (BLOCK_M,) int64, for channels k (BLOCK_K,) (k_mask: those
    < C_in), summed in fp32 in the window's row-major order and rounded to x2's dtype. The window
    loop is unrolled: its DW_STRIDE^2 loads are independent of each other."""
    ptrs = x_ptr + x_rows[:, None] + (k.to(tl.int64) * stride_xc)[None, :]
    window_sum = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(DW_STRIDE):
        for j in tl.static_range(DW_STRIDE):
            window_sum += tl.load(ptrs + (i * stride_xh + j * stride_xw), mask=k_mask[None, :],
                                  other=0.0).to(tl.float32)
    return (window_sum * (1.0 / (DW_STRIDE * DW_STRIDE))).to(x_ptr.dtype.element_ty)


@triton.jit
def _biased(acc, bias_ptr, col_mask, cols_c):
    """acc + bias on the valid columns, 0 on the others (fp32)."""
    return tl.where(col_mask[None, :], acc + tl.load(bias_ptr + cols_c).to(tl.float32)[None, :], 0.0)


@triton.jit
def _layer_norm_gelu_store(centred, rstd, cols, col_mask, ln_w_ptr, ln_b_ptr, xt_ptr, out_ptr, rows, row_mask,
                           ADD_X_T: tl.constexpr):
    """GELU(centred * rstd * ln_w + ln_b) (+ x_t) for one column block (cols, col_mask) of the token
    rows starting at element offsets rows (BLOCK_M,) int64 of x_t and out (both contiguous
    (B, 1 + N, D)). Contiguous, masked column indices here (not clamped ones): they keep the x_t
    loads and the stores vectorised."""
    ln_w = tl.load(ln_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centred * (rstd[:, None] * ln_w[None, :]) + ln_b[None, :]
    y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    mask = row_mask[:, None] & col_mask[None, :]
    if ADD_X_T:
        y += tl.load(xt_ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fcu_down_kernel(
    x_ptr, w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, xt_ptr, out_ptr,
    M, N, n_w, C, D, eps,
    stride_xb, stride_xc, stride_xh, stride_xw,
    ADD_X_T: tl.constexpr, DOT_PRECISION: tl.constexpr, DW_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr,
):
    """One program per BLOCK_M tokens of the B * N (:func:`_token_tile`), all D columns: the head
    block of BLOCK_D columns and, when BLOCK_D_TAIL > 0, the tail block of columns BLOCK_D ..
    BLOCK_D + BLOCK_D_TAIL - 1 (those past D masked). The program also copies the cls rows of the
    images whose first token it holds.

    Tokens past the end repeat the last one and columns past D repeat column D - 1 instead of being
    masked wherever the extra lanes cannot reach the output: masks that live across the K loop cost
    more registers than the data they guard."""
    b, t, ph, pw, row_mask = _token_tile(M, N, n_w, BLOCK_M)
    b64 = b.to(tl.int64)

    first = tl.program_id(0) * BLOCK_M
    first_image = (first + N - 1) // N  # the images whose token 0 is in [first, first + BLOCK_M)
    for i in range(0, (tl.minimum(first + BLOCK_M, M) + N - 1) // N - first_image):
        image = (first_image + i).to(tl.int64)
        for c0 in range(0, D, BLOCK_D):
            cls_cols, cls_mask, _ = _columns(c0, D, BLOCK_D)
            cls_offsets = image * (N + 1) * D + cls_cols
            cls = tl.load(xt_ptr + cls_offsets, mask=cls_mask)
            if ADD_X_T:
                cls += cls
            tl.store(out_ptr + cls_offsets, cls, mask=cls_mask)

    # Offset of each token's window corner in x2 (int64: batch strides can be large).
    x_rows = (b64 * stride_xb + (ph * DW_STRIDE).to(tl.int64) * stride_xh
              + (pw * DW_STRIDE).to(tl.int64) * stride_xw)
    cols, col_mask, cols_c = _columns(0, D, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    # The accumulators start at the bias (fp32): z = bias + sum over K.
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + tl.load(bias_ptr + cols_c).to(tl.float32)[None, :]
    if BLOCK_D_TAIL > 0:
        tail_cols, tail_mask, tail_cols_c = _columns(BLOCK_D, D, BLOCK_D_TAIL)
        acc_tail = (tl.zeros((BLOCK_M, BLOCK_D_TAIL), dtype=tl.float32)
                    + tl.load(bias_ptr + tail_cols_c).to(tl.float32)[None, :])
    for k0 in range(0, C, BLOCK_K):
        k = k0 + ks
        k_mask = k < C
        a = _window_means(x_ptr, x_rows, k, k_mask, stride_xc, stride_xh, stride_xw, DW_STRIDE, BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + k[:, None] + cols_c[None, :] * C, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if BLOCK_D_TAIL > 0:
            w_tail = tl.load(w_ptr + k[:, None] + tail_cols_c[None, :] * C, mask=k_mask[:, None], other=0.0)
            acc_tail = tl.dot(a, w_tail, acc_tail, input_precision=DOT_PRECISION)

    # LayerNorm over the D valid columns (both blocks), exact GELU, (+ x_t), all fp32.
    acc = tl.where(col_mask[None, :], acc, 0.0)
    total = tl.sum(acc, axis=1)
    if BLOCK_D_TAIL > 0:
        acc_tail = tl.where(tail_mask[None, :], acc_tail, 0.0)
        total += tl.sum(acc_tail, axis=1)
    mean = total / D
    centred = tl.where(col_mask[None, :], acc - mean[:, None], 0.0)
    squares = tl.sum(centred * centred, axis=1)
    if BLOCK_D_TAIL > 0:
        centred_tail = tl.where(tail_mask[None, :], acc_tail - mean[:, None], 0.0)
        squares += tl.sum(centred_tail * centred_tail, axis=1)
    rstd = 1.0 / tl.sqrt(squares / D + eps)
    rows = (b64 * (N + 1) + t + 1) * D  # the tokens' rows in x_t and out
    _layer_norm_gelu_store(centred, rstd, cols, col_mask, ln_w_ptr, ln_b_ptr, xt_ptr, out_ptr, rows, row_mask,
                           ADD_X_T)
    if BLOCK_D_TAIL > 0:
        _layer_norm_gelu_store(centred_tail, rstd, tail_cols, tail_mask, ln_w_ptr, ln_b_ptr, xt_ptr, out_ptr, rows,
                               row_mask, ADD_X_T)


@triton.jit
def pooled_projection_kernel(
    x_ptr, w_ptr, bias_ptr, pooled_ptr, z_ptr,
    M, N, n_w, C, D,
    stride_xb, stride_xc, stride_xh, stride_xw,
    DOT_PRECISION: tl.constexpr, DW_STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The backward's recompute with the forward's arithmetic (its window means and K steps): the
    pre-LayerNorm rows z = avgpool(x2) @ W^T + bias, stored fp32 as (B * N, D), and the pooled
    rows (B * N, C) in x2's dtype (the weight grad's GEMM operand). No LayerNorm here, so a program
    owns BLOCK_D columns (program_id(1)) of its BLOCK_M tokens instead of whole rows; the programs of
    the first column block store the pooled rows."""
    b, t, ph, pw, row_mask = _token_tile(M, N, n_w, BLOCK_M)
    rows = b.to(tl.int64) * N + t
    # valid rows, first column block only (integer product: the interpreter rejects bool & scalar masks)
    pooled_mask = (row_mask.to(tl.int32) * (tl.program_id(1) == 0).to(tl.int32)) != 0
    x_rows = (b.to(tl.int64) * stride_xb + (ph * DW_STRIDE).to(tl.int64) * stride_xh
              + (pw * DW_STRIDE).to(tl.int64) * stride_xw)
    cols, col_mask, cols_c = _columns(tl.program_id(1) * BLOCK_D, D, BLOCK_D)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + ks
        k_mask = k < C
        a = _window_means(x_ptr, x_rows, k, k_mask, stride_xc, stride_xh, stride_xw, DW_STRIDE, BLOCK_M, BLOCK_K)
        tl.store(pooled_ptr + rows[:, None] * C + k[None, :], a, mask=pooled_mask[:, None] & k_mask[None, :])
        w = tl.load(w_ptr + k[:, None] + cols_c[None, :] * C, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    z = acc + tl.load(bias_ptr + cols_c).to(tl.float32)[None, :]
    tl.store(z_ptr + rows[:, None] * D + cols[None, :], z, mask=row_mask[:, None] & col_mask[None, :])


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
    """The padded row width of the row-wise backward kernel: next_pow2(D), at least 128."""
    return max(128, triton.next_power_of_2(D))


def column_blocks(D: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D_TAIL) of the forward for D-wide rows: the largest power of two <= D, and the
    rest rounded up to a power of two (0 when nothing is left), each at least 16: 384 = 256 + 128,
    576 = 512 + 64, 1024 = 1024 + 0."""
    head = max(_MIN_BLOCK, 1 << (D.bit_length() - 1))
    return head, (max(_MIN_BLOCK, triton.next_power_of_2(D - head)) if D > head else 0)


def _block_k(dw_stride: int, gemm_dtype: torch.dtype) -> int:
    """K step of the forward and the recompute for 16-bit x2: 64 channels per load without pooling,
    32 at dw_stride 2, 16 (the smallest tl.dot K that triton 3.6 compiles) from 4 up, so that the
    DW_STRIDE^2 window loads of a K step stay at or above 8 KB per 64 tokens; fp32 x2: 16 (its
    bytes per K step are twice as many, its registers the limit)."""
    if gemm_dtype == torch.float32:
        return _MIN_BLOCK
    return {1: 64, 2: 32}.get(dw_stride, _MIN_BLOCK)


def fcu_down_config(D: int, gemm_dtype: torch.dtype, token_dtype: torch.dtype, precision: str,
                    dw_stride: int, add_x_t: bool) -> LaunchConfig:
    """fcu_down_kernel's config for token rows of D elements pooled over dw_stride windows of a
    channels-innermost x2 (:func:`_channels_innermost`), with or without + x_t: all of D in two
    column blocks (:func:`column_blocks`), K steps of :func:`_block_k`, the K loop in two stages (the
    next step's window loads in flight, as cp.async copies, during this one's MMAs).
    Tokens and warps, chosen with the compile matrix (kernels/COMPILE_MATRIX.md): 16-bit tokens
    with D <= 512 and dw_stride <= 4 take BLOCK_M = 64 (one wgmma tile on sm_90) on 8 warps (the
    64 x 384 fp32 accumulators are 96 registers a thread); fp32 tokens (fp32 x2, or autocast's fp32
    x_t and out), D > 512 and dw_stride 8 (64 window tiles a K step) spill there (80-576 B, at 16
    warps too) and take 32 tokens (mma.sync); fp32 tokens take 16
    unless D has a tail block and D <= 512 (Conformer-Ti/S's 384): Conformer-B's 576 spills 16-80 B
    at 32 tokens on 8 or 16 warps, a power-of-two D of 256 8-16 B on sm_90; D > 640 (the 1024-wide
    edge model) takes 16 (32 spill 160-336 B). Warps: :func:`_fcu_down_warps`; the squeeze without
    + x_t in some fp32-token configs: 16 warps and one stage (:func:`_unpipelined_alone`)."""
    block_d, tail = column_blocks(D)
    wgmma_tile = token_dtype != torch.float32 and D <= 512 and dw_stride <= 4
    fp32_narrow = token_dtype == torch.float32 and not (tail and D <= 512)  # the 16-token cases below
    block_m = 64 if wgmma_tile else (16 if fp32_narrow or D > 640 else 32)
    alone = not add_x_t and token_dtype == torch.float32 and _unpipelined_alone(D, gemm_dtype, precision, dw_stride)
    return LaunchConfig(dict(ADD_X_T=add_x_t, DOT_PRECISION=precision, DW_STRIDE=dw_stride, BLOCK_M=block_m,
                             BLOCK_K=_block_k(dw_stride, gemm_dtype), BLOCK_D=block_d, BLOCK_D_TAIL=tail),
                        num_warps=16 if alone else _fcu_down_warps(D, token_dtype == torch.float32, dw_stride),
                        num_stages=1 if alone else 2)


def _fcu_down_warps(D: int, fp32_tokens: bool, dw_stride: int) -> int:
    """fcu_down_kernel's warps (see :func:`fcu_down_config`), chosen with the compile matrix under
    triton 3.6 to 3.9: 8; for D > 640 16 with 16-bit tokens (8 spill there) and 8 with fp32 ones (16
    spill 8-32 B). fp32 tokens at dw_stride <= 4: 4 at D <= 256 (8 spill 8-16 B on sm_90, ptxas
    holding them to 48-128 registers), 16 above (Conformer-S's 384 and Conformer-B's 576: on 8 warps
    ptxas holds them to 128 registers on sm_90 and they spill 8 B under triton 3.7 and 3.8; 4 spill
    48 B). At dw_stride 8 (64 window tiles a K step) 4 and 16 spill (8-264 B), 8 does not. The
    squeeze without + x_t deviates: :func:`_unpipelined_alone`."""
    if D > 640:
        return 8 if fp32_tokens else 16
    if fp32_tokens and dw_stride <= 4:
        return 4 if D <= 256 else 16
    return 8


def _unpipelined_alone(D: int, gemm_dtype: torch.dtype, precision: str, dw_stride: int) -> bool:
    """Whether the squeeze without + x_t (the module alone) with fp32 tokens runs on 16 warps with its
    K loop in one stage instead of :func:`_fcu_down_warps` and two. Without the x_t tile ptxas
    trades 8-16 B of spills for occupancy (holding 4 to 16 warps to 32-128 registers), in different
    configs under each of triton 3.6 to 3.9; among the configs built under all four (every
    specialisation the workloads launch, kernels/COMPILE_MATRIX.md), these are clean where the
    default is not: 128 < D <= 256; 512 < D <= 640 with TF32 dots; D <= 128 with a 16-bit x2
    (autocast) at dw_stride 4. (A .maxnreg of one CTA's register share also cleans all of them, but
    torch.compile's wrap_triton does not pass Triton's ``maxnreg`` launch option on.)"""
    if dw_stride > 4:
        return False
    return (128 < D <= 256 or (512 < D <= 640 and precision == "tf32")
            or (D <= 128 and gemm_dtype != torch.float32 and dw_stride == 4))


def pooled_projection_config(D: int, gemm_dtype: torch.dtype, precision: str, dw_stride: int) -> LaunchConfig:
    """pooled_projection_kernel's config: the forward's token tiles (of x2's dtype), window means,
    K step (its rounding) and stages, over column blocks of _RECOMPUTE_BLOCK_D; 4 warps, 8 for fp32."""
    # The forward's tiles and K step; its warps and stages (which depend on add_x_t) are not taken.
    forward = fcu_down_config(D, gemm_dtype, gemm_dtype, precision, dw_stride, add_x_t=True).constexprs
    constexprs = {k: forward[k] for k in ("DOT_PRECISION", "DW_STRIDE", "BLOCK_M", "BLOCK_K")}
    num_warps = 2 * _RECOMPUTE_WARPS if gemm_dtype == torch.float32 else _RECOMPUTE_WARPS  # fp32 spills at 4
    return LaunchConfig({**constexprs, "BLOCK_D": _RECOMPUTE_BLOCK_D}, num_warps=num_warps, num_stages=2)


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


def _channels_innermost(x2: torch.Tensor) -> torch.Tensor:
    """x2 as the kernels read it, its channels the innermost dimension (stride 1: channels_last, or
    a view of it), so that a K step's loads are contiguous: an x2 whose channels are strided (NCHW)
    is copied to channels_last (one read and write of x2; the kernels' gathered NCHW loads took 16
    channels a step and still spilled up to 64 B, kernels/COMPILE_MATRIX.md)."""
    return x2 if x2.stride(1) == 1 else x2.contiguous(memory_format=torch.channels_last)


@triton_op("fastconformer::fcu_down", mutates_args=())
def fcu_down_op(x2: torch.Tensor, x_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int, eps: float,
                add_x_t: bool) -> torch.Tensor:
    """x2 (B, C, H, W) any strides (read channels-innermost: :func:`_channels_innermost`), x_t
    (B, 1+N, D) contiguous, weight (D, C) and bias / ln_weight / ln_bias (D,) contiguous ->
    (B, 1+N, D) contiguous in x_t's dtype."""
    B, C, H, W = x2.shape
    D = weight.shape[0]
    n_w = W // dw_stride
    N = (H // dw_stride) * n_w
    out = torch.empty((B, N + 1, D), device=x2.device, dtype=x_t.dtype)
    if B == 0:
        return out
    x2 = _channels_innermost(x2)
    config = fcu_down_config(D, x2.dtype, x_t.dtype, dot_precision(x2.dtype), dw_stride, add_x_t)
    launch(wrap_triton(fcu_down_kernel), (triton.cdiv(B * N, config.constexprs["BLOCK_M"]),), (
        x2, weight, bias, ln_weight, ln_bias, x_t, out, B * N, N, n_w, C, D, eps, *x2.stride()), config)
    return out


@triton_op("fastconformer::fcu_down_backward", mutates_args=())
def fcu_down_backward_op(grad_out: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_stride: int,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out (B, 1+N, D) in the token dtype with unit stride along D, the forward's x2 (any
    strides; an NCHW one is copied to channels_last again for the recompute, not kept from the
    forward), weight (D, C) and bias / ln_weight / ln_bias (D,) -> (grad x2 (B, C, H, W) in x2's
    dtype, channels_last when x2 is, else contiguous; grad weight (D, C) in weight's dtype; grad
    bias, grad ln_weight, grad ln_bias (D,) fp32). The cls row's gradient is not handled here.

    The pre-LayerNorm rows are recomputed (the forward's window means and K steps)
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
        x2_read = _channels_innermost(x2)
        config = pooled_projection_config(D, x2.dtype, dot_precision(x2.dtype), s)
        launch(wrap_triton(pooled_projection_kernel),
               (triton.cdiv(M, config.constexprs["BLOCK_M"]), triton.cdiv(D, _RECOMPUTE_BLOCK_D)),
               (x2_read, weight, bias, pooled, z, M, N, n_w, C, D, *x2_read.stride()), config)
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
    x_t = x_t.to(token_dtype).contiguous()  # no copy for the model's own (contiguous) token stream
    return fcu_down_op(x2.to(gemm_dtype), x_t, weight.flatten(1).to(gemm_dtype).contiguous(), *params,
                       int(dw_stride), float(eps), bool(add_x_t))

