"""Multi-head self-attention in one flash-style kernel: ``out = softmax(q kᵀ · scale) v``.

Each program owns one (batch, head, block of BLOCK_M queries). It reads its q rows and then
streams the keys and values in blocks of BLOCK_N straight out of the qkv projection's output
(B, N, 3·heads·head_dim) through strides (no permute, no copies), keeping an online softmax:
a running row maximum ``m`` and denominator ``l`` in fp32 and an fp32 accumulator, so the N×N
score matrix never exists. Logits stay in fp32 (``q kᵀ`` accumulates in fp32), so fp16 inputs
whose scores reach ~1e4 do not overflow. ``exp2`` is used with log2(e) folded into the scale.
The output is written in (B, N, heads·head_dim), the layout ``proj`` reads, together with the
per-row log-sum-exp of the scaled logits (fp32, (B, heads, N)), saved for the backward.

Any N (keys past N are masked to -inf, query rows past N are not stored), head_dim up to
MAX_HEAD_DIM (padded to the next power of two, at least 16, with masks), any scale.
Dtypes: fp32 (``tl.dot`` in TF32 only where torch's matmuls allow it), fp16, bf16; the
probabilities are rounded to the input dtype before ``p @ v``, as in flash attention.

Backward: recomputed with torch ops from q, k, v and the saved log-sum-exp (a flash-style
Triton backward is a later step).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastconformer.modules.attention import qkv_heads_shape

from . import CompileSpec, allow_tf32, tl_dtype

MAX_HEAD_DIM = 128
_BLOCK_DHS = (16, 32, 64, 128)
LOG2E = math.log2(math.e)

# Launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages), fixed until autotuning, by how the dots run
# (fp16/bf16 and TF32 on tensor cores, IEEE fp32 on FMA units, which needs far more registers) and
# by BLOCK_DH: (config for BLOCK_DH <= 64, config for BLOCK_DH = 128). Every one compiles without
# spills for sm_80 and sm_90, with and without the divisibility-by-16 specialisation of pointers,
# strides and head_dim that the runtime applies when it can.
_CONFIGS = {
    "fp16/bf16": ((128, 64, 8, 3), (64, 32, 4, 3)),
    "tf32": ((64, 32, 8, 2), (64, 32, 8, 2)),
    "ieee": ((32, 32, 4, 2), (32, 32, 8, 2)),
}


@triton.jit
def attention_fwd_kernel(
    qkv_ptr, out_ptr, lse_ptr,
    N, H, head_dim, qk_scale,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program per (batch, head, query block), query blocks of one head adjacent in launch order.

    qkv (B, N, 3, H, head_dim) with unit stride along the last three dims flattened (the Linear's
    output); out (B, N, H, head_dim) likewise; lse (B, H, N) fp32, contiguous. qk_scale is the
    softmax scale times log2(e)."""
    num_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_m).to(tl.int64)
    start_m = (pid % num_m) * BLOCK_M
    b = bh // H
    h = bh % H
    dim = H * head_dim

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_m = offs_m < N
    mask_d = offs_d < head_dim

    q_base = qkv_ptr + b * stride_qkv_b + h * head_dim
    k_base = q_base + dim
    v_base = q_base + 2 * dim
    q = tl.load(q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DH), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kt = tl.load(k_base + cols[None, :] * stride_qkv_n + offs_d[:, None],
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_DH, BLOCK_N): kᵀ
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # fp32 logits, log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has at least one key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_qkv_n + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + b * stride_out_b + offs_m[:, None] * stride_out_n + h * head_dim + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log: ln(sum exp(scale·q·k))
    tl.store(lse_ptr + bh * N + offs_m, lse, mask=mask_m)


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for fp32 only where torch's matmuls use it (ignored for fp16/bf16)."""
    return "tf32" if allow_tf32(dtype) else "ieee"


