"""fastconformer's Triton kernels (installed as ``fastconformer.kernels``).

One file per fused op, Liger-Kernel style: the ``@triton.jit`` kernels, one function per kernel
that picks its :class:`LaunchConfig` (constexprs, num_warps, num_stages) from the problem, and the
launchers, ``torch.library.triton_op`` ops that run each kernel through :func:`launch`. Nothing
else lists what a launcher can launch: the compile matrix (:mod:`.compile_matrix`,
``python -m fastconformer.kernels``) runs the launchers on meta tensors for real Conformer
workloads inside :func:`record_launches` and builds what they launch for sm_80 and sm_90, no GPU
needed.

The map: each fused op is a PyTorch function in ``fastconformer/modules/`` decorated with
``@fused_op(triton_impl="<file>:<op>_triton", check=...)`` (``fastconformer/dispatch.py``): the check
runs once, then the Triton twin here when ``use_triton`` picks it, else the PyTorch function.

  op (modules/ file)                 kernels here (forward | backward)                          used by
  fcu_down (fcu_down.py)             fcu_down_kernel | pooled_projection_kernel,                  FusedFCUDown
                                     layer_norm_gelu_backward_kernel, avg_pool_backward_kernel
  fcu_up_expand (fcu_up.py)          fcu_up_expand_kernel | fcu_up_expand_backward_kernel         FusedFCUUp
  bn_relu_add_upsampled (fcu_up.py)  bn_relu_add_upsampled_kernel | ..._backward_kernel           FusedConvTransBlock
  attention (attention.py)           attention_fwd_kernel | attention_bwd_{preprocess,dkdv,dq}    FusedAttention
  add_layer_norm (add_layer_norm.py) add_layer_norm_kernel | add_layer_norm_backward_kernel       FusedBlock

Each kernel file holds its kernels, their ``*_config()`` functions, the ``*_op`` triton_ops with
their autograd, and the ``*_triton`` entry points; COMPILE_MATRIX.md records the matrix per Triton
version. The performance model (:mod:`.perf_model`, ``python -m fastconformer.kernels --model``,
PERF_MODEL.md) predicts each of those launches' H100 time from its bytes, FLOPs and occupancy.

Importing this package imports triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pkgutil
from typing import Iterator, NamedTuple

import torch
import triton

__all__ = ["KERNEL_MODULES", "Launch", "LaunchConfig", "autocast_off", "dot_precision", "launch", "record_launches",
           "row_loop_programs", "tf32_matmul_enabled", "tile_shape", "tl_dtype"]


def _kernel_modules() -> tuple[str, ...]:
    """Every module of this package that defines kernels (one per fused op): all but the compile matrix and
    the performance model."""
    here = os.path.dirname(__file__)
    return tuple(sorted(m.name for m in pkgutil.iter_modules([here])
                        if not m.name.startswith("_") and m.name not in ("compile_matrix", "perf_model")))


KERNEL_MODULES = _kernel_modules()

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def tl_dtype(dtype: torch.dtype) -> str:
    """The signature string of a pointer to ``dtype`` elements, e.g. ``'*fp16'``."""
    try:
        return "*" + _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"fused kernels take float32, float16 or bfloat16 tensors, got {dtype}") from None


def tf32_matmul_enabled() -> bool:
    """Whether torch's own float32 CUDA matmuls use TF32, under either of torch's switches: the
    ``fp32_precision`` settings (torch >= 2.9; ``torch.backends.cuda.matmul.fp32_precision``
    resolves the global one) or the legacy ``torch.backends.cuda.matmul.allow_tf32``, which raises
    RuntimeError once the new style has been used, so it is read only where the new one is missing."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for ``dtype`` inputs: ``"tf32"`` only for float32 and only where
    torch's own matmuls use TF32 (:func:`tf32_matmul_enabled`), else ``"ieee"`` (ignored by
    fp16/bf16 dots).

    No TF32 dot of these kernels has been checked numerically yet: the Triton interpreter ignores
    input_precision, so the CPU suite runs every float32 dot in IEEE; tests/test_tf32.py bounds them
    on a CUDA GPU (2x the reference's own TF32 error)."""
    return "tf32" if dtype == torch.float32 and tf32_matmul_enabled() else "ieee"


# The 2-D tiles of the elementwise kernels over a (B, C, H, W) tensor viewed as a row-major matrix:
# channels_last rows are pixels and a tile row is BLOCK_C channels (C rounded up to a power of two
# within CHANNEL_BLOCKS); contiguous rows are (batch, channel) planes and a tile row is PIXEL_BLOCK pixels.
CHANNEL_BLOCKS = (16, 32, 64, 128)
PIXEL_BLOCK = 128


def tile_shape(elements: int, C: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of an ``elements``-element 2-D tile for C channels in the given layout."""
    block_c = (max(CHANNEL_BLOCKS[0], min(CHANNEL_BLOCKS[-1], triton.next_power_of_2(C))) if channels_last
               else PIXEL_BLOCK)
    return elements // block_c, block_c


def row_loop_programs(M: int, block_r: int, most_programs: int) -> tuple[int, int]:
    """(programs, rows per program) of a row-loop kernel over M rows in tiles of block_r rows, each
    program summing its rows' partial parameter gradients: as many programs as most_programs allows
    (at least one), each a whole number of tiles."""
    rows_per_program = block_r * max(1, triton.cdiv(triton.cdiv(M, max(1, min(most_programs, triton.cdiv(M, block_r)))),
                                                    block_r))
    return max(1, triton.cdiv(M, rows_per_program)), rows_per_program


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device``'s type, for the torch matmuls of a backward op;
    a plain context on devices autocast does not know (meta, where the compile matrix runs the
    launchers)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LaunchConfig(NamedTuple):
    """How a launcher runs a kernel besides its arguments and grid: the values of all the kernel's
    constexpr parameters (block sizes, modes), num_warps and num_stages."""

    constexprs: dict[str, object]
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch :func:`record_launches` recorded: the ``@triton.jit`` function, its positional
    arguments as the launcher passed them, its config and its grid (programs along each axis)."""

    kernel: object
    args: tuple
    config: LaunchConfig
    grid: tuple[int, ...]


_recorded: list[Launch] | None = None


def launch(kernel, grid, args: tuple, config: LaunchConfig) -> None:
    """``kernel[grid](*args, **config.constexprs, num_warps=..., num_stages=...)``. ``kernel`` is
    ``wrap_triton(<@triton.jit function>)``, written out at the call site: torch reads an op's
    kernels from its source (torch.compile's caches key on their code). Inside
    :func:`record_launches` the launch is recorded instead of run."""
    if _recorded is not None:
        _recorded.append(Launch(getattr(kernel, "kernel", kernel), tuple(args), config, tuple(grid)))  # unwrapped
        return
    kernel[grid](*args, **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside the block :func:`launch` records each launch in the list this yields instead of
    running it: for running the launchers on meta tensors (shapes, strides, dtypes and alignment,
    no data), as the compile matrix does. Process-wide, not per thread."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous
