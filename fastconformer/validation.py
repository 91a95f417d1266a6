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
from typing import Callable, Iterator

import torch
import torch.nn as nn

from . import reference as ref
from .convert import convert, convert_conv_trans_block
from .dispatch import backend
from .modules.attention import FusedAttention
from .modules.conv_block import FusedConvBlock
from .modules.fcu_down import FusedFCUDown
from .modules.fcu_up import FusedFCUUp
from .modules.transformer import FusedBlock
from .registry import create_model
from .testing import MODEL_TOL, MODULE_TOL, Comparison, compare, randomize_module, to_float64

__all__ = ["Check", "CheckResult", "CHECKS", "run_checks"]


@dataclasses.dataclass(frozen=True)
class Check:
    """A reference module, how to convert it, and how to draw its inputs."""

    name: str
    build: Callable[[], nn.Module]
    convert: Callable[[nn.Module], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    tol: float = MODULE_TOL


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
)


def _cast(args: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(a.to(device, dtype) if isinstance(a, torch.Tensor) else a for a in args)


@torch.no_grad()
def _run_check(check: Check, dtype: torch.dtype, device: torch.device, seed: int) -> Comparison:
    gen = torch.Generator().manual_seed(seed)
    module = randomize_module(check.build(), gen).eval()
    inputs = check.inputs(gen)
    with backend("torch"):
        expected = copy.deepcopy(module).double()(*to_float64(inputs))
        baseline = None
        if dtype != torch.float32:
            baseline = copy.deepcopy(module).to(device, dtype)(*_cast(inputs, dtype, device))
    fused = check.convert(copy.deepcopy(module)).to(device, dtype)
    out = fused(*_cast(inputs, dtype, device))
    return compare(out, expected, baseline=baseline, fp32_tol=check.tol, name=check.name)


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check on one backend in one dtype: its comparison, or the error it raised."""

    check: str
    backend: str
    dtype: torch.dtype
    comparison: Comparison | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.comparison is not None and self.comparison.passed


def run_checks(device: torch.device, dtypes: tuple[torch.dtype, ...], backends: tuple[str, ...],
               seed: int = 0, only: str | None = None) -> Iterator[CheckResult]:
    """Yield a :class:`CheckResult` for every backend x dtype x check (those whose name contains
    ``only``, if given); a check that raises is a failed result carrying the error's text."""
    checks = [c for c in CHECKS if only is None or only.lower() in c.name.lower()]
    if not checks:
        raise ValueError(f"no check name contains {only!r}; checks: {[c.name for c in CHECKS]}")
    for name in backends:
        for dtype in dtypes:
            for check in checks:
                try:
                    with backend(name):
                        yield CheckResult(check.name, name, dtype, comparison=_run_check(check, dtype, device, seed))
                except Exception as err:  # reported as a failed check, never swallowed
                    yield CheckResult(check.name, name, dtype, error=f"{type(err).__name__}: {err}")
