"""Fused multi-head self-attention for the transformer branch.

The reference :class:`fastconformer.reference.Attention` splits the qkv projection into separate
q, k, v tensors (a permute), materialises the (B, heads, N, N) score matrix, applies softmax and
multiplies by v. :func:`attention` computes ``softmax(q kᵀ · scale) v`` straight from the qkv
projection's output and writes the (B, N, heads·head_dim) layout ``proj`` reads, without the N×N
matrix (Triton kernel: ``fastconformer.kernels.attention``, a flash-style online softmax).
:class:`FusedAttention` is the drop-in module around it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import fused_op
from ..reference import Attention

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


@fused_op(triton_impl="attention:attention_triton", check=check_qkv)
def attention(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Multi-head self-attention ``softmax(q kᵀ · scale) v`` read from the qkv projection.

    qkv: (B, N, 3·heads·head_dim), the qkv Linear's output, whose last dimension is laid out as
    (3, heads, head_dim) (q, k, v); fp32, fp16 or bf16. Returns (B, N, heads·head_dim) in qkv's
    dtype, heads concatenated along the last dimension (the layout ``proj`` reads).

    This PyTorch implementation hands strided views of q, k and v (no copies) to
    ``F.scaled_dot_product_attention`` with the given scale.
    """
    B, N, _ = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) views
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, N, -1)


class FusedAttention(Attention):
    """Drop-in for :class:`fastconformer.reference.Attention` on x (B, N, dim), fp32/fp16/bf16.

    A subclass of the reference Attention: same constructor arguments, parameters (``qkv.*``,
    ``proj.*``), submodules (``attn_drop``, ``proj_drop``) and attributes (``num_heads``,
    ``scale``; a falsy ``qk_scale`` means head_dim ** -0.5), so state_dicts are interchangeable.
    ``qkv(x)`` → :func:`attention` → ``proj`` → ``proj_drop``.

    Attention dropout: the fused kernel has none, so in training mode with ``attn_drop.p > 0`` the
    forward falls back to the reference math (explicit (B, heads, N, N) scores, softmax,
    ``attn_drop``, @ v), which draws the same dropout mask as the reference for the same RNG state.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        if dim % num_heads:
            raise ValueError(f"FusedAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                         proj_drop=proj_drop)

    @classmethod
    def from_reference(cls, module: nn.Module) -> "FusedAttention":
        """A FusedAttention sharing ``module``'s parameters and dropout submodules (no copies).

        ``module`` is any attention with the reference's attributes (ours or the official
        repository's): ``qkv`` and ``proj`` nn.Linear, ``attn_drop``/``proj_drop`` Dropout,
        ``num_heads``, ``scale``."""
        missing = [a for a in ("qkv", "proj", "attn_drop", "proj_drop", "num_heads", "scale")
                   if not hasattr(module, a)]
        if missing:
            raise TypeError(f"FusedAttention.from_reference: {type(module).__name__} lacks {missing}; expected the "
                            "reference Attention's attributes")
        qkv, proj = module.qkv, module.proj
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            raise TypeError("FusedAttention.from_reference: module.qkv and module.proj must be nn.Linear")
        dim = qkv.in_features
        if qkv.out_features != 3 * dim or (proj.in_features, proj.out_features) != (dim, dim):
            raise ValueError(f"FusedAttention.from_reference: expected qkv {dim}->{3 * dim} and proj {dim}->{dim}, got "
                             f"qkv {qkv.in_features}->{qkv.out_features}, proj {proj.in_features}->{proj.out_features}")
        with torch.device("meta"):  # no weight draw: the submodules are replaced by the module's own
            fused = cls(dim, module.num_heads, qkv_bias=qkv.bias is not None, qk_scale=module.scale)
        fused.qkv, fused.proj = qkv, proj
        fused.attn_drop, fused.proj_drop = module.attn_drop, module.proj_drop
        fused.scale = module.scale
        return fused.train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim), same dtype."""
        check_tokens(x, self.qkv.in_features, "FusedAttention")
        if self.training and self.attn_drop.p > 0:
            return super().forward(x)  # the reference math, the reference's dropout draws
        x = attention(self.qkv(x), self.num_heads, self.scale)
        return self.proj_drop(self.proj(x))
