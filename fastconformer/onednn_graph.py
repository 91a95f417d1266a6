"""CPU inference through oneDNN Graph: the model traced once per input signature
(``torch.jit.trace`` + ``torch.jit.freeze``) and run by TorchScript with oneDNN Graph fusion
(``torch.jit.enable_onednn_fusion``), which compiles the graph into oneDNN partitions: each
convolution with its bias, ReLU or residual add + ReLU; linear layers; LayerNorms; attention's
matmuls. The traced graph is the plain-op algebra the fast model exports
(:func:`fastconformer.dispatch.exporting`: pool-first squeeze, expand at token resolution,
BatchNorm folded), never Triton or ``mkldnn::`` ops. TorchScript, the only home of this fuser,
is deprecated (torch 2.13 warns on ``torch.jit.trace`` and ``torch.jit.freeze``); the wrapper
silences those warnings for its own calls (:mod:`fastconformer.modules.onednn_fusion`).

:func:`onednn_graph` wraps a model in :class:`OneDNNGraph`. Its ``forward(x)`` serves from a graph
only where one computes what the model would (the gate is :meth:`OneDNNGraph.serves`): CPU float32
images (B, C, H, W), none empty, NaN, Inf or beyond :data:`INPUT_LIMIT` (1e6) in magnitude; a model
of finite CPU float32 parameters and buffers with every module in eval mode and no forward hooks
(module or global); no autograd graph possible (grad mode off, or neither the input nor any
parameter or buffer requires grad); oneDNN allowed (:func:`fastconformer.dispatch.onednn`); no
tracing or compiling around the call; CPU autocast either off or to bfloat16 on a CPU where oneDNN
has native bfloat16. Every other call runs the model itself, eagerly: training, fine-tuning, CUDA,
other dtypes and autocast modes, and the images whose logits may come out NaN, as the model
computes them (oneDNN's ReLU maps NaN to 0, torch's keeps it).

Under CPU autocast to bfloat16 the graph is a bfloat16 copy of the model (weights rounded once;
LayerNorms' scales and shifts stay float32) on the images rounded to bfloat16: activations in
bfloat16 throughout, oneDNN accumulating in float32 inside each partition (what OpenVINO's bf16
inference hint does), where eager autocast keeps the residual stream, LayerNorms and softmax in
float32; outputs in bfloat16, as autocast's.

Each input signature (shape, channels_last or not, float32 or bfloat16) gets its own graph on
first use: traced, frozen, run until TorchScript has optimized it, and verified on a random probe
of that shape and layout before it serves: oneDNN Graph must have fused partitions, the outputs'
dtypes and shapes must be the eager model's, and their values within
:data:`~fastconformer.testing.MODEL_TOL` relative error of the eager float32 model (bfloat16:
within twice the eager autocast model's own error from it, +1e-6); otherwise a warning says why
and that signature stays eager. At most ``max_graphs`` signatures are traced per state of the
weights; other signatures run the eager model (a warning says so, once), since no trace's memory
comes back. The graphs hold the parameters and buffers as constants: any change that PyTorch
tracks (optimizer steps, fused ones included: :mod:`~fastconformer.modules.derived`;
``load_state_dict``, ``.to()``, in-place updates under ``no_grad``: a version counter or storage
moved) or a module added, removed or replaced drops every graph, and
the next call traces again (with a warning: every trace keeps about a copy of the weights that
TorchScript and oneDNN never free, measured ~95 MB more per retrace of Conformer-Ti, so wrap a
model whose weights stay fixed, and keep the signatures few). Not seen: in-place writes that
bypass version counters (``param.data.mul_()``, NumPy views) and changed plain attributes
(``eps``, ``scale``, ``out_indices``): call :meth:`OneDNNGraph.clear` after those.
"""

from __future__ import annotations

import copy
import operator
import threading
import warnings

import torch
import torch.nn as nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .convert import is_channels_last
from .dispatch import _onednn_enabled, exporting, no_autograd, onednn, onednn_bf16_available, use_triton
from .modules.derived import stamp, stamp_matches
from .modules.onednn_fusion import fusing, onednn_graph_available, quiet_tracing, warm_up
from .reference import Conformer
from .tolerance import HALF_FACTOR, HALF_SLACK, MODEL_TOL, rel_error

# onednn_graph_available comes from modules.onednn_fusion
__all__ = ["INPUT_LIMIT", "OneDNNGraph", "onednn_graph", "onednn_graph_available"]

# The largest |pixel| a graph serves. Far beyond, float32 can overflow inside the model (its
# LayerNorms square their inputs: from about 1e17 for Conformer-S with random weights), and oneDNN's
# ReLU maps the NaN that follows to 0 where the model's keeps it: such images, and NaN or Inf ones,
# run eagerly. Each graph is also checked finite, as the eager model, on a probe of this magnitude
# (weights that grow activations far more than trained ones do would overflow sooner).
INPUT_LIMIT = 1e6


