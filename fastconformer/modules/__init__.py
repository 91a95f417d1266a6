"""Drop-in fused modules and the fused ops behind them (each dispatched by fastconformer.dispatch)."""

from .attention import FusedAttention, attention
from .conv_block import FusedConvBlock
from .transformer import FusedBlock, add_layer_norm

__all__ = ["FusedAttention", "FusedBlock", "FusedConvBlock", "add_layer_norm", "attention"]
