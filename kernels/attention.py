"""Multi-head self-attention ``out = softmax(q kᵀ · scale) v`` in flash-style kernels: the forward
in one kernel, the backward in three.

Forward: each program owns one (batch, head, block of BLOCK_M queries). It reads its q rows and then
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

Backward (``fastconformer::attention_backward``, its own triton_op, called from the registered
autograd backward so torch.compile traces it): flash-style, from qkv, out and the saved
log-sum-exp only (the training step saves no N×N matrix). With P = exp(scale·q kᵀ − lse),
dP = dO vᵀ and delta = rowsum(dO ∘ O) = rowsum(P ∘ dP):

    dV = Pᵀ dO,   dS = P ∘ (dP − delta),   dQ = scale · dS k,   dK = scale · dSᵀ q.

Three kernels: ``attention_bwd_preprocess_kernel`` computes delta (fp32, (B, heads, N));
``attention_bwd_dkdv_kernel`` gives each program one block of keys, keeps its k, v and the fp32 dK,
dV accumulators on chip and streams the query blocks, recomputing Pᵀ block by block;
``attention_bwd_dq_kernel`` gives each program one block of queries and streams the key blocks.
Splitting dQ from dK/dV recomputes q kᵀ once more but needs no atomics, so the gradients are
deterministic (bitwise reproducible run to run). q, k, v are read from the qkv layout and dQ, dK,
dV written into a grad_qkv of the same layout (B, N, 3·heads·head_dim) through strides. P and dS
are rounded to the input dtype before their dots, as in the forward; everything accumulates in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import LaunchConfig, dot_precision, launch, tl_dtype

MAX_HEAD_DIM = 128
_BLOCK_DHS = (16, 32, 64, 128)
LOG2E = math.log2(math.e)  # the launchers pass scale·log2(e), so the kernels work in exp2 / log2 units
# The same two constants for the kernels (a jit function reads only constexpr globals).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))


def _heads_shape(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    """(B, N, heads, head_dim) of a qkv projection output (B, N, 3·heads·head_dim), already checked
    by the dispatch (``fastconformer.modules.attention.check_qkv``)."""
    B, N, C3 = qkv.shape
    return B, N, num_heads, C3 // (3 * num_heads)

# Launch configs (BLOCK_HELD, BLOCK_STREAMED, num_warps, num_stages) by direction ("fwd": the forward
# holds BLOCK_M queries and streams keys in blocks of BLOCK_N; "dkdv" holds BLOCK_N keys and streams
# queries in blocks of BLOCK_M; "dq" holds BLOCK_M queries and streams keys in blocks of BLOCK_N), by
# how the dots run (fp16/bf16 and TF32 on tensor cores, IEEE fp32 on FMA units, which needs far more
# registers) and by BLOCK_DH: (config for BLOCK_DH <= 64, config for BLOCK_DH = 128). A tuple of
# streamed blocks is chosen from by N (:func:`_streamed_block`). fp16/bf16 at BLOCK_DH <= 64 (every
# Conformer) is chosen with the performance model (kernels/PERF_MODEL.md) at Conformer's N = 197,
# 50, 1051 and 4201: 64-row held blocks (wgmma's M; 128 rows pad no less and make half as many
# programs), 3 stages (the streamed loop waits on half as many round trips as with 2), 4 warps; the
# backward streams 32 (64 need 235 registers in dK/dV on sm_90 and spill 24 B in dQ on sm_80). The
# fp32 rows are the largest tiles that build without spills for sm_80 and sm_90 under every
# triton from 3.6 to 3.9 (kernels/COMPILE_MATRIX.md): IEEE forwards on 8 warps (4 spill 8 B on sm_90
# under 3.7), the TF32 dQ streams 16 keys (32 spill 8 B on sm_80 under 3.6), and at BLOCK_DH 128 the
# IEEE forward streams 16 keys and dK/dV 16 queries on 4 warps (32 on 8 spill 8-120 B under 3.6).
_CONFIGS = {
    ("fwd", "fp16/bf16"): ((64, (32, 64), 4, 3), (64, 32, 4, 3)),
    ("fwd", "tf32"): ((64, 32, 8, 2), (64, 32, 8, 2)),
    ("fwd", "ieee"): ((32, 32, 8, 2), (32, 16, 8, 2)),
    ("dkdv", "fp16/bf16"): ((64, 32, 4, 3), (32, 32, 4, 2)),
    ("dkdv", "tf32"): ((64, 32, 8, 1), (32, 32, 8, 2)),
    ("dkdv", "ieee"): ((32, 16, 4, 2), (32, 16, 4, 2)),
    ("dq", "fp16/bf16"): ((64, 32, 4, 3), (32, 32, 4, 2)),
    ("dq", "tf32"): ((64, 16, 8, 1), (32, 32, 8, 2)),
    ("dq", "ieee"): ((32, 16, 4, 2), (32, 32, 8, 2)),
}
_PADDING_SLACK = 1 / 16  # padding a wider streamed block may add over a narrower one


def _streamed_block(N: int, candidates: tuple[int, ...]) -> int:
    """The widest of the candidate streamed blocks whose padded N (the keys or queries every held
    block runs through) is within _PADDING_SLACK of the least padded one's: at N = 197, 64-key
    blocks run 256 keys against 224 for 32-key ones (77% useful vs 88%), so 32; at N = 1051, 1088
    against 1056 (3% more) for half the loop trips, so 64; at N = 50 both pad to 64."""
    padded = {block: triton.cdiv(N, block) * block for block in candidates}
    least = min(padded.values())
    return max(block for block, n in padded.items() if n <= (1 + _PADDING_SLACK) * least)


@triton.jit
def _head_block(N, H, head_dim, BLOCK: tl.constexpr):
    """This program's (batch·head index bh (int64), batch b, head h, the indices of its block of
    BLOCK rows (BLOCK,) and their mask (< N), model width H·head_dim); the blocks of one head are
    adjacent in launch order."""
    num_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    bh = (pid // num_blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = (pid % num_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    return bh, b, h, offs, mask, H * head_dim


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
    bh, b, h, offs_m, mask_m, dim = _head_block(N, H, head_dim, BLOCK_M)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DH)
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
    lse = (m_i + tl.math.log2(l_i)) * _LN2  # back to natural log: ln(sum exp(scale·q·k))
    tl.store(lse_ptr + bh * N + offs_m, lse, mask=mask_m)


def _block_dh(head_dim: int) -> int:
    """The padded head dimension the kernels tile: the next power of two, at least 16."""
    return max(_BLOCK_DHS[0], triton.next_power_of_2(head_dim))


def _config_kind(dtype: torch.dtype, input_precision: str) -> str:
    """How the dots run: the second key of the launch-config table."""
    return input_precision if dtype == torch.float32 else "fp16/bf16"


def _config(direction: str, N: int, head_dim: int, dtype: torch.dtype, input_precision: str, held: str,
            streamed: str) -> LaunchConfig:
    """The _CONFIGS entry for (direction, N, head_dim, dtype, dot precision) as a config whose ``held``
    block constexpr (BLOCK_M or BLOCK_N) is BLOCK_HELD and ``streamed`` one BLOCK_STREAMED."""
    block_dh = _block_dh(head_dim)
    block_held, block_streamed, num_warps, num_stages = _CONFIGS[direction, _config_kind(dtype, input_precision)][
        block_dh > 64]
    if isinstance(block_streamed, tuple):
        block_streamed = _streamed_block(N, block_streamed)
    return LaunchConfig({held: block_held, streamed: block_streamed, "BLOCK_DH": block_dh,
                         "INPUT_PRECISION": input_precision}, num_warps=num_warps, num_stages=num_stages)


def attention_fwd_config(N: int, head_dim: int, dtype: torch.dtype, input_precision: str) -> LaunchConfig:
    """attention_fwd_kernel's config for N tokens, head_dim, the input dtype and the dot precision:
    BLOCK_M queries held, keys streamed in blocks of BLOCK_N."""
    return _config("fwd", N, head_dim, dtype, input_precision, held="BLOCK_M", streamed="BLOCK_N")


@triton_op("fastconformer::attention", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3·heads·head_dim) with unit last stride -> (out (B, N, heads·head_dim) in qkv's dtype,
    lse (B, heads, N) fp32: the natural-log log-sum-exp of each row's scaled logits)."""
    B, N, H, Dh = _heads_shape(qkv, num_heads)
    out = torch.empty((B, N, H * Dh), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    config = attention_fwd_config(N, Dh, qkv.dtype, dot_precision(qkv.dtype))
    grid = (triton.cdiv(N, config.constexprs["BLOCK_M"]) * B * H,)
    launch(wrap_triton(attention_fwd_kernel), grid, (
        qkv, out, lse, N, H, Dh, scale * LOG2E, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1)), config)
    return out, lse


