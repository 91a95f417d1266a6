"""Drop-in fused modules and the fused ops behind them (each dispatched by fastconformer.dispatch)."""

from .transformer import add_layer_norm

__all__ = ["add_layer_norm"]
