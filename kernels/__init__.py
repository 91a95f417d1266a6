"""fastconformer's Triton kernels (installed as ``fastconformer.kernels``).

One file per fused op, Liger-Kernel style: the ``@triton.jit`` kernel, its launcher (the only
place that picks a launch config), the ``torch.library.triton_op`` registration, and a
``compile_specs()`` generator that lists every (kernel, signature, constexprs, warps, stages)
combination the launcher can pick. The test suite's ``compile`` matrix builds each of them for
sm_80 and sm_90 with :func:`compile_spec`, no GPU needed.

Importing this package imports triton.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Iterable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

__all__ = ["KERNEL_MODULES", "CompileSpec", "CompileReport", "all_compile_specs", "compile_spec", "compile_matrix",
           "tl_dtype", "dot_precision", "layout_tile", "tile_layouts"]



def _kernel_modules() -> tuple[str, ...]:
    """Every module of this package that defines kernels (each has a compile_specs() generator)."""
    here = os.path.dirname(__file__)
    return tuple(sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_")))


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


def layout_tile(tile: int, C: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of a ``tile``-element 2-D tile for C channels in the given layout."""
    block_c = (max(CHANNEL_BLOCKS[0], min(CHANNEL_BLOCKS[-1], triton.next_power_of_2(C))) if channels_last
               else PIXEL_BLOCK)
    return tile // block_c, block_c


def tile_layouts() -> list[tuple[bool, int, str]]:
    """(channels_last, a channel count that picks each distinct BLOCK_C, layout name) for every
    tile :func:`layout_tile` can return: what compile_specs must build."""
    return [(False, PIXEL_BLOCK, "contiguous")] + [(True, c, "channels_last") for c in CHANNEL_BLOCKS]


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One launchable variant of a kernel: what ``triton.compile`` needs to build it ahead of time."""

    name: str
    kernel: object  # the @triton.jit function (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET)
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    # Arguments the runtime specialises as multiples of 16 at real launches (pointers from torch's
    # allocator, strides of aligned tensors): listing them builds the variant those launches get.
    divisible_by_16: tuple[str, ...] = ()
    # False for extra specialisations of a config that the test suite also builds in another
    # variant (e.g. the unaligned twin of an aligned launch); `python -m fastconformer.kernels --all`
    # builds them too.
    in_suite: bool = True


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What ptxas made of one spec for one target."""

    name: str
    arch: int
    registers: int
    spill_bytes: int  # ptxas stack frame + local memory: non-zero means register spills
    shared_bytes: int
    uses_wgmma: bool
    uses_mma: bool


def _jit_function(kernel) -> JITFunction:
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction that keeps the Python
    # function in .fn; ahead-of-time compilation needs a JITFunction of it.
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn)


@functools.cache
def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + local bytes, shared bytes) of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG field:\n{out}")
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"]), int(fields["SHARED"])


def compile_spec(spec: CompileSpec, arch: int) -> CompileReport:
    """Build ``spec`` for ``sm_<arch>`` (80 or 90) with no GPU present and report its resources.

    Needs a process where TRITON_INTERPRET was unset when triton was imported (under the
    interpreter triton's own library functions such as tl.sum are interpreted, not compiled);
    :func:`compile_matrix` takes care of that."""
    fn = _jit_function(spec.kernel)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    source = ASTSource(fn, spec.signature, spec.constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    registers, spills, shared = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return CompileReport(name=spec.name, arch=arch, registers=registers, spill_bytes=spills,
                         shared_bytes=max(shared, compiled.metadata.shared), uses_wgmma="wgmma" in ptx,
                         uses_mma="mma.sync" in ptx or "wgmma" in ptx)


def all_compile_specs(include_all: bool = False) -> Iterable[CompileSpec]:
    """Every spec of every kernel module, in KERNEL_MODULES (alphabetical) order; only those with
    ``in_suite`` unless ``include_all``."""
    for name in KERNEL_MODULES:
        for spec in importlib.import_module(f"{__name__}.{name}").compile_specs():
            if include_all or spec.in_suite:
                yield spec


def _compile_job(job: tuple[str, int]) -> dict:
    name, arch = job
    spec = next(s for s in all_compile_specs(include_all=True) if s.name == name)
    return dataclasses.asdict(compile_spec(spec, arch))


def compile_matrix(arches=(80, 90), jobs: int | None = None,
                   include_all: bool = False) -> dict[tuple[str, int], CompileReport]:
    """Compile every spec (``in_suite`` ones unless ``include_all``) for every arch;
    {(spec name, arch): report}.

    Runs in this process when triton is compiling natively, else (under TRITON_INTERPRET=1, as in
    the CPU test suite) in a child process without it (``python -m fastconformer.kernels``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns unless the (default) choice is explicit
        cmd = [sys.executable, "-m", __name__, "--arches", *map(str, arches)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        if include_all:
            cmd.append("--all")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        reports = [CompileReport(**r) for r in json.loads(proc.stdout)]
    else:
        names = [s.name for s in all_compile_specs(include_all)]
        if len(set(names)) != len(names):
            raise RuntimeError("compile spec names must be unique")
        work = [(n, a) for n in names for a in arches]
        with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count()) as pool:
            reports = [CompileReport(**r) for r in pool.map(_compile_job, work)]
    return {(r.name, r.arch): r for r in reports}