_PREPROCESS_BLOCK_M, _PREPROCESS_WARPS = 64, 4


def attention_bwd_preprocess_config(head_dim: int) -> LaunchConfig:
    """attention_bwd_preprocess_kernel's config; one stage (no loop)."""
    return LaunchConfig(dict(BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_DH=_block_dh(head_dim)), num_warps=_PREPROCESS_WARPS,
                        num_stages=1)


@triton.jit
def attention_bwd_preprocess_kernel(
    out_ptr, dout_ptr, delta_ptr,
    N, H, head_dim,
    stride_out_b, stride_out_n, stride_dout_b, stride_dout_n,
    BLOCK_M: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    """delta[b, h, n] = sum_d out[b, n, h, d] · dout[b, n, h, d] in fp32.

    One program per (batch, head, block of BLOCK_M rows). out and dout (B, N, H, head_dim) with unit
    stride along the last two dims flattened; delta (B, H, N) fp32, contiguous."""
    bh, b, h, offs_m, mask_m, _ = _head_block(N, H, head_dim, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DH)
    mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
    cols = h * head_dim + offs_d[None, :]
    o = tl.load(out_ptr + b * stride_out_b + offs_m[:, None] * stride_out_n + cols, mask=mask, other=0.0)
    do = tl.load(dout_ptr + b * stride_dout_b + offs_m[:, None] * stride_dout_n + cols, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh * N + offs_m, delta, mask=mask_m)


# The two backward kernels are one computation in transposed orientation (dK/dV hold a key block and
# stream queries; dQ holds a query block and streams keys), so their bodies mirror each other.
@triton.jit
def attention_bwd_dkdv_kernel(
    qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    N, H, head_dim, scale, qk_scale,
    stride_qkv_b, stride_qkv_n, stride_dout_b, stride_dout_n, stride_dqkv_b, stride_dqkv_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dK and dV of one (batch, head, block of BLOCK_N keys), streaming the queries in blocks of BLOCK_M.

    qkv and dqkv (B, N, 3, H, head_dim), dout (B, N, H, head_dim), each with unit stride along its
    last dims flattened; lse (natural log) and delta (B, H, N) fp32, contiguous. scale is the
    softmax scale, qk_scale = scale·log2(e). Writes the k and v slots of dqkv."""
    bh, b, h, offs_n, mask_n, dim = _head_block(N, H, head_dim, BLOCK_N)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_d = offs_d < head_dim
    mask_nd = mask_n[:, None] & mask_d[None, :]

    q_base = qkv_ptr + b * stride_qkv_b + h * head_dim
    do_base = dout_ptr + b * stride_dout_b + h * head_dim
    kv_offs = offs_n[:, None] * stride_qkv_n + offs_d[None, :]
    k = tl.load(q_base + dim + kv_offs, mask=mask_nd, other=0.0)
    v = tl.load(q_base + 2 * dim + kv_offs, mask=mask_nd, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_DH), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DH), dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        qt = tl.load(q_base + rows[None, :] * stride_qkv_n + offs_d[:, None],
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_DH, BLOCK_M): qᵀ
        # Query rows past N get lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(lse_ptr + bh * N + rows, mask=mask_m, other=float("inf")) * _LOG2E
        st = tl.dot(k, qt, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) logits, log2 units
        pt = tl.where(mask_n[:, None], tl.math.exp2(st - lse[None, :]), 0.0)  # Pᵀ
        do = tl.load(do_base + rows[:, None] * stride_dout_n + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_ptr + bh * N + rows, mask=mask_m, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (dO vᵀ)ᵀ
        dst = pt * (dpt - delta[None, :])  # dSᵀ
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=INPUT_PRECISION)

    dk = dk * scale
    dst_base = dqkv_ptr + b * stride_dqkv_b + h * head_dim + offs_n[:, None] * stride_dqkv_n + offs_d[None, :]
    tl.store(dst_base + dim, dk.to(dqkv_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dst_base + 2 * dim, dv.to(dqkv_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def attention_bwd_dq_kernel(
    qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    N, H, head_dim, scale, qk_scale,
    stride_qkv_b, stride_qkv_n, stride_dout_b, stride_dout_n, stride_dqkv_b, stride_dqkv_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dQ of one (batch, head, block of BLOCK_M queries), streaming the keys in blocks of BLOCK_N.

    Same arguments and layouts as :func:`attention_bwd_dkdv_kernel`; writes the q slot of dqkv."""
    bh, b, h, offs_m, mask_m, dim = _head_block(N, H, head_dim, BLOCK_M)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DH)
    mask_d = offs_d < head_dim
    mask_md = mask_m[:, None] & mask_d[None, :]

    q_base = qkv_ptr + b * stride_qkv_b + h * head_dim
    q = tl.load(q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(dout_ptr + b * stride_dout_b + h * head_dim + offs_m[:, None] * stride_dout_n + offs_d[None, :],
                 mask=mask_md, other=0.0)
    lse = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_DH), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_offs = cols[None, :] * stride_qkv_n + offs_d[:, None]
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(q_base + dim + kv_offs, mask=mask_dn, other=0.0)  # (BLOCK_DH, BLOCK_N): kᵀ
        vt = tl.load(q_base + 2 * dim + kv_offs, mask=mask_dn, other=0.0)  # vᵀ
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # fp32 logits, log2 units
        p = tl.where(mask_n[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=INPUT_PRECISION)

    dq = dq * scale
    dq_ptrs = dqkv_ptr + b * stride_dqkv_b + h * head_dim + offs_m[:, None] * stride_dqkv_n + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(dqkv_ptr.dtype.element_ty), mask=mask_md)


def attention_bwd_dkdv_config(N: int, head_dim: int, dtype: torch.dtype, input_precision: str) -> LaunchConfig:
    """attention_bwd_dkdv_kernel's config: BLOCK_N keys held, queries streamed in blocks of BLOCK_M."""
    return _config("dkdv", N, head_dim, dtype, input_precision, held="BLOCK_N", streamed="BLOCK_M")


def attention_bwd_dq_config(N: int, head_dim: int, dtype: torch.dtype, input_precision: str) -> LaunchConfig:
    """attention_bwd_dq_kernel's config: BLOCK_M queries held, keys streamed in blocks of BLOCK_N."""
    return _config("dq", N, head_dim, dtype, input_precision, held="BLOCK_M", streamed="BLOCK_N")


@triton_op("fastconformer::attention_backward", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          num_heads: int, scale: float) -> torch.Tensor:
    """The gradient of :func:`attention_op`'s ``out`` with respect to ``qkv``.

    grad_out and out (B, N, heads·head_dim), qkv (B, N, 3·heads·head_dim) with unit last stride,
    lse (B, heads, N) fp32 as :func:`attention_op` returned it. Returns grad_qkv (B, N,
    3·heads·head_dim) in qkv's dtype, contiguous, in the qkv layout (dQ, dK, dV per token)."""
    B, N, H, Dh = _heads_shape(qkv, num_heads)
    grad_out = grad_out.to(qkv.dtype)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_qkv = torch.empty((B, N, 3 * H * Dh), device=qkv.device, dtype=qkv.dtype)
    if grad_qkv.numel() == 0:
        return grad_qkv
    delta = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    launch(wrap_triton(attention_bwd_preprocess_kernel), (triton.cdiv(N, _PREPROCESS_BLOCK_M) * B * H,), (
        out, grad_out, delta, N, H, Dh, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1)),
        attention_bwd_preprocess_config(Dh))
    precision = dot_precision(qkv.dtype)
    args = (qkv, grad_out, lse, delta, grad_qkv, N, H, Dh, scale, scale * LOG2E, qkv.stride(0), qkv.stride(1),
            grad_out.stride(0), grad_out.stride(1), grad_qkv.stride(0), grad_qkv.stride(1))
    dkdv = attention_bwd_dkdv_config(N, Dh, qkv.dtype, precision)
    launch(wrap_triton(attention_bwd_dkdv_kernel), (triton.cdiv(N, dkdv.constexprs["BLOCK_N"]) * B * H,), args, dkdv)
    dq = attention_bwd_dq_config(N, Dh, qkv.dtype, precision)
    launch(wrap_triton(attention_bwd_dq_kernel), (triton.cdiv(N, dq.constexprs["BLOCK_M"]) * B * H,), args, dq)
    return grad_qkv


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)  # no N×N matrix: the backward recomputes P from lse
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return attention_backward_op(grad_out, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Triton twin of :func:`fastconformer.modules.attention.attention` (same arguments and result)."""
    _, _, _, head_dim = _heads_shape(qkv, num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention's Triton kernel handles head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    tl_dtype(qkv.dtype)  # TypeError for dtypes the kernel does not take
    if qkv.stride(-1) != 1:  # the Linear's output always has it; anything else is read through one copy
        qkv = qkv.contiguous()
    out, _ = attention_op(qkv, num_heads, float(scale))
    return out