def _launch_config(head_dim: int, dtype: torch.dtype, input_precision: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_DH, num_warps, num_stages) for head_dim, the input dtype and dot precision."""
    block_dh = max(_BLOCK_DHS[0], triton.next_power_of_2(head_dim))
    kind = input_precision if dtype == torch.float32 else "fp16/bf16"
    block_m, block_n, num_warps, num_stages = _CONFIGS[kind][block_dh > 64]
    return block_m, block_n, block_dh, num_warps, num_stages


@triton_op("fastconformer::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3·heads·head_dim) with unit last stride -> (out (B, N, heads·head_dim) in qkv's dtype,
    lse (B, heads, N) fp32: the natural-log log-sum-exp of each row's scaled logits)."""
    B, N, H, Dh = qkv_heads_shape(qkv, num_heads)
    out = torch.empty((B, N, H * Dh), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    precision = _input_precision(qkv.dtype)
    block_m, block_n, block_dh, num_warps, num_stages = _launch_config(Dh, qkv.dtype, precision)
    grid = (triton.cdiv(N, block_m) * B * H,)
    wrap_triton(attention_fwd_kernel)[grid](
        qkv, out, lse, N, H, Dh, scale * LOG2E, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DH=block_dh,
        INPUT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, grad_out, _grad_lse):
    """Recompute P = exp(scale·q kᵀ - lse) with torch ops (fp32 for half inputs) and apply the
    softmax-attention backward: dv = Pᵀ dO, dS = P ∘ (dO vᵀ - rowsum(dO ∘ O)), dq = scale·dS k,
    dk = scale·dSᵀ q."""
    qkv, out, lse = ctx.saved_tensors
    B, N, H, Dh = qkv_heads_shape(qkv, ctx.num_heads)
    dtype = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v = qkv.to(dtype).unflatten(-1, (3, H, Dh)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
    o, do = (t.to(dtype).unflatten(-1, (H, Dh)).transpose(1, 2) for t in (out, grad_out))
    p = torch.exp((q @ k.transpose(-2, -1)) * ctx.scale - lse.unsqueeze(-1))
    dv = p.transpose(-2, -1) @ do
    ds = p * (do @ v.transpose(-2, -1) - (do * o).sum(-1, keepdim=True)) * ctx.scale
    dq = ds @ k
    dk = ds.transpose(-2, -1) @ q
    grad_qkv = torch.stack((dq, dk, dv), dim=0).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * Dh)
    return grad_qkv.to(qkv.dtype), None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.attention.attention` (same arguments and result)."""
    _, _, _, head_dim = qkv_heads_shape(qkv, num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention's Triton kernel handles head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    tl_dtype(qkv.dtype)  # TypeError for dtypes the kernel does not take
    if qkv.stride(-1) != 1:  # the Linear's output always has it; anything else is read through one copy
        qkv = qkv.contiguous()
    out, _ = attention_op(qkv, num_heads, float(scale))
    return out


_ALIGNED_ARGS = ("qkv_ptr", "out_ptr", "lse_ptr", "head_dim", "stride_qkv_b", "stride_qkv_n", "stride_out_b",
                 "stride_out_n")


def compile_specs():
    """Every (dtype, dot precision, BLOCK_DH) the launcher can pick, with its table config."""
    variants = [(torch.float32, "tf32"), (torch.float32, "ieee"), (torch.float16, "ieee"), (torch.bfloat16, "ieee")]
    for dtype, precision in variants:
        ptr = tl_dtype(dtype)
        for block_dh in _BLOCK_DHS:
            block_m, block_n, _, num_warps, num_stages = _launch_config(block_dh, dtype, precision)
            tag = f"{ptr[1:]}" + (f"-{precision}" if dtype == torch.float32 else "")
            for hints in ((), _ALIGNED_ARGS):  # as compiled for unaligned and for 16-aligned launches
                yield CompileSpec(
                    name=f"attention_fwd[{tag},BLOCK_DH={block_dh},BLOCK_M={block_m},BLOCK_N={block_n}"
                         f"{',aligned' if hints else ''}]",
                    kernel=attention_fwd_kernel,
                    signature={"qkv_ptr": ptr, "out_ptr": ptr, "lse_ptr": "*fp32", "N": "i32", "H": "i32",
                               "head_dim": "i32", "qk_scale": "fp32", "stride_qkv_b": "i32", "stride_qkv_n": "i32",
                               "stride_out_b": "i32", "stride_out_n": "i32", "BLOCK_M": "constexpr",
                               "BLOCK_N": "constexpr", "BLOCK_DH": "constexpr", "INPUT_PRECISION": "constexpr"},
                    constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DH": block_dh,
                                "INPUT_PRECISION": precision},
                    num_warps=num_warps,
                    num_stages=num_stages,
                    divisible_by_16=hints,
                )
