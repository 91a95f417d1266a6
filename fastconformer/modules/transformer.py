"""The fused transformer Block (the residual add after attention fused with norm2:
:func:`fastconformer.modules.add_layer_norm.add_layer_norm`).

``onednn_linear``: CPU inference only; a linear layer with its exact GELU or its residual add in
one oneDNN primitive (what it buys: the ``fast (no oneDNN)`` rows of ``benchmarks/bench_model.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..dispatch import use_onednn
from .add_layer_norm import add_layer_norm
from ..reference import Block
from .attention import FusedAttention, attention, check_tokens
from .base import FusedModule

__all__ = ["FusedBlock", "onednn_linear"]


def onednn_linear(x: torch.Tensor, linear: nn.Linear, *, gelu: bool = False,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)``, then exact GELU (``gelu``) or ``+ residual``, as one oneDNN inner product.

    x (..., in_features) float32 on the CPU -> (..., out_features); ``residual`` has the output's
    shape. No autograd: call it only where :func:`fastconformer.dispatch.use_onednn` allows."""
    pointwise = torch.ops.mkldnn._linear_pointwise
    if residual is not None:
        return pointwise.binary(x, residual, linear.weight, linear.bias, "add")
    return pointwise(x, linear.weight, linear.bias, "gelu" if gelu else "none", [], "none" if gelu else "")


class FusedBlock(FusedModule):
    """Drop-in for the reference transformer ``Block`` (same constructor arguments and submodules,
    so the same state_dict; built as every fused module is: :class:`~fastconformer.modules.base.FusedModule`).

    ``forward(x)``: x (B, N, dim) -> (B, N, dim). The residual add after attention is fused with
    norm2 (:func:`add_layer_norm`). (In a ConvTransBlock the sum before norm1, x_st + x_t, comes
    straight out of the fused squeeze.) CPU inference in eval mode instead fuses each linear layer
    with what follows it (:func:`onednn_linear`): qkv; proj + residual; fc1 + GELU; fc2 + residual;
    only where no autograd graph can pass through (the input and every parameter are checked, so
    fine-tuning some parameters of a model in eval mode keeps their gradients).
    """

    reference = Block

    def _adopt(self, block: nn.Module) -> None:
        self._require(block, ("norm1", "attn", "drop_path", "norm2", "mlp"))
        self.norm1 = block.norm1
        self.attn = FusedAttention.from_reference(block.attn)
        self.drop_path, self.norm2, self.mlp = block.drop_path, block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and use_onednn(x, *self.parameters()):
            return self._forward_onednn(x)
        attn = self.drop_path(self.attn(self.norm1(x)))
        x, h = add_layer_norm(x, attn, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return x + self.drop_path(self.mlp(h))

    def _forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode (dropout and drop-path are identities) through :func:`onednn_linear`."""
        attn, mlp = self.attn, self.mlp
        check_tokens(x, attn.qkv.in_features, "FusedBlock")
        qkv = onednn_linear(self.norm1(x), attn.qkv)
        x = onednn_linear(attention(qkv, attn.num_heads, attn.scale), attn.proj, residual=x)
        h = self.norm2(x)
        if type(mlp.act) is nn.GELU and mlp.act.approximate == "none":
            h = onednn_linear(h, mlp.fc1, gelu=True)
        else:
            h = mlp.act(onednn_linear(h, mlp.fc1))
        return onednn_linear(h, mlp.fc2, residual=x)
