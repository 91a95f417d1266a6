"""``add_layer_norm``: the residual add that every pre-norm block ends a half with, fused with the
LayerNorm that reads the sum next (Triton kernel: ``fastconformer.kernels.add_layer_norm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import fused_op

__all__ = ["add_layer_norm", "check_add_layer_norm_args"]


def check_add_layer_norm_args(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float) -> None:
    """ValueError unless x and y are broadcastable (..., D) tensors and weight, bias (D,)."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.ndim == 0 or y.ndim == 0:
        raise ValueError("add_layer_norm: x and y must be (..., D) tensors")
    D = x.shape[-1]
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} and y {tuple(y.shape)} must broadcast") from None
    if y.shape[-1] != D:
        raise ValueError(f"add_layer_norm: x and y must share the last dimension, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (D,):
            raise ValueError(f"add_layer_norm: {name} must be a ({D},) tensor, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")


@fused_op(triton_impl="add_layer_norm:add_layer_norm_triton", check=check_add_layer_norm_args)
def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (..., D) -> (x + y, LayerNorm(x + y)) with weight, bias (D,) and ``eps``; same dtype as x."""
    s = x + y
    return s, F.layer_norm(s, weight.shape, weight, bias, eps)  # weight's shape: a constant when traced
