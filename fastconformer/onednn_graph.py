"""CPU inference through oneDNN Graph: the model traced once per input signature
(``torch.jit.trace`` + ``torch.jit.freeze``) and run by TorchScript with oneDNN Graph fusion
(``torch.jit.enable_onednn_fusion``), which compiles the graph into oneDNN partitions: each
convolution with its bias, ReLU or residual add + ReLU; linear layers; LayerNorms; attention's
matmuls. The traced graph is the plain-op algebra the fast model exports
(:func:`fastconformer.dispatch.exporting`: pool-first squeeze, expand at token resolution,
BatchNorm folded), never Triton or ``mkldnn::`` ops. TorchScript, the only home of this fuser,
is deprecated (torch 2.13 warns on ``torch.jit.trace`` and ``torch.jit.freeze``); the wrapper
silences those warnings for its own calls.

:func:`onednn_graph` wraps a model in :class:`OneDNNGraph`. Its ``forward(x)`` serves from a graph
only where one computes what the model would (the gate is :meth:`OneDNNGraph.serves`): CPU
float32 images (B, C, H, W), the model and all its submodules in eval mode, no autograd graph
possible (grad mode off, or neither the input nor any parameter or buffer requires grad), oneDNN
allowed (:func:`fastconformer.dispatch.onednn`), no tracing or compiling around the call, and CPU
autocast either off or to bfloat16 on a CPU where oneDNN has native bfloat16. Every other call
runs the model itself, eagerly: training, fine-tuning, CUDA, other dtypes and autocast modes.

Under CPU autocast to bfloat16 the graph is a bfloat16 copy of the model (weights rounded once)
on the images rounded to bfloat16: activations in bfloat16 throughout, oneDNN accumulating in
float32 inside each partition (what OpenVINO's bf16 inference hint does), where eager autocast
keeps the residual stream, LayerNorms and softmax in float32; outputs in bfloat16, as autocast's.

Each input signature (shape, channels_last or not, float32 or bfloat16) gets its own graph on
first use (a trace, a freeze and four forward passes), verified before it serves: its second run
(the first fused one) must match the eager model on the same input, float32 within
:data:`GRAPH_TOL` relative error, bfloat16 within twice the eager autocast model's own error from
the eager float32 output (+1e-6); otherwise a warning says so and that signature stays eager. At
most ``max_graphs`` signatures are kept (least recently used dropped). The graphs hold the
parameters and buffers as constants: any change to them (optimizer steps, ``load_state_dict``,
``.to()``, in-place updates under ``no_grad``: a version counter or storage moved) drops every
graph, and the next call traces again. In-place writes that bypass version counters
(``param.data.mul_()``, NumPy views) are not seen: call :meth:`OneDNNGraph.clear` after those.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import threading
import warnings
from typing import Iterator

import torch
import torch.nn as nn

from .dispatch import exporting, no_autograd, onednn, onednn_available, onednn_bf16_available, use_triton
from .dispatch import _onednn_enabled
from .modules.derived import stamp, stamp_matches
from .reference import Conformer
from .testing import rel_error

__all__ = ["GRAPH_TOL", "OneDNNGraph", "onednn_graph", "onednn_graph_available"]

# The most relative error a float32 graph may show against the eager model on the same input
# (the whole model's equality bound).
GRAPH_TOL = 1e-4


def onednn_graph_available() -> bool:
    """Whether this torch has TorchScript's oneDNN Graph fuser and oneDNN's fused primitives work here."""
    return (hasattr(torch.jit, "enable_onednn_fusion") and hasattr(torch._C, "_jit_llga_enabled")
            and onednn_available())


@contextlib.contextmanager
def _fusing() -> Iterator[None]:
    """oneDNN Graph fusion on for this call only (a process-wide TorchScript switch: restored after)."""
    before = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(before)


class _Traceable(nn.Module):
    """The model on x rounded to ``dtype`` first, its list of outputs as a tuple (what
    ``torch.jit.trace`` records)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.training = False  # the model's modes stay as they are (all eval: the gate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x.to(self.dtype)))


