"""Equality checks of every fused module and of the whole model against the reference, on the
machine at hand: what ``fastconformer check`` runs before a user trusts the kernels on a GPU.

Each check builds a reference module with random weights and non-identity BatchNorm statistics,
computes the float64 reference output, runs the fused module (in the dtype under test, on the
device under test, under the backend under test) and the plain reference module in the same
dtype, and judges them with :func:`fastconformer.testing.compare`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable, Iterator

import torch
import torch.nn as nn

from . import reference as ref
from .convert import convert, convert_conv_trans_block
from .dispatch import _onednn_enabled, backend, onednn_available, onednn_bf16_available
from .modules.attention import FusedAttention
from .modules.conv_block import FusedConvBlock
from .modules.fcu_down import FusedFCUDown
from .modules.fcu_up import FusedFCUUp
from .modules.prepack import prepack_weights, weights_packed_now
from .modules.transformer import FusedBlock
from .onednn_graph import onednn_graph, onednn_graph_available
from .registry import create_model
from .testing import MODEL_TOL, MODULE_TOL, Comparison, compare, randomize_module, to_float64

__all__ = ["Check", "CheckResult", "CHECKS", "run_checks", "select_checks"]


def _everywhere(device: torch.device) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Check:
    """A reference module, how to convert it, and how to draw its inputs; ``not_here(device)`` says
    why the check does not run on a device (None: it runs), ``dtypes`` and ``backends`` limit it
    (None: every one the run asks for). An ``autocast`` check runs its own ``dtypes`` whatever the
    run asks for, as CPU or CUDA autocast to that dtype around the float32 module and inputs (its
    baseline: the plain module under the same autocast)."""

    name: str
    build: Callable[[], nn.Module]
    convert: Callable[[nn.Module], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    tol: float = MODULE_TOL
    not_here: Callable[[torch.device], str | None] = _everywhere
    dtypes: tuple[torch.dtype, ...] | None = None
    backends: tuple[str, ...] | None = None
    autocast: bool = False


def _onednn_serving(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "a CPU serving path (--device cpu)"
    if not onednn_available():
        return "this torch has no working oneDNN fused primitives"
    if not _onednn_enabled():  # the switch alone: the backend a run sets does not matter here
        return "oneDNN is switched off (FASTCONFORMER_ONEDNN=0 or fastconformer.dispatch.onednn(False))"
    return None


def _graph_serving(device: torch.device) -> str | None:
    return _onednn_serving(device) or (None if onednn_graph_available() else "this torch has no oneDNN Graph fuser")


def _bf16_serving(device: torch.device) -> str | None:
    return _onednn_serving(device) or (None if onednn_bf16_available()
                                       else "oneDNN has no native bf16 on this CPU (AVX512-BF16 or AMX)")


def _graph_bf16_serving(device: torch.device) -> str | None:
    return _bf16_serving(device) or _graph_serving(device)


class _MustServe(nn.Module):
    """``model`` under a serving check: RuntimeError (with the warnings the call raised) when
    ``unserved(model, x)`` says the path under check did not compute the call."""

    def __init__(self, model: nn.Module, unserved: Callable[[nn.Module, torch.Tensor], str | None]):
        super().__init__()
        self.model, self.unserved = model, unserved

    def forward(self, x: torch.Tensor):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self.model(x)
        why = self.unserved(self.model, x)
        if why:
            raise RuntimeError("; ".join([why, *(str(w.message) for w in caught)]))
        return out


def _unpacked(model: nn.Module, x: torch.Tensor) -> str | None:
    return None if weights_packed_now(model) else "the model read no packed weight"


def _ungraphed(graph: nn.Module, x: torch.Tensor) -> str | None:
    return None if graph.serves(x) and graph.graphs() else "no oneDNN graph served the call, the eager model ran"


CPU_SERVING = dict(dtypes=(torch.float32,), backends=("torch",), tol=MODEL_TOL)
CPU_BF16_SERVING = dict(dtypes=(torch.bfloat16,), backends=("torch",), autocast=True)


def _conv_trans_block() -> nn.Module:
    # Conformer-S block 5: stride-2 bottleneck with res_conv, dw_stride 2, 28x28 -> 14x14 tokens.
    return ref.ConvTransBlock(256, 512, True, 2, dw_stride=2, embed_dim=384, num_heads=6, qkv_bias=True)


CHECKS = (
    Check("squeeze (FCUDown, S block 2)", lambda: ref.FCUDown(64, 384, dw_stride=4), FusedFCUDown.from_reference,
          lambda g: (torch.randn(3, 64, 56, 56, generator=g), torch.randn(3, 197, 384, generator=g))),
    Check("expand (FCUUp, S block 2)", lambda: ref.FCUUp(384, 64, up_stride=4), FusedFCUUp.from_reference,
          lambda g: (torch.randn(3, 197, 384, generator=g), 14, 14)),
    Check("attention (6 heads, N=197)", lambda: ref.Attention(384, 6, qkv_bias=True), FusedAttention.from_reference,
          lambda g: (torch.randn(3, 197, 384, generator=g),)),
    Check("transformer Block (384, 6 heads)", lambda: ref.Block(384, 6, qkv_bias=True), FusedBlock.from_reference,
          lambda g: (torch.randn(3, 197, 384, generator=g),)),
    Check("bottleneck (ConvBlock, S stage 1)", lambda: ref.ConvBlock(64, 256, res_conv=True),
          FusedConvBlock.from_reference, lambda g: (torch.randn(3, 64, 56, 56, generator=g),)),
    Check("ConvTransBlock (S block 5)", _conv_trans_block, convert_conv_trans_block,
          lambda g: (torch.randn(2, 256, 56, 56, generator=g), torch.randn(2, 197, 384, generator=g))),
    Check("whole model (tiny, 224)", lambda: create_model("conformer_tiny_patch16"), convert,
          lambda g: (torch.randn(2, 3, 224, 224, generator=g),), tol=MODEL_TOL),
    Check("whole model, prepacked (tiny, 224)", lambda: create_model("conformer_tiny_patch16"),
          lambda model: _MustServe(prepack_weights(convert(model)), _unpacked),
          lambda g: (torch.randn(3, 3, 224, 224, generator=g),), not_here=_onednn_serving, **CPU_SERVING),
    Check("whole model, onednn_graph (tiny, 224)", lambda: create_model("conformer_tiny_patch16"),
          lambda model: _MustServe(onednn_graph(convert(model)), _ungraphed),
          lambda g: (torch.randn(3, 3, 224, 224, generator=g),), not_here=_graph_serving, **CPU_SERVING),
    Check("whole model, bf16 autocast (tiny, 224)", lambda: create_model("conformer_tiny_patch16"), convert,
          lambda g: (torch.randn(3, 3, 224, 224, generator=g),), not_here=_bf16_serving, **CPU_BF16_SERVING),
    Check("whole model, onednn_graph bf16 autocast (tiny, 224)", lambda: create_model("conformer_tiny_patch16"),
          lambda model: _MustServe(onednn_graph(convert(model)), _ungraphed),
          lambda g: (torch.randn(3, 3, 224, 224, generator=g),), not_here=_graph_bf16_serving, **CPU_BF16_SERVING),
)


def _cast(args: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(a.to(device, dtype) if isinstance(a, torch.Tensor) else a for a in args)


@torch.no_grad()
def _reference(check: Check, seed: int) -> tuple[nn.Module, tuple, object]:
    """The check's reference module (random weights and statistics, eval mode), its inputs, and its
    float64 output."""
    gen = torch.Generator().manual_seed(seed)
    module = randomize_module(check.build(), gen).eval()
    inputs = check.inputs(gen)
    with backend("torch"):
        expected = copy.deepcopy(module).double()(*to_float64(inputs))
    return module, inputs, expected


@torch.no_grad()
def _baseline(module: nn.Module, inputs: tuple, dtype: torch.dtype, device: torch.device, autocast: bool):
    """The plain reference module's output in ``dtype`` (or under autocast to it) on ``device``: the
    yardstick of a float16 or bfloat16 bound (None for float32, whose bound is absolute)."""
    if dtype == torch.float32:
        return None
    with backend("torch"):
        return _output(copy.deepcopy(module), inputs, dtype, device, autocast)


def _output(module: nn.Module, inputs: tuple, dtype: torch.dtype, device: torch.device, autocast: bool):
    """``module``'s output on ``device`` in ``dtype``, or (``autocast``) under autocast to ``dtype``
    with the module and its inputs in float32."""
    held = torch.float32 if autocast else dtype
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        return module.to(device, held)(*_cast(inputs, held, device))


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check on one backend in one dtype: its comparison, or the error it raised; or a check
    that does not run on the device, with the reason (``not_run``; neither passed nor failed)."""

    check: str
    backend: str | None
    dtype: torch.dtype | None
    comparison: Comparison | None = None
    error: str | None = None
    not_run: str | None = None  # why the check does not run here (backend and dtype then None)

    @property
    def passed(self) -> bool:
        return self.comparison is not None and self.comparison.passed

    @property
    def failed(self) -> bool:
        return self.not_run is None and not self.passed


