"""Fused pieces of the transformer branch: the residual-add + LayerNorm op and the fused Block.

``add_layer_norm``: the residual add that every pre-norm block ends a half with, fused with the
LayerNorm that reads the sum next (Triton kernel: ``fastconformer.kernels.add_layer_norm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dispatch import fused_op

__all__ = ["add_layer_norm", "FusedBlock"]


@fused_op(triton_impl="add_layer_norm:add_layer_norm_triton")
def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (..., D) -> (x + y, LayerNorm(x + y)) with weight, bias (D,) and ``eps``; same dtype as x."""
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


class FusedBlock(nn.Module):
    """Drop-in for the reference transformer ``Block`` (same submodules, so the same state_dict).

    ``forward(x)``: x (B, N, dim) -> (B, N, dim). The residual add after attention is fused with
    norm2 (:func:`add_layer_norm`). (In a ConvTransBlock the sum before norm1, x_st + x_t, comes
    straight out of the fused squeeze.)
    """

    def __init__(self, reference: nn.Module):
        super().__init__()
        for name in ("norm1", "attn", "drop_path", "norm2", "mlp"):
            setattr(self, name, getattr(reference, name))

    @classmethod
    def from_reference(cls, block: nn.Module) -> "FusedBlock":
        """Wrap a reference (ours or the official repository's) Block, sharing its submodules."""
        missing = [n for n in ("norm1", "attn", "drop_path", "norm2", "mlp") if not hasattr(block, n)]
        if missing:
            raise TypeError(f"block must be a pre-norm transformer Block; {type(block).__name__} lacks {missing}")
        return cls(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.drop_path(self.attn(self.norm1(x)))
        x, h = add_layer_norm(x, attn, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return x + self.drop_path(self.mlp(h))
