"""The equality policy (README.md, "How correctness is checked") and the random draws it is checked on.

Used by the test suite and by ``fastconformer check``, so a user's GPU is judged exactly as CI is.

Policy: compare against the reference computed in float64 from the same weights and inputs, by
relative error ``||out - ref|| / ||ref||``. float32: at most 1e-5 per module, 1e-4 for the whole
model. float16 / bfloat16: at most 2x the plain-PyTorch module's own error in that dtype, + 1e-6.
NaN or Inf never passes. float32 is compared with TF32 off (:func:`tf32`): cuDNN convolutions
default to TF32 on Ampere and later GPUs, which alone puts a whole model ~1e-3 from float64; TF32
has its own checks, bound by 2x the reference's own error under TF32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Iterator

import torch
import torch.nn as nn

from .tolerance import HALF_FACTOR, HALF_SLACK, MODEL_TOL, MODULE_TOL, rel_error

__all__ = ["MODULE_TOL", "MODEL_TOL", "Comparison", "rel_error", "compare", "assert_matches", "onednn_calls",
           "randomize_module", "reference_and_fast", "saved_activation_bytes", "tf32", "to_float64"]

def _dtype_of(x) -> torch.dtype:
    return x.dtype if isinstance(x, torch.Tensor) else _dtype_of(x[0])


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One equality check: the fused output's error, the bound it had to meet, and the verdict."""

    name: str
    dtype: torch.dtype
    error: float
    bound: float
    baseline_error: float | None = None

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.bound

    def __str__(self) -> str:
        base = "" if self.baseline_error is None else f", plain-PyTorch error {self.baseline_error:.3g}"
        verdict = "ok" if self.passed else "FAIL"
        return f"{self.name} [{self.dtype}]: rel. error {self.error:.3g} <= {self.bound:.3g}{base}: {verdict}"


def compare(out, ref, *, baseline=None, fp32_tol: float = MODULE_TOL, name: str = "output") -> Comparison:
    """Judge ``out`` against the float64 ``ref``.

    float32 ``out``: bound ``fp32_tol`` (MODULE_TOL for a module, MODEL_TOL for the whole model).
    float16/bfloat16 ``out``: ``baseline`` (the plain-PyTorch module's output in the same dtype) is
    required; bound ``2 * rel_error(baseline, ref) + 1e-6``.
    """
    dtype = _dtype_of(out)
    error = rel_error(out, ref)
    if dtype in (torch.float16, torch.bfloat16):
        if baseline is None:
            raise ValueError(f"compare({name!r}) of a {dtype} output needs baseline=, the plain-PyTorch output "
                             "in the same dtype")
        baseline_error = rel_error(baseline, ref)
        return Comparison(name, dtype, error, HALF_FACTOR * baseline_error + HALF_SLACK, baseline_error)
    if dtype in (torch.float32, torch.float64):
        return Comparison(name, dtype, error, fp32_tol)
    raise TypeError(f"compare({name!r}): expected a floating-point output, got {dtype}")


def assert_matches(out, ref, *, baseline=None, fp32_tol: float = MODULE_TOL, name: str = "output") -> Comparison:
    """:func:`compare`, raising AssertionError with the numbers when the policy is not met."""
    result = compare(out, ref, baseline=baseline, fp32_tol=fp32_tol, name=name)
    assert result.passed, str(result)
    return result


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """torch's TF32 switches for float32 CUDA work set to ``enabled`` inside the block and restored
    after: cuBLAS matmuls (which the Triton kernels' dots follow,
    ``fastconformer.kernels.dot_precision``) and cuDNN convolutions (and RNNs, so that torch's legacy
    ``cudnn.allow_tf32`` stays readable). Uses torch's ``fp32_precision`` settings where torch has
    them (>= 2.9; once they are set, reading a legacy ``allow_tf32`` flag that no longer describes
    them raises), else the legacy flags. No effect on CPU arithmetic."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        switches, attr, value = ((backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn), "fp32_precision",
                                 "tf32" if enabled else "ieee")
    else:
        switches, attr, value = (backends.cuda.matmul, backends.cudnn), "allow_tf32", enabled
    saved = [getattr(switch, attr) for switch in switches]
    try:
        for switch in switches:
            setattr(switch, attr, value)
        yield
    finally:
        for switch, previous in zip(switches, saved):
            setattr(switch, attr, previous)


def to_float64(x):
    """A float64 copy of a tensor (or of each tensor in a list/tuple), for reference computations;
    anything else (e.g. the ints H, W that FCUUp takes next to its tokens) is returned as it is."""
    if isinstance(x, (list, tuple)):
        return type(x)(to_float64(t) for t in x)
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().to(torch.float64)


@torch.no_grad()
def randomize_module(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Draw fresh weights for every parameter (normal, scaled by 1/sqrt(fan-in) for matrices) and
    BatchNorm running statistics that are not the identity (mean ~ N(0, 0.5), var ~ U(0.5, 1.5)),
    so that no check passes on an identity normalisation or on zeros. Returns ``module``."""
    for name, p in module.named_parameters():
        fan_in = p[0].numel() if p.ndim > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if p.ndim > 1 else 0.5
        draw = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
        if p.ndim == 1 and name.rsplit(".", 1)[-1] == "weight":  # norm scales: around 1
            draw = 1.0 + draw
        p.copy_(draw.to(p.dtype))
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator, dtype=torch.float64) * 0.5)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator, dtype=torch.float64))
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
    return module


def reference_and_fast(name: str, seed: int = 0, randomize: bool = True, **overrides) -> tuple[nn.Module, nn.Module]:
    """(reference model ``name`` built with ``torch.manual_seed(seed)`` and ``overrides``, its
    converted deep copy); with ``randomize``, random weights and BatchNorm statistics first
    (:func:`randomize_module`, same seed), else the model's own initialisation."""
    from .convert import convert
    from .registry import create_model

    torch.manual_seed(seed)
    model = create_model(name, **overrides)
    if randomize:
        randomize_module(model, torch.Generator().manual_seed(seed))
    return model, convert(copy.deepcopy(model))


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm state of ``module``'s state_dict: running statistics and batch counters."""
    return {k: v for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def saved_activation_bytes(model: nn.Module, *inputs, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward of ``model``
    (parameters excluded: they exist anyway), i.e. the activation memory a training step holds at
    its peak; under autocast in ``autocast_dtype`` on the inputs' device type if given.
    Deterministic, unlike allocator peaks."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    device_type = next(t for t in inputs if isinstance(t, torch.Tensor)).device.type
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)):
        out = model(*inputs)
    del out
    return sum(saved.values())


def onednn_calls(fn) -> int:
    """How many oneDNN fused-primitive calls (``mkldnn::_*`` ops) ``fn()`` makes, by the profiler:
    proof that a fast path was (or was not) taken."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::_"))
