"""Fused multi-head self-attention for the transformer branch.

The reference :class:`fastconformer.reference.Attention` splits the qkv projection into separate
q, k, v tensors (a permute), materialises the (B, heads, N, N) score matrix, applies softmax and
multiplies by v. :func:`attention` computes ``softmax(q kᵀ · scale) v`` straight from the qkv
projection's output and writes the (B, N, heads·head_dim) layout ``proj`` reads, without the N×N
matrix (Triton kernel: ``fastconformer.kernels.attention``, a flash-style online softmax).
:class:`FusedAttention` is the drop-in module around it.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import exporting, fused_op, onednn_bf16, use_onednn
from ..reference import Attention
from ..tolerance import MODULE_TOL, rel_error
from .base import FusedModule, NotFusableError
from .onednn_fusion import fusing, onednn_graph_available, trace_quietly, warm_up

__all__ = ["FusedAttention", "attention", "check_qkv", "check_tokens"]


def check_qkv(qkv: torch.Tensor, num_heads: int, scale: float = 1.0) -> None:
    """TypeError or ValueError naming what is wrong unless ``qkv`` is a qkv projection output
    (B, N, 3·heads·head_dim) for ``num_heads`` heads."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"attention: qkv must be a tensor, got {type(qkv).__name__}")
    if qkv.ndim != 3:
        raise ValueError(f"attention: qkv must be 3-D (B, N, 3*heads*head_dim), got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"attention: num_heads must be a positive int, got {num_heads!r}")
    B, N, C3 = qkv.shape
    if C3 == 0 or C3 % (3 * num_heads):
        raise ValueError(f"attention: qkv's last dimension must be a positive multiple of 3*num_heads = "
                         f"{3 * num_heads}, got {C3}")


def check_tokens(x: torch.Tensor, dim: int, who: str) -> None:
    """ValueError naming ``who`` unless x is a (B, N, dim) tensor of tokens."""
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{who}: x must be (B, N, {dim}), got shape {tuple(x.shape)}")


# The most (B, heads, N, N) score elements the explicit bfloat16 path holds (64 MiB), e.g. batch 64
# at 224x224 for Conformer-S; beyond, the flash kernel's tiles keep the memory small.
EXPLICIT_SCORES_MAX = 2 ** 25


def _explicit_bf16_scores(qkv: torch.Tensor, num_heads: int) -> bool:
    """bfloat16 on the CPU where :func:`~fastconformer.dispatch.onednn_bf16` allows (no autograd
    graph through ``qkv``, native bfloat16, the oneDNN switch on) and the scores fit in
    :data:`EXPLICIT_SCORES_MAX`: there explicit (B, heads, N, N) scores (oneDNN's bfloat16 batched
    matmuls) beat the CPU flash kernel."""
    B, N, _ = qkv.shape
    return qkv.dtype == torch.bfloat16 and B * num_heads * N * N <= EXPLICIT_SCORES_MAX and onednn_bf16(qkv)


# float32 CPU inference: attention's core as one oneDNN Graph partition per (qkv shape, heads, scale),
# for the first ATTENTION_GRAPHS_MAX signatures a process meets (each trace keeps ~2 MB that
# TorchScript and oneDNN never free, so graphs are not evicted and traced again: later signatures
# run SDPA); None: that signature runs SDPA. Up to GRAPH_TOKENS_MAX tokens (measured on a 2-core
# AVX-512 CPU: 1.55-1.85x SDPA's speed up to 1025 tokens, 0.86-0.94x at 2049) and scores within
# EXPLICIT_SCORES_MAX elements.
ATTENTION_GRAPHS_MAX = 16
GRAPH_TOKENS_MAX = 1025
_GRAPHS: dict[tuple, object] = {}
_GRAPHS_LOCK = threading.Lock()


def _graph_serves(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether :func:`attention` may run ``qkv`` through a oneDNN Graph partition: float32 CPU
    inference as :func:`~fastconformer.dispatch.use_onednn` allows (no autograd graph, no tracing
    or compiling, the oneDNN switch on), a contiguous non-empty qkv of at most
    :data:`GRAPH_TOKENS_MAX` tokens and :data:`EXPLICIT_SCORES_MAX` score elements, and
    TorchScript's fuser here."""
    B, N, _ = qkv.shape
    return (B > 0 and 0 < N <= GRAPH_TOKENS_MAX and B * num_heads * N * N <= EXPLICIT_SCORES_MAX
            and qkv.is_contiguous() and use_onednn(qkv) and onednn_graph_available())


def _attention_graph(shape: tuple[int, ...], num_heads: int, scale: float):
    """The verified graph for this signature (traced on first use, outside the lock: other
    signatures keep running meanwhile), or None."""
    key = (shape, num_heads, scale)
    with _GRAPHS_LOCK:
        if key in _GRAPHS or len(_GRAPHS) >= ATTENTION_GRAPHS_MAX:
            return _GRAPHS.get(key)
    graph = _trace_attention(shape, num_heads, scale)
    with _GRAPHS_LOCK:
        if len(_GRAPHS) >= ATTENTION_GRAPHS_MAX and key not in _GRAPHS:
            return graph  # two threads traced past the cap at once: use it this time, keep none
        return _GRAPHS.setdefault(key, graph)


def _trace_attention(shape: tuple[int, ...], num_heads: int, scale: float):
    """:func:`attention`'s explicit algebra (the form its PyTorch implementation takes while
    tracing; its input check, which reads sizes, stays outside the trace) traced for float32 qkv of
    ``shape`` and optimized with oneDNN Graph fusion; None, with a warning, unless it fused and
    matches the float64 result on a random probe within :data:`~fastconformer.tolerance.MODULE_TOL`."""
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = attention(probe.double(), num_heads, scale)
    try:  # traced, the implementation takes its explicit form (exporting() is true), never this cache
        graph = trace_quietly(lambda qkv: attention.torch_impl(qkv, num_heads, scale), (probe,), check_trace=False)
        out, partitions = warm_up(graph, probe)
    except (RuntimeError, TypeError) as error:
        why = f"tracing or running it failed ({error})"
    else:
        error = rel_error(out, expected)
        if partitions and error <= MODULE_TOL:
            return graph
        why = f"{partitions} partitions, relative error {error:.3g} (limit {MODULE_TOL:g})"
    warnings.warn(f"attention: oneDNN Graph for qkv {shape}: {why}; this shape runs "
                  "F.scaled_dot_product_attention", RuntimeWarning)
    return None


@fused_op(triton_impl="attention:attention_triton", check=check_qkv)
def attention(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Multi-head self-attention ``softmax(q kᵀ · scale) v`` read from the qkv projection.

    qkv: (B, N, 3·heads·head_dim), the qkv Linear's output, whose last dimension is laid out as
    (3, heads, head_dim) (q, k, v); fp32, fp16 or bf16. Returns (B, N, heads·head_dim) in qkv's
    dtype, heads concatenated along the last dimension (the layout ``proj`` reads).

    This PyTorch implementation hands strided views of q, k and v (no copies) to
    ``F.scaled_dot_product_attention`` with the given scale. While exporting (ONNX) it spells out
    the reference's ops instead, ``softmax((q @ kᵀ) · scale) @ v`` on q, k, v taken from one
    (3, B, heads, N, head_dim) permute: the pattern inference engines fuse (OpenVINO reads the
    three slices in place), where SDPA exports as a scaled q, a scaled k and more transposes.
    float32 CPU inference (no autograd, oneDNN allowed, contiguous qkv, up to
    :data:`GRAPH_TOKENS_MAX` tokens) runs that explicit form as one oneDNN Graph partition
    (TorchScript's fuser: :mod:`~fastconformer.modules.onednn_fusion`), traced once per (shape,
    heads, scale) for the first :data:`ATTENTION_GRAPHS_MAX` of them and verified on a random probe
    before it serves (else a warning and SDPA for that shape); NaN and Inf come out where SDPA's do.
    bfloat16 CPU inference (no autograd, oneDNN with native bfloat16, scores up to
    :data:`EXPLICIT_SCORES_MAX` elements) also computes the explicit scores, in bfloat16 (the
    softmax computing in float32 and rounding once), which oneDNN's bfloat16 matmuls make faster
    there than the CPU flash kernel.
    """
    B, N, _ = qkv.shape
    if exporting():
        qkv = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, Dh) each
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, N, N)
        return (attn @ v).transpose(1, 2).reshape(B, N, -1)
    if _graph_serves(qkv, num_heads):
        graph = _attention_graph(tuple(qkv.shape), num_heads, float(scale))
        if graph is not None:
            with fusing():
                return graph(qkv)
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) views
    if _explicit_bf16_scores(qkv, num_heads):
        # bf16 throughout; the softmax computes in fp32 and rounds once (autocast would return it in fp32)
        with torch.autocast("cpu", enabled=False):
            out = (q @ k.transpose(-2, -1)).mul_(scale).softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, N, q.shape[1] * q.shape[3])  # not -1: a batch of 0 has no size to infer


class FusedAttention(FusedModule):
    """Drop-in for :class:`fastconformer.reference.Attention` on x (B, N, dim), fp32/fp16/bf16
    (built as every fused module is: :class:`~fastconformer.modules.base.FusedModule`).

    Same constructor arguments, parameters (``qkv.*``, ``proj.*``), submodules (``attn_drop``,
    ``proj_drop``) and attributes (``num_heads``, ``scale``; a falsy ``qk_scale`` means
    head_dim ** -0.5), so state_dicts are interchangeable.
    ``qkv(x)`` → :func:`attention` → ``proj`` → ``proj_drop``.

    Attention dropout: the fused kernel has none, so in training mode with ``attn_drop.p > 0`` the
    forward falls back to the reference math (explicit (B, heads, N, N) scores, softmax,
    ``attn_drop``, @ v), which draws the same dropout mask as the reference for the same RNG state.
    """

    reference = Attention

    def _adopt(self, module: nn.Module) -> None:
        self._require(module, ("qkv", "proj", "attn_drop", "proj_drop", "num_heads", "scale"))
        qkv, proj, heads = module.qkv, module.proj, module.num_heads
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            raise NotFusableError("FusedAttention: qkv and proj must be nn.Linear")
        dim = qkv.in_features
        if qkv.out_features != 3 * dim or (proj.in_features, proj.out_features) != (dim, dim):
            raise NotFusableError(f"FusedAttention: expected qkv {dim}->{3 * dim} and proj {dim}->{dim}, got qkv "
                                  f"{qkv.in_features}->{qkv.out_features}, "
                                  f"proj {proj.in_features}->{proj.out_features}")
        if dim % heads:
            raise NotFusableError(f"FusedAttention: dim ({dim}) must be divisible by num_heads ({heads})")
        self.num_heads, self.scale = heads, module.scale
        self.qkv, self.attn_drop, self.proj, self.proj_drop = qkv, module.attn_drop, proj, module.proj_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim), same dtype."""
        check_tokens(x, self.qkv.in_features, "FusedAttention")
        if self.training and self.attn_drop.p > 0:
            return Attention.forward(self, x)  # the reference math, the reference's dropout draws
        x = attention(self.qkv(x), self.num_heads, self.scale)
        return self.proj_drop(self.proj(x))
