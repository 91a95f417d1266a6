"""Fused pieces of the transformer branch.

``add_layer_norm``: the residual add that every pre-norm block ends a half with, fused with the
LayerNorm that reads the sum next (Triton kernel: ``fastconformer.kernels.add_layer_norm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import fused_op

__all__ = ["add_layer_norm"]


@fused_op(triton_impl="add_layer_norm:add_layer_norm_triton")
def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (..., D) -> (x + y, LayerNorm(x + y)) with weight, bias (D,) and ``eps``; same dtype as x."""
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
