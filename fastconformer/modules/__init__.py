"""Drop-in fused modules and the fused ops behind them (each dispatched by fastconformer.dispatch)."""

from .add_layer_norm import add_layer_norm
from .attention import FusedAttention, attention
from .base import FusedModule, NotFusableError
from .conv_block import FusedConvBlock, conv_bn, fold_conv_bn
from .conv_trans_block import FusedConvTransBlock
from .fcu_down import FusedFCUDown, fcu_down
from .fcu_up import FusedFCUUp, batch_norm_scale_shift, bn_relu_add_upsampled, fcu_up_expand
from .transformer import FusedBlock

__all__ = ["FusedAttention", "FusedBlock", "FusedConvBlock", "FusedConvTransBlock", "FusedFCUDown", "FusedFCUUp",
           "FusedModule", "NotFusableError", "add_layer_norm", "attention", "batch_norm_scale_shift",
           "bn_relu_add_upsampled", "conv_bn", "fcu_down", "fcu_up_expand", "fold_conv_bn"]
