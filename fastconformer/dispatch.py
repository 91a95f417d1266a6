"""The one dispatch mechanism: each fused op has a PyTorch implementation and a Triton one, and
:func:`fused_op` picks between them per call.

Rules, for the backend chosen with :func:`backend` (default ``"auto"``):

- ``"torch"``: always the PyTorch implementation (same algebra, plain torch ops).
- ``"triton"``: always the Triton kernel; the tensors must be on CUDA, or on the CPU with
  ``TRITON_INTERPRET=1`` set before triton was imported (the interpreter, used by the tests).
  Anything else raises :class:`BackendUnavailableError` (a RuntimeError) saying why.
- ``"auto"``: Triton for CUDA tensors when triton is importable, PyTorch otherwise. The
  interpreter is a verification tool, so ``auto`` never picks it for CPU tensors.

The environment variable ``FASTCONFORMER_BACKEND`` sets the default for a process; a
:func:`backend` block holds for the thread (and asyncio task) that entered it, so threads of one
server may each hold their own.

Inside the PyTorch implementation, CPU inference may go one step further: :func:`use_onednn` says
when float32 CPU work with no autograd graph may run through oneDNN's fused primitives (a linear
layer with its GELU or residual add in one call, the primitive inductor's CPU backend emits; a
convolution summed into its residual) and oneDNN Graph partitions (attention),
:func:`onednn_autocast_bf16` when bfloat16 work under CPU autocast may.
:func:`onednn` (or ``FASTCONFORMER_ONEDNN=0``) switches that off, e.g. to measure what it buys.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
from typing import Callable, Iterator

import torch

__all__ = ["BACKENDS", "BackendUnavailableError", "backend", "check_environment", "current_backend", "exporting",
           "fused_op", "interpreter_enabled", "onednn", "no_autograd", "onednn_autocast_bf16", "onednn_available",
           "onednn_bf16", "onednn_bf16_available", "triton_available", "use_onednn", "use_triton"]

BACKENDS = ("auto", "triton", "torch")


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


# The switches hold one value per thread and per asyncio task (a ContextVar each; a new thread starts
# on the process defaults, a task on its creator's values). torch.compile cannot trace
# ContextVar.get, but it does evaluate a property whose getter is a C function at trace time and
# guards on the result, so the switches are read through such properties: a compiled model re-traces
# when a thread or task holds another backend instead of replaying a stale choice. Unset in the
# current context, ``ContextVar.get(default)`` returns its argument, here the switches object itself.
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("fastconformer_backend")
_ONEDNN: contextvars.ContextVar[bool] = contextvars.ContextVar("fastconformer_onednn")


class _Switches:
    backend = property(_BACKEND.get)
    onednn = property(_ONEDNN.get)


_SWITCHES = _Switches()


def _environment_defaults() -> tuple[str, bool, str | None]:
    """(FASTCONFORMER_BACKEND, FASTCONFORMER_ONEDNN == "1", what is wrong with them or None), read
    once at import. A wrong value does not stop the import: it raises where the default is first
    used (:func:`check_environment`), so the command line can say what is wrong in one line."""
    name = os.environ.get("FASTCONFORMER_BACKEND") or "auto"  # set but empty: as unset
    onednn_value = os.environ.get("FASTCONFORMER_ONEDNN") or "1"
    problems = []
    if name not in BACKENDS:
        problems.append(f"FASTCONFORMER_BACKEND must be one of {', '.join(BACKENDS)} (or unset: auto), got {name!r}")
    if onednn_value not in ("0", "1"):
        problems.append(f"FASTCONFORMER_ONEDNN must be 0 or 1 (or unset: 1), got {onednn_value!r}")
    return name, onednn_value == "1", "; ".join(problems) or None


_DEFAULT_BACKEND, _DEFAULT_ONEDNN, _ENVIRONMENT_ERROR = _environment_defaults()


def check_environment() -> None:
    """Raise ValueError saying which variable is wrong when FASTCONFORMER_BACKEND or
    FASTCONFORMER_ONEDNN (read at import) holds a value they do not take. Every fused op runs
    this check where it falls back on the process defaults; :func:`fastconformer.convert` and the
    command line run it first."""
    if _ENVIRONMENT_ERROR is not None:
        raise ValueError(_ENVIRONMENT_ERROR)


class BackendUnavailableError(RuntimeError):
    """The backend in force cannot run the op on these tensors (``"triton"`` without triton, or on
    tensors it cannot reach); the message says why and what would work."""


@contextlib.contextmanager
def _holding(var: contextvars.ContextVar, value) -> Iterator:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def backend(name: str):
    """Force the implementation of every fused op inside the ``with`` block: ``"auto"``,
    ``"triton"`` or ``"torch"`` (see the module docstring). The choice holds for the calling thread
    (and asyncio task) only; other threads keep theirs, and leaving the block restores what this
    thread had before it (the process default, FASTCONFORMER_BACKEND, once every block is closed)."""
    return _holding(_BACKEND, _validate(name, "backend name"))


def onednn(enabled: bool):
    """Allow (True) or forbid (False) oneDNN's fused inference primitives inside the ``with`` block,
    for the calling thread (and asyncio task) only (see :func:`use_onednn` and :func:`backend`)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"onednn(enabled) takes a bool, got {type(enabled).__name__}")
    return _holding(_ONEDNN, enabled)


