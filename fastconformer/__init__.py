"""fastconformer: the Conformer vision model (Peng et al., ICCV 2021) for PyTorch, with Triton kernels
that fuse its hot paths behind drop-in modules, each checked against a plain-PyTorch reference.

    import fastconformer
    model = fastconformer.create_model("conformer_small_patch16", pretrained="Conformer_small_patch16.pth")
    conv_logits, trans_logits = model(images)
"""

from . import data
from .dispatch import backend
from .reference import Conformer
from .convert import convert
from .registry import VARIANTS, create_model, list_models, load_checkpoint
from .hub import save_checkpoint, save_pretrained
from .export import ExportError, export_onnx
from .malloc import keep_freed_memory
from .modules.prepack import prepack_weights
from .onednn_graph import onednn_graph

__version__ = "0.1.0"

__all__ = ["Conformer", "ExportError", "VARIANTS", "__version__", "backend", "convert", "create_model", "data",
           "export_onnx", "keep_freed_memory", "list_models", "load_checkpoint", "onednn_graph", "prepack_weights",
           "save_checkpoint", "save_pretrained"]