def _servable_sources(sources: tuple[torch.Tensor, ...]) -> bool:
    """Whether every parameter and buffer is a CPU tensor, every floating one float32 and finite."""
    if not all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in sources):
        return False
    floating = [t.detach().sum() for t in sources if t.is_floating_point()]
    return not floating or bool(torch.stack(floating).sum().isfinite())


def _finite(outputs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> bool:
    return all(bool(o.isfinite().all()) for o in outputs)


def _bfloat16_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with bfloat16 weights (rounded once), except the LayerNorms' scales and
    shifts: float32, the form in which oneDNN Graph takes a bfloat16 LayerNorm into a partition."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    return model


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
    its maps). ``train()``/``eval()`` reach the wrapped model; :func:`~fastconformer.save_checkpoint`
    writes the wrapped model (this wrapper's own ``state_dict`` keys carry a ``model.`` prefix, which
    :func:`~fastconformer.checkpoint.read_state_dict` strips)."""

    def __init__(self, model: nn.Module, max_graphs: int = 8):
        super().__init__()
        self.model = model
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple | None] = {}  # signature -> (graph, partitions) or None (runs eagerly)
        self._stamp = None  # (the modules, a stamp of their parameters and buffers) the graphs were traced from
        self._full_warned = False  # whether a signature beyond max_graphs was told it runs eagerly (this stamp)
        self._lock = threading.Lock()

    def _state(self) -> tuple[bool, tuple[nn.Module, ...], tuple[torch.Tensor, ...]]:
        """(whether a graph cannot stand for the modules: one is in train mode or has forward
        hooks, the modules, their parameters and buffers), in one walk (every call: an explicit
        stack, a third of ``modules()``'s time; a module shared by two parents is listed twice)."""
        unservable = bool(_global_forward_hooks or _global_forward_pre_hooks)
        modules, sources, stack = [], [], [self.model]
        while stack:
            module = stack.pop()
            modules.append(module)
            unservable = unservable or module.training or bool(module._forward_hooks or module._forward_pre_hooks)
            sources += module._parameters.values()
            sources += module._buffers.values()
            stack += [child for child in module._modules.values() if child is not None]
        return unservable, tuple(modules), tuple(t for t in sources if t is not None)

    def serves(self, x: torch.Tensor) -> bool:
        """Whether a graph may compute ``model(x)`` (the gate of the module docstring)."""
        unservable, _, sources = self._state()
        return not unservable and self._serves_call(x, sources) and _servable_sources(sources)

    def _serves_call(self, x: torch.Tensor, sources: tuple[torch.Tensor, ...]) -> bool:
        """The gate's checks of x, the call's modes and the sources' autograd and inference flags:
        those the sources' stamp cannot vouch for."""
        if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4):
            return False
        if torch.is_autocast_enabled("cpu") and not (torch.get_autocast_dtype("cpu") == torch.bfloat16
                                                     and onednn_bf16_available()):
            return False
        if exporting() or torch.compiler.is_compiling() or not (_onednn_enabled() and no_autograd(x, *sources)):
            return False
        if x.numel() == 0 or any(t.is_inference() for t in sources) or use_triton(x) or not onednn_graph_available():
            return False
        low, high = torch.aminmax(x)  # NaN compares false
        return bool(-INPUT_LIMIT <= low) and bool(high <= INPUT_LIMIT)

    def clear(self) -> None:
        """Drop every graph (the next call traces again)."""
        with self._lock:
            self._graphs.clear()
            self._stamp, self._full_warned = None, False

    def graphs(self) -> dict[tuple, int]:
        """{input signature (shape, channels_last, bfloat16): oneDNN Graph partitions} for every
        signature a verified graph serves now."""
        return {signature: entry[1] for signature, entry in self._graphs.items() if entry is not None}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        unservable, modules, sources = self._state()
        if unservable or not self._serves_call(x, sources):
            return self.model(x)
        channels_last = is_channels_last(x)
        if not channels_last:
            x = x.contiguous()
        graph = self._graph((tuple(x.shape), channels_last, torch.is_autocast_enabled("cpu")), modules, sources)
        if graph is None:
            return self.model(x)
        with fusing(), torch.autocast("cpu", enabled=False):  # a bfloat16 graph rounds x itself
            return list(graph(x))

    def _graph(self, signature: tuple, modules: tuple[nn.Module, ...], sources: tuple[torch.Tensor, ...]):
        with self._lock:
            if not (self._stamp is not None and len(self._stamp[0]) == len(modules)
                    and all(map(operator.is_, self._stamp[0], modules)) and stamp_matches(self._stamp[1], sources)):
                if self._stamp is not None:
                    warnings.warn("onednn_graph: the model changed since its graphs were traced; each new trace keeps "
                                  "about a copy of the weights that TorchScript never frees (wrap models whose weights "
                                  "stay fixed)", RuntimeWarning, stacklevel=5)  # the caller's line
                self._graphs.clear()  # stale, and their constants and the stamp's aliases hold the old weights
                self._full_warned = False
                self._stamp, taken = None, stamp(sources)  # taken before the check: a write after it moves the stamp
                if not _servable_sources(sources):  # checked once per stamp: unchanged sources stay servable
                    return None
                self._stamp = (modules, taken)
            if signature not in self._graphs:
                if len(self._graphs) >= self.max_graphs:  # no eviction: a dropped trace's memory never comes back
                    if not self._full_warned:
                        self._full_warned = True
                        warnings.warn(f"onednn_graph: {self.max_graphs} input signatures (max_graphs) are traced "
                                      f"already; input {signature[0]} and other new signatures run the eager model "
                                      "(each trace keeps about a copy of the weights that TorchScript never frees; "
                                      "pass a larger max_graphs, or call clear() to trace anew)", RuntimeWarning,
                                      stacklevel=5)  # the caller's line
                    return None
                self._graphs[signature] = self._trace(*signature)
            entry = self._graphs[signature]
            return None if entry is None else entry[0]

    def _trace(self, shape: tuple[int, ...], channels_last: bool, bf16: bool
               ) -> tuple[torch.jit.ScriptModule, int] | None:
        """(A frozen traced graph of the model for float32 images of ``shape`` and layout, under
        bfloat16 autocast or not, its oneDNN Graph partitions), verified against the eager model on
        a random probe of that signature, and both finite on that probe scaled to
        :data:`INPUT_LIMIT`; None (with a warning) when tracing fails, nothing was fused, the
        outputs differ or this model's float32 overflows within the limit. The model's own error
        (before any tracing) for an input it refuses."""
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        large = probe * (INPUT_LIMIT / probe.abs().amax())
        with torch.no_grad(), onednn(False):
            with torch.autocast("cpu", enabled=False):  # first: an input the model refuses raises its own error
                expected = self.model(probe)
                finite = _finite(self.model(large))
            try:  # autocast off throughout: TorchScript's own autocast pass would insert casts
                with torch.autocast("cpu", enabled=False), quiet_tracing():
                    model = _bfloat16_copy(self.model) if bf16 else self.model
                    traced = torch.jit.trace(_Traceable(model, torch.bfloat16 if bf16 else torch.float32), (probe,),
                                             check_trace=False)
                    del model
                    graph = torch.jit.freeze(traced)
                    out, partitions = warm_up(graph, probe)
                    with fusing():
                        finite = finite and _finite(graph(large))
            except RuntimeError as error:
                return self._eager_from_now(shape, bf16, f"tracing or running its graph failed ({error})")
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    eager = self.model(probe)
        if partitions == 0:
            return self._eager_from_now(shape, bf16, "oneDNN Graph fused nothing (is TorchScript's graph optimization "
                                                 "off?)")
        reference = eager if bf16 else expected
        if [(o.dtype, o.shape) for o in out] != [(e.dtype, e.shape) for e in reference]:
            return self._eager_from_now(shape, bf16, "its outputs' dtypes or shapes differ from the eager model's")
        errors = [rel_error(o, e) for o, e in zip(out, expected)]
        limits = ([HALF_FACTOR * rel_error(b, e) + HALF_SLACK for b, e in zip(eager, expected)] if bf16
                  else [MODEL_TOL] * len(errors))
        if not all(err <= lim for err, lim in zip(errors, limits)):
            return self._eager_from_now(shape, bf16, f"its graph does not match the eager model (relative errors "
                                                 f"{errors}, limits {limits})")
        if not finite:
            return self._eager_from_now(shape, bf16, f"this model overflows float32 on images of magnitude "
                                                 f"{INPUT_LIMIT:g} (INPUT_LIMIT)")
        return graph, partitions

    @staticmethod
    def _eager_from_now(shape: tuple[int, ...], bf16: bool, why: str) -> None:
        warnings.warn(f"onednn_graph: input {shape}{' under bfloat16 autocast' if bf16 else ''}: {why}; "
                      "this input signature runs the eager model", RuntimeWarning, stacklevel=7)  # the caller's line

    def __getstate__(self):
        state = self.__dict__.copy()  # graphs and the lock do not copy: a copy traces again
        state["_graphs"], state["_stamp"], state["_full_warned"], state["_lock"] = {}, None, False, None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()


def onednn_graph(model: nn.Module, *, max_graphs: int = 8) -> OneDNNGraph:
    """``model`` (a Conformer, reference or fast: each traces its own algebra) wrapped for CPU
    inference through oneDNN Graph: :class:`OneDNNGraph`. TypeError for anything
    but a Conformer, ValueError for ``max_graphs`` < 1."""
    if not isinstance(model, Conformer):
        raise TypeError(f"onednn_graph takes a Conformer (create_model(...), reference or fast), got "
                        f"{type(model).__name__}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"onednn_graph: max_graphs must be a positive int, got {max_graphs!r}")
    return OneDNNGraph(model, max_graphs)
