"""The fused transformer Block (the residual add after attention fused with norm2:
:func:`fastconformer.modules.add_layer_norm.add_layer_norm`).

CPU inference runs each linear layer with what follows it as one oneDNN primitive
(:func:`fastconformer.modules.onednn.onednn_linear`; what it buys: the ``fast (no oneDNN)`` rows of
``benchmarks/bench_model.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..dispatch import onednn_autocast_bf16, use_onednn
from ..reference import Block
from .add_layer_norm import add_layer_norm
from .attention import FusedAttention, attention, check_tokens
from .base import FusedModule
from .onednn import onednn_linear

__all__ = ["FusedBlock"]


class FusedBlock(FusedModule):
    """Drop-in for the reference transformer ``Block`` (same constructor arguments and submodules,
    so the same state_dict; built as every fused module is: :class:`~fastconformer.modules.base.FusedModule`).

    ``forward(x)``: x (B, N, dim) -> (B, N, dim). The residual add after attention is fused with
    norm2 (:func:`add_layer_norm`). (In a ConvTransBlock the sum before norm1, x_st + x_t, comes
    straight out of the fused squeeze.) CPU inference in eval mode instead fuses each linear layer
    with what follows it (:func:`onednn_linear`): qkv; proj + residual; fc1 + GELU; fc2 + residual;
    only where no autograd graph can pass through (the input and every parameter are checked, so
    fine-tuning some parameters of a model in eval mode keeps their gradients). Under CPU autocast
    to bfloat16 the same inference runs each linear layer as a bfloat16 oneDNN inner product (fc1
    with its GELU; the residual adds stay in the dtype autocast gives them).
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
        if not self.training and onednn_autocast_bf16(x, *self.parameters()):
            return self._forward_onednn_bf16(x)
        attn = self.drop_path(self.attn(self.norm1(x)))
        x, h = add_layer_norm(x, attn, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return x + self.drop_path(self.mlp(h))

    def _forward_onednn_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode under CPU autocast to bfloat16: each linear layer a bfloat16 oneDNN inner
        product as autocast would run it, fc1 with its GELU; the residual adds and LayerNorms as in
        :meth:`forward`, in the dtypes autocast gives them."""
        attn, mlp, bf16 = self.attn, self.mlp, torch.bfloat16
        check_tokens(x, attn.qkv.in_features, "FusedBlock")
        qkv = onednn_linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias, dtype=bf16)
        a = onednn_linear(attention(qkv, attn.num_heads, attn.scale), attn.proj.weight, attn.proj.bias, dtype=bf16)
        x, h = add_layer_norm(x, a, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return x + onednn_linear(self._onednn_fc1(h, bf16), mlp.fc2.weight, mlp.fc2.bias, dtype=bf16)

    def _forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode (dropout and drop-path are identities) through :func:`onednn_linear`."""
        attn, mlp = self.attn, self.mlp
        check_tokens(x, attn.qkv.in_features, "FusedBlock")
        qkv = onednn_linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias)
        x = onednn_linear(attention(qkv, attn.num_heads, attn.scale), attn.proj.weight, attn.proj.bias, residual=x)
        h = self._onednn_fc1(self.norm2(x), torch.float32)
        return onednn_linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x)

    def _onednn_fc1(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """act(fc1(h)) through :func:`onednn_linear` in ``dtype``, the exact GELU fused into it."""
        fc1, act = self.mlp.fc1, self.mlp.act
        if type(act) is nn.GELU and act.approximate == "none":
            return onednn_linear(h, fc1.weight, fc1.bias, activation="gelu", dtype=dtype)
        return act(onednn_linear(h, fc1.weight, fc1.bias, dtype=dtype))