class OneDNNGraph(nn.Module):
    """``model`` for CPU inference through oneDNN Graph (see the module docstring); any call the
    graphs cannot serve runs ``model`` itself. ``forward(x)``: images (B, C, H, W) -> the model's
    list of outputs (for a Conformer ``[conv_logits, trans_logits]``, for ``ConformerFeatures``
    its maps). ``state_dict`` and ``train()`` reach the wrapped model (keys under ``model.``)."""

    def __init__(self, model: nn.Module, max_graphs: int = 8):
        super().__init__()
        self.model = model
        self.max_graphs = max_graphs
        self._graphs: collections.OrderedDict = collections.OrderedDict()  # signature -> graph, or None: eager
        self._stamp = None  # of the parameters and buffers the graphs hold
        self._lock = threading.Lock()

    def _state(self) -> tuple[bool, tuple[torch.Tensor, ...]]:
        """(whether any module of the model is in train mode, its parameters and buffers), in one walk."""
        training, sources = False, []
        for module in self.model.modules():
            training = training or module.training
            sources += [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        return training, tuple(sources)

    def serves(self, x: torch.Tensor) -> bool:
        """Whether a graph may compute ``model(x)`` (the gate of the module docstring)."""
        return self._serves(x, *self._state())

    def _serves(self, x: torch.Tensor, training: bool, sources: tuple[torch.Tensor, ...]) -> bool:
        if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4):
            return False
        if torch.is_autocast_enabled("cpu") and not (torch.get_autocast_dtype("cpu") == torch.bfloat16
                                                     and onednn_bf16_available()):
            return False
        if training or exporting() or torch.compiler.is_compiling():
            return False
        return (_onednn_enabled() and no_autograd(x, *sources) and not any(t.is_inference() for t in sources)
                and not use_triton(x) and onednn_graph_available())

    def clear(self) -> None:
        """Drop every graph (the next call traces again)."""
        with self._lock:
            self._graphs.clear()
            self._stamp = None

    def graphs(self) -> int:
        """How many input signatures hold a verified graph now."""
        return sum(g is not None for g in self._graphs.values())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        training, sources = self._state()
        if not self._serves(x, training, sources):
            return self.model(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if not channels_last:
            x = x.contiguous()
        bf16 = torch.is_autocast_enabled("cpu")
        graph = self._graph((tuple(x.shape), channels_last, bf16), x, bf16, sources)
        if graph is None:
            return self.model(x)
        with _fusing(), torch.autocast("cpu", enabled=False):  # a bfloat16 graph rounds x itself
            return list(graph(x))

    def _graph(self, signature: tuple, x: torch.Tensor, bf16: bool, sources: tuple[torch.Tensor, ...]):
        with self._lock:
            if not stamp_matches(self._stamp, sources):
                self._graphs.clear()
                self._stamp = stamp(sources)
            if signature in self._graphs:
                self._graphs.move_to_end(signature)
                return self._graphs[signature]
            graph = self._trace(x, bf16)
            self._graphs[signature] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            return graph

    def _trace(self, x: torch.Tensor, bf16: bool):
        """A frozen traced graph of the model for x's signature, verified against the eager model;
        None (with a warning) when it does not match."""
        with torch.no_grad(), onednn(False), warnings.catch_warnings():
            # the input checks read sizes as Python values (hence one graph per input signature)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "`torch.jit.(trace|trace_method|freeze)` is deprecated",
                                    DeprecationWarning)
            try:  # autocast off throughout: TorchScript's own autocast pass would insert casts
                with torch.autocast("cpu", enabled=False):
                    # bfloat16: a bfloat16 copy of the model (its weights rounded once), traced on x rounded
                    model = copy.deepcopy(self.model).to(torch.bfloat16) if bf16 else self.model
                    traced = torch.jit.trace(_Traceable(model, torch.bfloat16 if bf16 else x.dtype), (x,),
                                             check_trace=False)
                    del model
                    graph = torch.jit.freeze(traced)
                    with _fusing():
                        for _ in range(2):  # the profiling run, then the fused one
                            out = graph(x)
            except RuntimeError as error:
                return self._eager_from_now(x, bf16, f"tracing or running its graph failed ({error})")
            with torch.autocast("cpu", enabled=False):
                expected = self.model(x)
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    eager = self.model(x)
        errors = [rel_error(o, e) for o, e in zip(out, expected)]
        limits = ([2 * rel_error(b, e) + 1e-6 for b, e in zip(eager, expected)] if bf16
                  else [GRAPH_TOL] * len(errors))
        if len(out) != len(expected) or not all(err <= lim for err, lim in zip(errors, limits)):
            return self._eager_from_now(x, bf16, f"its graph does not match the eager model (relative errors "
                                                 f"{errors}, limits {limits})")
        return graph

    @staticmethod
    def _eager_from_now(x: torch.Tensor, bf16: bool, why: str) -> None:
        warnings.warn(f"onednn_graph: input {tuple(x.shape)}{' under bfloat16 autocast' if bf16 else ''}: {why}; "
                      "this input signature runs the eager model", RuntimeWarning, stacklevel=5)

    def __getstate__(self):
        state = self.__dict__.copy()  # graphs and the lock do not copy: a copy traces again
        state["_graphs"], state["_stamp"], state["_lock"] = collections.OrderedDict(), None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def onednn_graph(model: nn.Module, *, max_graphs: int = 8) -> OneDNNGraph:
    """``model`` (a Conformer, reference or fast; the fast one's algebra is the faster graph)
    wrapped for CPU inference through oneDNN Graph: :class:`OneDNNGraph`. TypeError for anything
    but a Conformer, ValueError for ``max_graphs`` < 1."""
    if not isinstance(model, Conformer):
        raise TypeError(f"onednn_graph takes a Conformer (create_model(...), reference or fast), got "
                        f"{type(model).__name__}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"onednn_graph: max_graphs must be a positive int, got {max_graphs!r}")
    return OneDNNGraph(model, max_graphs)