def current_backend() -> str:
    """The backend in force for the calling thread or task: its innermost :func:`backend` block,
    else FASTCONFORMER_BACKEND, else auto."""
    choice = _SWITCHES.backend
    if choice is _SWITCHES:
        check_environment()
        return _DEFAULT_BACKEND
    return choice


def _onednn_enabled() -> bool:
    enabled = _SWITCHES.onednn
    if enabled is _SWITCHES:
        check_environment()
        return _DEFAULT_ONEDNN
    return enabled


# Read once at import (plain constants keep the dispatch traceable by torch.compile). Like triton
# itself, fastconformer must be imported after TRITON_INTERPRET is set.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when triton is installed (Linux with the triton wheel)."""
    return _TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through triton's interpreter (TRITON_INTERPRET=1 was
    set before fastconformer was imported)."""
    return _INTERPRETER


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a fused op called on ``tensors`` runs its Triton kernel under the current backend."""
    choice = current_backend()
    if choice == "torch":
        return False
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    on_cuda = devices == {"cuda"}
    if choice == "auto":
        return on_cuda and triton_available() and not interpreter_enabled()
    # forced "triton"
    if not triton_available():
        raise BackendUnavailableError("backend('triton') was requested but triton is not installed; use 'auto' or "
                                      "'torch'")
    if on_cuda and not interpreter_enabled():
        return True
    if devices == {"cpu"} and interpreter_enabled():
        return True
    raise BackendUnavailableError(
        f"backend('triton') needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
        f"imported; got tensors on {sorted(devices)} with TRITON_INTERPRET="
        f"{os.environ.get('TRITON_INTERPRET', 'unset')} when fastconformer was imported; 'auto' or 'torch' run them")


def exporting() -> bool:
    """True while ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)``) or
    ``torch.jit.trace`` traces the model: the PyTorch implementations then take a branch of plain
    ops with the same algebra, which the ONNX exporter maps to standard operators
    (``fastconformer.export``) and oneDNN Graph fuses (``fastconformer.onednn_graph``)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


@functools.cache
def onednn_available() -> bool:
    """True when oneDNN's fused linear and convolution primitives (``mkldnn::_linear_pointwise``,
    ``mkldnn::_convolution_pointwise_``, shipped with every torch built with mkldnn) are registered
    and compute linear + GELU, linear + add and convolution + add into the residual correctly here:
    a tiny probe, run once, since being registered does not guarantee a working kernel."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_convolution_pointwise_")):
        return False
    x, w, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25], [1.0, 1.0]]), torch.tensor([0.1, 0.2])
    with torch.autocast("cpu", enabled=False):  # the probe is float32, whatever context it is first asked in
        linear = torch.nn.functional.linear(x, w, b)
        conv = linear.view(1, 2, 1, 1)  # the same numbers as a 1x1 convolution of the map x
        try:
            gelu = ops._linear_pointwise(x, w, b, "gelu", [], "none")
            added = ops._linear_pointwise.binary(x, linear, w, b, "add")
            summed = ops._convolution_pointwise_.binary(conv.clone(), x.view(1, 2, 1, 1), w.view(2, 2, 1, 1), b,
                                                        [0, 0], [1, 1], [1, 1], 1, "add", None, None, [], None)
        except RuntimeError:
            return False
    return (torch.allclose(gelu, torch.nn.functional.gelu(linear)) and torch.allclose(added, 2 * linear)
            and torch.allclose(summed, 2 * conv))


