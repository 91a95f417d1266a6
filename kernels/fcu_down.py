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

from ..modules.fcu_down import check_fcu_down_inputs
from . import CompileSpec, allow_tf32, tl_dtype

MAX_D = 1024
_BLOCK_DS = (128, 256, 512, 1024)
_NUM_WARPS = {128: 8, 256: 8, 512: 16, 1024: 8}
_BLOCK_M = 16  # tokens per program: the smallest tl.dot tile, so a (16, BLOCK_D) fp32 row block fits in registers
_BLOCK_P = 4  # window pixels averaged per load: dw_stride 2 in one step, 4 in 4, 8 in 16 (1: one of 4 lanes)
# (GEMM dtype, token dtype) pairs the kernel is built for: one dtype throughout, or half-precision
# inputs with fp32 tokens (autocast: x2 in fp16/bf16, the fp32 residual stream x_t). Every mix of
# fp32/fp16/bf16 inputs maps to one of them (the token dtype is x_t's promoted with LayerNorm's).
_DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
                (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))


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
    pid = tl.program_id(0)
    n_seg = tl.cdiv(n_w, BLOCK_M)
    b = pid // (n_h * n_seg)
    rest = pid - b * (n_h * n_seg)
    ph = rest // n_seg
    pw = (rest - ph * n_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = pw < n_w
    pw = tl.minimum(pw, n_w - 1)
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
        w = tl.load(w_ptr + k[:, None] + cols_c[None, :] * C, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

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


def _launch_config(D: int, gemm_dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps, num_stages) for token rows of D elements: the whole row in one
    program (BLOCK_D = next_pow2(D), at least 128). Warps and K step are the fewest registers
    without spills found for each BLOCK_D in the compile matrix (sm_80 and sm_90): more warps thin
    the (16, BLOCK_D) accumulator per thread, but at 16 warps (128 registers per thread at most)
    BLOCK_D 1024 spills; there fp32 takes a K step of 8 to fit its wider W tile."""
    block_d = max(_BLOCK_DS[0], triton.next_power_of_2(D))
    block_k = 8 if (block_d >= 1024 and gemm_dtype == torch.float32) else 16
    return block_k, block_d, _NUM_WARPS[block_d], 1


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32" if allow_tf32(dtype) else "ieee"


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
    precision = _dot_precision(x2.dtype)
    block_k, block_d, num_warps, num_stages = _launch_config(D, x2.dtype)
    n_h = H // dw_stride
    grid = (B * n_h * triton.cdiv(n_w, _BLOCK_M),)
    wrap_triton(fcu_down_kernel)[grid](
        x2, weight, bias, ln_weight, ln_bias, x_t, out,
        N, n_h, n_w, C, D, dw_stride, 1.0 / (dw_stride * dw_stride), eps, int(add_x_t),
        *x2.stride(), x_t.stride(0), x_t.stride(1),
        DOT_PRECISION=precision, BLOCK_M=_BLOCK_M, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_P=_BLOCK_P,
        num_warps=num_warps, num_stages=num_stages)
    return out


def _setup_context(ctx, inputs, output):
    x2, _, weight, bias, ln_weight, ln_bias, dw_stride, eps, add_x_t = inputs
    ctx.save_for_backward(x2, weight, bias, ln_weight, ln_bias)
    ctx.dw_stride, ctx.eps, ctx.add_x_t = dw_stride, eps, add_x_t


def _backward(ctx, grad_out):
    """Recomputes the pooled input, projection and LayerNorm statistics with torch ops, in the token
    dtype (fp32 under mixed precision), and returns gradients in each input's dtype."""
    x2, weight, bias, ln_weight, ln_bias = ctx.saved_tensors
    s, eps = ctx.dw_stride, ctx.eps
    dtype = grad_out.dtype
    B, C, H, W = x2.shape
    D = weight.shape[0]
    aten = torch.ops.aten

    x2c = x2.to(dtype)
    pooled = (aten.avg_pool2d(x2c, [s, s], [s, s]) if s > 1 else x2c).flatten(2).transpose(1, 2)  # (B, N, C)
    wc = weight.to(dtype)
    with torch.autocast(x2.device.type, enabled=False):
        z = torch.nn.functional.linear(pooled, wc, bias)  # (B, N, D)
    y, mean, rstd = aten.native_layer_norm(z, [D], ln_weight, ln_bias, eps)
    grad_tokens = grad_out[:, 1:]
    grad_y = aten.gelu_backward(grad_tokens, y)
    grad_z, grad_ln_w, grad_ln_b = aten.native_layer_norm_backward(
        grad_y, z, [D], mean, rstd, ln_weight, ln_bias, [True, ctx.needs_input_grad[4], ctx.needs_input_grad[5]])

    grad_x2 = grad_x_t = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_pooled = (grad_z @ wc).transpose(1, 2).reshape(B, C, H // s, W // s)
        if s > 1:
            grad_pooled = aten.avg_pool2d_backward(grad_pooled, x2c, [s, s], [s, s], [0, 0], False, True, None)
        grad_x2 = grad_pooled.to(x2.dtype)
    if ctx.needs_input_grad[1]:
        if ctx.add_x_t:
            grad_x_t = grad_out.clone()
            grad_x_t[:, 0] *= 2
        else:
            grad_x_t = torch.zeros_like(grad_out)
            grad_x_t[:, 0] = grad_out[:, 0]
    if ctx.needs_input_grad[2]:
        grad_w = (grad_z.reshape(-1, D).t() @ pooled.reshape(-1, C)).to(weight.dtype)
    if ctx.needs_input_grad[3]:
        grad_b = grad_z.sum((0, 1))
    return grad_x2, grad_x_t, grad_w, grad_b, grad_ln_w, grad_ln_b, None, None, None


fcu_down_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtypes(x2: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
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
    check_fcu_down_inputs(x2, x_t, weight, bias, ln_weight, ln_bias, dw_stride)
    D = weight.shape[0]
    if D > MAX_D:
        raise ValueError(f"fcu_down's Triton kernel handles embed dims of at most {MAX_D}, got weight of shape "
                         f"{tuple(weight.shape)}")
    gemm_dtype, ln_dtype = _autocast_dtypes(x2)
    # The reference's torch.cat promotes the cls row (x_t's dtype) and the tokens (LayerNorm's dtype).
    token_dtype = torch.promote_types(x_t.dtype, ln_dtype)
    tl_dtype(gemm_dtype), tl_dtype(token_dtype)  # TypeError for dtypes the kernel is not built for
    params = [p.to(token_dtype).contiguous() for p in (bias, ln_weight, ln_bias)]
    x_t = x_t.to(token_dtype)
    if x_t.stride(-1) != 1:
        x_t = x_t.contiguous()
    return fcu_down_op(x2.to(gemm_dtype), x_t, weight.flatten(1).to(gemm_dtype).contiguous(), *params,
                       int(dw_stride), float(eps), bool(add_x_t))


def compile_specs():
    """Every (dtype pair, dot precision, BLOCK_D) the launcher can pick."""
    for gemm_dtype, token_dtype in _DTYPE_PAIRS:
        xp, tp = tl_dtype(gemm_dtype), tl_dtype(token_dtype)
        for precision in ("ieee", "tf32") if gemm_dtype == torch.float32 else ("ieee",):
            for block_d in _BLOCK_DS:
                block_k, _, num_warps, num_stages = _launch_config(block_d, gemm_dtype)
                yield CompileSpec(
                    name=f"fcu_down[{xp[1:]}->{tp[1:]},{precision},BLOCK_D={block_d}]",
                    kernel=fcu_down_kernel,
                    signature={"x_ptr": xp, "w_ptr": xp, "bias_ptr": tp, "ln_w_ptr": tp, "ln_b_ptr": tp,
                               "xt_ptr": tp, "out_ptr": tp,
                               **dict.fromkeys(("N", "n_h", "n_w", "C", "D", "dw_stride"), "i32"),
                               "inv_area": "fp32", "eps": "fp32", "add_x_t": "i32",
                               **dict.fromkeys(("stride_xb", "stride_xc", "stride_xh", "stride_xw",
                                                "stride_tb", "stride_tn"), "i32"),
                               **dict.fromkeys(("DOT_PRECISION", "BLOCK_M", "BLOCK_K", "BLOCK_D", "BLOCK_P"),
                                               "constexpr")},
                    constexprs={"DOT_PRECISION": precision, "BLOCK_M": _BLOCK_M, "BLOCK_K": block_k,
                                "BLOCK_D": block_d, "BLOCK_P": _BLOCK_P},
                    num_warps=num_warps,
                    num_stages=num_stages,
                )