def select_checks(only: str | None = None) -> list[Check]:
    """The checks whose name contains ``only`` (case-insensitive; all of them when None);
    ValueError when no name does."""
    checks = [c for c in CHECKS if only is None or only.lower() in c.name.lower()]
    if not checks:
        raise ValueError(f"no check name contains {only!r}; the checks are: {', '.join(c.name for c in CHECKS)}")
    return checks


def run_checks(checks: list[Check], device: torch.device, dtypes: tuple[torch.dtype, ...],
               backends: tuple[str, ...], seed: int = 0) -> Iterator[CheckResult]:
    """An iterator of :class:`CheckResult` for ``checks`` (e.g. :func:`select_checks`'s), check by
    check, then dtype by dtype, then backend by backend. The reference side of a check (module,
    inputs, float64 output, plain output in each dtype) is computed once and shared by the
    backends. A check that raises is a failed result carrying the error's text; a check that does
    not run on ``device`` is one result saying why (``not_run``); a check limited to some dtypes or
    backends runs those of ``dtypes`` and ``backends``; an autocast check runs its own dtypes."""
    for check in checks:
        try:
            why = check.not_here(device)
        except Exception as err:  # asking failed: a failed result, never an aborted run
            yield CheckResult(check.name, None, None, error=_error_text(err))
            continue
        if why:
            yield CheckResult(check.name, None, None, not_run=why)
            continue
        reference = None
        backends_here = [name for name in backends if check.backends is None or name in check.backends]
        dtypes_here = (check.dtypes if check.autocast
                       else [d for d in dtypes if check.dtypes is None or d in check.dtypes])
        for dtype in dtypes_here:
            try:
                if reference is None:
                    reference = _reference(check, seed)
                module, inputs, expected = reference
                baseline = _baseline(module, inputs, dtype, device, check.autocast)
            except Exception as err:  # the reference side failed: so does the check on every backend
                yield from (CheckResult(check.name, name, dtype, error=_error_text(err)) for name in backends_here)
                continue
            for name in backends_here:
                try:
                    with backend(name), torch.no_grad():
                        out = _output(check.convert(copy.deepcopy(module)), inputs, dtype, device, check.autocast)
                    result = CheckResult(check.name, name, dtype, comparison=compare(
                        out, expected, baseline=baseline, fp32_tol=check.tol, name=check.name))
                except Exception as err:  # reported as a failed check, never swallowed
                    result = CheckResult(check.name, name, dtype, error=_error_text(err))
                yield result


def _error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"