@functools.cache
def onednn_bf16_available() -> bool:
    """True when oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX), as torch reports it,
    and its fused linear primitive computes linear + GELU in bfloat16 correctly here (a tiny probe,
    run once)."""
    if not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    x, w, b = (torch.tensor(v, dtype=torch.bfloat16) for v in ([[1.0, -2.0]], [[0.5, 0.25], [1.0, 1.0]], [0.25, 0.5]))
    try:
        gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
    except RuntimeError:
        return False
    expected = torch.nn.functional.gelu(x.float() @ w.float().T + b.float())
    return gelu.dtype == torch.bfloat16 and torch.allclose(gelu.float(), expected, rtol=1e-2, atol=1e-2)


def no_autograd(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph can be recorded through ``tensors``: grad mode is off, or none
    of them requires grad (pass every tensor the computation reads, parameters included)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _onednn_may_serve(tensors: tuple[torch.Tensor, ...]) -> bool:
    """What both oneDNN gates ask first: the switch is on, torch.compile, torch.export or
    torch.jit.trace is not tracing, the fused ops would not pick Triton and no autograd graph can
    pass through."""
    return (_onednn_enabled() and not torch.compiler.is_compiling() and not exporting()
            and not use_triton(*tensors) and no_autograd(*tensors))


def onednn_bf16(*tensors: torch.Tensor) -> bool:
    """Whether the PyTorch path may compute on ``tensors`` in bfloat16 through oneDNN's kernels
    (its inner product, and aten's bfloat16 matmuls, which call oneDNN): oneDNN has native bfloat16
    here, the tensors are CPU float32 or bfloat16, and the rest is as :func:`use_onednn` (the
    switch, no Triton, no torch.compile, no autograd graph)."""
    if not _onednn_may_serve(tensors):
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        return False
    return onednn_bf16_available()


def onednn_autocast_bf16(*tensors: torch.Tensor) -> bool:
    """:func:`onednn_bf16` under CPU autocast to bfloat16: where float32 layers may run as bfloat16
    oneDNN inner products (parameters float32, autocast's inputs float32 or bfloat16)."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast and onednn_bf16(*tensors)


def use_onednn(*tensors: torch.Tensor) -> bool:
    """Whether the PyTorch path may run ``tensors`` through oneDNN's fused inference primitives:
    the switch is on (:func:`onednn`), torch has them, the fused ops would not pick Triton for
    ``tensors``, all are float32 CPU tensors, no autograd graph can be recorded through them (grad
    mode is off, or none of them requires grad: pass every tensor the fused path reads, parameters
    included, since the primitives have no backward), CPU autocast is off and torch.compile is not
    tracing (inductor picks its own CPU fusions, and the primitive's residual-add form has no
    fake-tensor kernel to trace with)."""
    if not _onednn_may_serve(tensors):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return not torch.is_autocast_enabled("cpu") and onednn_available()


def fused_op(triton_impl: str, check: Callable[..., None]) -> Callable[[Callable], Callable]:
    """Decorate the PyTorch implementation of a fused op; ``triton_impl`` names its Triton twin as
    ``"module:function"`` inside ``fastconformer.kernels`` (imported on first use, so a machine
    without triton never imports it). Both take the same arguments; the tensor arguments decide
    the device for :func:`use_triton`. ``check`` takes those arguments too and raises ValueError or
    TypeError for what the op cannot take: it runs once per call, before either implementation, so
    neither validates its inputs again (the Triton twin checks only its own limits).
    """
    module_name, _, attr = triton_impl.partition(":")
    module_name = f"fastconformer.kernels.{module_name}"

    def decorate(torch_impl: Callable) -> Callable:
        @functools.wraps(torch_impl)
        def dispatched(*args, **kwargs):
            check(*args, **kwargs)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if use_triton(*tensors):
                # sys.modules first: a plain dict lookup that torch.compile traces (the import runs once).
                module = sys.modules.get(module_name) or importlib.import_module(module_name)
                return getattr(module, attr)(*args, **kwargs)
            return torch_impl(*args, **kwargs)

        dispatched.torch_impl = torch_impl
        dispatched.triton_impl = triton_impl
        return dispatched

    return decorate
