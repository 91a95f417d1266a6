"""Residual add + LayerNorm in one pass: ``s = x + y; n = LayerNorm(s)``, returning both.

In a pre-norm transformer block every residual add is followed by the next LayerNorm
(``x + attn(...)`` then ``norm2``; in a ConvTransBlock ``x_st + x_t`` then ``norm1``), so the sum
is written once and normalised from registers instead of being read back.

Shapes: x, y (M, D) rows (any leading dims are flattened by the caller), weight and bias (D,).
Dtypes: fp32, fp16, bf16 in and out; the mean, variance and normalisation are fp32, the sum is
rounded to the input dtype first (exactly what ``F.layer_norm(x + y)`` sees).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import CompileSpec, tl_dtype

MAX_D = 4096
_BLOCK_DS = (128, 256, 512, 1024, 2048, 4096)


@triton.jit
def add_layer_norm_kernel(
    x_ptr, y_ptr, sum_ptr, out_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    D, eps,
    BLOCK_D: tl.constexpr,
):
    """One program per row: s = x + y (stored), then out = (s - mean) * rstd * w + b."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0)
    s = x + y  # in the input dtype, as torch rounds it
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


def _launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D elements."""
    block_d = max(_BLOCK_DS[0], triton.next_power_of_2(D))
    return block_d, min(max(block_d // 256, 1), 8)


@triton_op("fastconformer::add_layer_norm", mutates_args=())
def add_layer_norm_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y (M, D) contiguous, same dtype -> (sum (M, D) in x's dtype, normed (M, D) in out_dtype,
    mean (M,) fp32, rstd (M,) fp32)."""
    M, D = x.shape
    s = torch.empty_like(x)
    out = torch.empty_like(x, dtype=out_dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    block_d, num_warps = _launch_config(D)
    wrap_triton(add_layer_norm_kernel)[(M,)](x, y, s, out, weight, bias, mean, rstd, D, eps,
                                             BLOCK_D=block_d, num_warps=num_warps)
    return s, out, mean, rstd


def _setup_context(ctx, inputs, output):
    _, _, weight, bias, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, bias, mean, rstd)


def _backward(ctx, grad_sum, grad_out, _grad_mean, _grad_rstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    D = s.shape[-1]
    grad_out = torch.zeros_like(s) if grad_out is None else grad_out.contiguous()
    grad_s, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_out.to(s.dtype), s, [D], mean.unsqueeze(-1), rstd.unsqueeze(-1), weight.to(s.dtype),
        bias.to(s.dtype), [True, weight.requires_grad, bias.requires_grad])
    if grad_sum is not None:
        grad_s = grad_s + grad_sum
    return grad_s, grad_s, grad_w, grad_b, None, None


add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm_triton(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`fastconformer.modules.add_layer_norm` (same arguments and results, the
    same dtype rules as ``F.layer_norm(x + y)``: the sum in the promoted dtype, the normalised rows
    in float32 under autocast)."""
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(f"add_layer_norm's Triton kernel handles rows of at most {MAX_D} elements, got {D}")
    lead = torch.broadcast_shapes(x.shape, y.shape)[:-1]
    dtype = torch.promote_types(x.dtype, y.dtype)
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else dtype
    x, y = (t.to(dtype).expand(*lead, D).reshape(-1, D).contiguous() for t in (x, y))
    s, out, _, _ = add_layer_norm_op(x, y, weight.contiguous(), bias.contiguous(), float(eps), out_dtype)
    return s.view(*lead, D), out.view(*lead, D)


def compile_specs():
    """Every (dtype, BLOCK_D) the launcher can pick."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ptr = tl_dtype(dtype)
        for block_d in _BLOCK_DS:
            _, num_warps = _launch_config(block_d)
            yield CompileSpec(
                name=f"add_layer_norm[{ptr[1:]},BLOCK_D={block_d}]",
                kernel=add_layer_norm_kernel,
                signature={"x_ptr": ptr, "y_ptr": ptr, "sum_ptr": ptr, "out_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr,
                           "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "D": "i32", "eps": "fp32",
                           "BLOCK_D": "constexpr"},
                constexprs={"BLOCK_D": block_d},
                num_warps=num_warps,
            )
