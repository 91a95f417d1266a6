"""TorchScript's oneDNN Graph fuser, as the fast path uses it: functions traced with
``torch.jit.trace`` and run by TorchScript with ``torch.jit.enable_onednn_fusion``, which compiles
them into oneDNN partitions (a convolution with its post-ops, attention's matmuls and softmax).
Used for a whole model by :func:`fastconformer.onednn_graph` and for attention's core in float32
CPU inference by :func:`fastconformer.modules.attention.attention`.

TorchScript, the only home of this fuser, is deprecated (torch 2.13 warns on ``torch.jit.trace``
and ``torch.jit.freeze``); :func:`quiet_tracing` silences those warnings around ``onednn_graph``'s
traces (a ``warnings.catch_warnings`` block, which is not thread-safe: the attention traces, which
happen inside a plain ``model(x)``, call torch.jit's tracing implementation instead, which does not warn).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Iterator

import torch

from ..dispatch import onednn_available

__all__ = ["fused_partitions", "fusing", "onednn_graph_available", "quiet_tracing", "trace_quietly", "warm_up"]

_FUSION_LOCK = threading.Lock()
_FUSION_USERS = [0, False]  # callers inside fusing() now, the switch as it was before the first of them


def onednn_graph_available() -> bool:
    """Whether this torch has TorchScript's oneDNN Graph fuser and oneDNN's fused primitives work here."""
    return (hasattr(torch.jit, "enable_onednn_fusion") and hasattr(torch._C, "_jit_llga_enabled")
            and onednn_available())


@contextlib.contextmanager
def fusing() -> Iterator[None]:
    """oneDNN Graph fusion on while any caller is inside (a process-wide TorchScript switch: the
    first entry turns it on, the last exit restores what it was, across threads)."""
    with _FUSION_LOCK:
        if _FUSION_USERS[0] == 0:
            _FUSION_USERS[1] = torch.jit.onednn_fusion_enabled()
            torch.jit.enable_onednn_fusion(True)
        _FUSION_USERS[0] += 1
    try:
        yield
    finally:
        with _FUSION_LOCK:
            _FUSION_USERS[0] -= 1
            if _FUSION_USERS[0] == 0:
                torch.jit.enable_onednn_fusion(_FUSION_USERS[1])


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Without the warnings of ``torch.jit.trace``/``freeze`` on the package's own traces: the
    tracer's (input checks read sizes as Python values, hence one graph per input shape) and the
    deprecation of both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit.(trace|trace_method|freeze)` is deprecated", DeprecationWarning)
        yield


# torch.jit.trace's implementation, which warns neither of its deprecation nor (on a function that
# reads no sizes as Python values) as the tracer; torch.jit.trace itself where a torch lacks it
_TRACE_IMPL = getattr(torch.jit._trace, "_trace_impl", torch.jit.trace)


def trace_quietly(fn: Callable, inputs: tuple, **kwargs):
    """``torch.jit.trace(fn, inputs, **kwargs)`` without touching the warning filters (so safe
    inside a user's ``model(x)`` on any thread, where :func:`quiet_tracing` is not) and without its
    DeprecationWarning: for functions the tracer has nothing to warn about."""
    return _TRACE_IMPL(fn, inputs, **kwargs)


def fused_partitions() -> int:
    """How many oneDNN Graph partitions the graph this thread ran last was optimized into."""
    return len(torch.jit.last_executed_optimized_graph().findAllNodes("prim::oneDNNFusionGroup"))


def warm_up(graph: Callable, *inputs: torch.Tensor):
    """(``graph(*inputs)``, its oneDNN Graph partitions) after running it until TorchScript has
    optimized it (its profiled runs, then the optimized one), with fusion on."""
    with fusing():
        for _ in range(torch._C._jit_get_num_profiled_runs() + 1):
            out = graph(*inputs)
        return out, fused_partitions()
