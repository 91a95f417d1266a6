"""The compile matrix: every Triton kernel variant the launchers launch for real Conformer workloads,
built ahead of time for sm_80 and sm_90 with no GPU present, with what ptxas made of it
(registers, spills, shared memory, whether ``tl.dot`` became ``wgmma``).

Nothing here lists kernel variants. The fused ops' launchers run on meta tensors (shapes, strides,
dtypes and alignment, no data), forward and backward, for every :data:`WORKLOADS` entry inside
``fastconformer.kernels.record_launches``, and each launch they record becomes a
:class:`CompileSpec`: argument names and constexpr-ness come from the kernel's ``JITFunction``,
the constexprs, warps and stages from the launcher's own ``LaunchConfig``, and every other
argument goes through Triton's own launch-time specialisation (``native_specialize_impl``, called
as ``JITFunction.run`` calls it): an int equal to 1 becomes a constant, ints and pointers that are
multiples of 16 get a divisibility hint. So the matrix builds what the launchers launch.

Three scopes, each inside the next (:data:`SCOPES`): "sample", one spec per kernel and pointer
dtypes, fp16 and bf16 counted as one (:func:`dtype_class`: every kernel in every dtype combination
it is launched with, at its first launch config: the test suite's, 68 builds); "configs", one spec
per launch config (kernel, pointer dtypes, constexprs, warps, stages: every tile shape the
launchers choose) and set of arguments specialised to 1 (a layout's unit stride; 960 builds);
"all", every specialisation (1480 builds). Each spec is built with the
specialisation of the first workload that launches it (Conformer-S at 224, batch 64, first).
``python -m fastconformer.kernels [--sample | --all] [--summary]`` runs it (default: "configs");
``--list`` prints a scope's specs as JSON and ``--specs FILE`` builds those of such a list.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, native_specialize_impl

from . import Launch, add_layer_norm, attention, fcu_down, fcu_up, record_launches

__all__ = ["MODES", "PRECISIONS", "SCOPES", "WORKLOADS", "CompileReport", "CompileSpec", "Workload", "compile_matrix",
           "compile_spec", "compile_specs", "dtype_class", "in_scope", "launches", "read_specs", "spec_of",
           "specs_json", "summary"]

# "fp32" (IEEE dots), "tf32": an fp32 model with torch's TF32 matmul switch off / on; "fp16",
# "bf16": the model in that dtype; "amp-fp16", "amp-bf16": an fp32 model under CUDA autocast.
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "amp-fp16", "amp-bf16")
# (dtype of the CNN feature maps and GEMM operands, dtype of the token stream and of the parameters
# the kernels read in it) each precision gives the fused ops' launchers.
_DTYPES = {"fp32": (torch.float32, torch.float32), "tf32": (torch.float32, torch.float32),
           "fp16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.bfloat16),
           "amp-fp16": (torch.float16, torch.float32), "amp-bf16": (torch.bfloat16, torch.float32)}
# The published variants' shapes, as fastconformer.registry.VARIANTS gives them (tests/test_compile.py
# checks that they agree; the kernels do not import the model side).
VARIANTS = {
    "conformer_tiny_patch16": dict(patch_size=16, channel_ratio=1, embed_dim=384, num_heads=6),
    "conformer_small_patch16": dict(patch_size=16, channel_ratio=4, embed_dim=384, num_heads=6),
    "conformer_small_patch32": dict(patch_size=32, channel_ratio=4, embed_dim=384, num_heads=6),
    "conformer_base_patch16": dict(patch_size=16, channel_ratio=6, embed_dim=576, num_heads=9),
}
IMAGE_SIZES = ((224, 224), (800, 1344))  # ImageNet, and the detection size
BATCHES = (64, 1, 128)
# Conformer-shaped models at the edges of what the fused ops take that no published variant
# reaches (each has head_dim 64 and embed dim 384 or 576): head_dim 16, 32 and 128, embed dims 128,
# 256 and fcu_down's widest, 1024. Only at 224, batch 64. (add_layer_norm's rows up to 4096 wide
# need a transformer wider than any Conformer's squeeze takes: they are not in the matrix.)
EDGE_MODELS = {
    "edge_d128_hd16": dict(patch_size=16, channel_ratio=1, embed_dim=128, num_heads=8),
    "edge_d256_hd32": dict(patch_size=32, channel_ratio=2, embed_dim=256, num_heads=8),
    "edge_d1024_hd128": dict(patch_size=16, channel_ratio=6, embed_dim=1024, num_heads=8),
}
_MODELS = {**VARIANTS, **EDGE_MODELS}
# "eval": inference; "train": a training step (BatchNorm on batch statistics); "eval+backward":
# fine-tuning in eval mode (running statistics, gradients).
MODES = ("eval", "train", "eval+backward")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One real use of the fused ops: a Conformer variant (:data:`VARIANTS`, or one of the
    :data:`EDGE_MODELS`) on a batch of images in a precision (:data:`PRECISIONS`),
    with its CNN feature maps channels_last (the fast model's layout) or NCHW (a fused module
    dropped into an NCHW model), in a mode (:data:`MODES`)."""

    model: str
    height: int
    width: int
    batch: int
    precision: str
    channels_last: bool
    mode: str

    def __str__(self) -> str:
        return (f"{self.model} {self.height}x{self.width} batch {self.batch} {self.precision} "
                f"{'channels_last' if self.channels_last else 'NCHW'} {self.mode}")


def _workloads(models, sizes, batches) -> tuple[Workload, ...]:
    return tuple(Workload(model, h, w, batch, precision, channels_last, mode)
                 for batch, (h, w), model, precision, channels_last, mode in itertools.product(
                     batches, sizes, models, PRECISIONS, (True, False), MODES))


# Conformer-S at 224, batch 64 first: the suite builds each config as the first workload launches it.
WORKLOADS = (_workloads(sorted(VARIANTS, key=lambda name: name != "conformer_small_patch16"), IMAGE_SIZES, BATCHES)
             + _workloads(EDGE_MODELS, IMAGE_SIZES[:1], BATCHES[:1]))


def _meta(shape, dtype, grad: bool, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt).requires_grad_(grad)


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool):
    """torch's TF32 switch for float32 CUDA matmuls, which the launchers follow
    (``fastconformer.kernels.dot_precision``), set inside the block and restored after, through
    ``fp32_precision`` where torch has it (reading the legacy flag raises once that is set)."""
    matmul = torch.backends.cuda.matmul
    attr, value = (("fp32_precision", "tf32" if enabled else "ieee") if hasattr(matmul, "fp32_precision")
                   else ("allow_tf32", enabled))
    saved = getattr(matmul, attr)
    setattr(matmul, attr, value)
    try:
        yield
    finally:
        setattr(matmul, attr, saved)


def _backward(*outs: torch.Tensor) -> None:
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _recorded(unit):
    """``unit(..., grad, tf32_on)``, run with grad mode and torch's TF32 matmul switch so, returning the kernel
    launches it made; cached: the workloads repeat most units (a unit's arguments are all it reads)."""
    @functools.cache
    @functools.wraps(unit)
    def recorded(*args) -> tuple[Launch, ...]:
        *_, grad, tf32_on = args
        with record_launches() as launches, torch.set_grad_enabled(grad), _tf32_matmuls(tf32_on):
            unit(*args)
        return tuple(launches)
    return recorded


@_recorded
def _squeeze(B, C, H, W, s, D, feature, token, channels_last, grad, tf32_on):
    """A CNN stage's squeeze, with the + x_t of the ConvTransBlock and without (the module alone)."""
    x2 = _meta((B, C, H, W), feature, grad, channels_last)
    x_t = _meta((B, 1 + H // s * (W // s), D), token, grad)
    params = (_meta((D, C), feature, grad), *(_meta((D,), token, grad) for _ in range(3)))
    for add_x_t in (True, False):
        out = fcu_down.fcu_down_op(x2, x_t, *params, s, 1e-6, add_x_t)
        if grad:
            _backward(out)


@_recorded
def _expand(B, C, H, W, s, D, feature, token, channels_last, batch_stats, grad, tf32_on):
    """A CNN stage's expand and the fusion block's input: under autocast FCUUp casts its weight to
    the autocast dtype and the kernel reads the (fp32) tokens as they are; its BatchNorm is folded
    into fp32 scale/shift with the ReLU (running statistics), or runs after the GEMM (batch
    statistics) on the low-resolution map."""
    n_h, n_w = H // s, W // s
    scale, shift = _meta((C,), torch.float32, grad), _meta((C,), torch.float32, grad)
    low = fcu_up.fcu_up_expand_op(_meta((B, 1 + n_h * n_w, D), token, grad),
                                  _meta((C, D, 1, 1), feature, grad).flatten(1), scale, shift, n_h, n_w,
                                  not batch_stats)
    if grad:
        _backward(low)
    low = low.detach().requires_grad_(grad)
    out = fcu_up.bn_relu_add_upsampled_op(_meta((B, C, H, W), feature, grad, channels_last), scale, shift, low, s)
    if grad:
        _backward(out)


@_recorded
def _transformer(B, N, D, heads, feature, token, grad, tf32_on):
    """The transformer block's attention and residual add + LayerNorm (with the sum's own gradient,
    as in the block, and without): the residual stream in the token dtype, the added branch (a
    linear layer's output) in the feature dtype, as under autocast."""
    out, _ = attention.attention_op(_meta((B, 1 + N, 3 * D), feature, grad), heads, (D // heads) ** -0.5)
    if grad:
        _backward(out)
    rows = (_meta((B * (1 + N), D), token, grad), _meta((B * (1 + N), D), feature, grad))
    params = (_meta((D,), token, grad), _meta((D,), token, grad))
    for outputs_with_grad in ((0, 1), (1,)):
        outs = add_layer_norm.add_layer_norm_op(*rows, *params, 1e-6, token)
        if grad:
            _backward(*(outs[i] for i in outputs_with_grad))


def launches(w: Workload) -> list[Launch]:
    """Every kernel launch the fused ops make in workload ``w``: its forward (and backward, but for
    inference) run on meta tensors, each op called as the fast model calls it."""
    kwargs = _MODELS[w.model]
    patch, D, heads = kwargs["patch_size"], kwargs["embed_dim"], kwargs["num_heads"]
    feature, token = _DTYPES[w.precision]
    grad, tf32_on = w.mode != "eval", w.precision == "tf32"
    made = []
    for stage in range(3):
        C = int(64 * kwargs["channel_ratio"] * 2 ** stage) // 4  # the bottleneck's middle width
        H, W, s = w.height // 4 // 2 ** stage, w.width // 4 // 2 ** stage, patch // 4 // 2 ** stage
        made += _squeeze(w.batch, C, H, W, s, D, feature, token, w.channels_last, grad, tf32_on)
        made += _expand(w.batch, C, H, W, s, D, feature, token, w.channels_last, w.mode == "train", grad, tf32_on)
    N = (w.height // patch) * (w.width // patch)
    return made + list(_transformer(w.batch, N, D, heads, feature, token, grad, tf32_on))


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel variant as a launch compiles it: what ``triton.compile`` needs to build it."""

    name: str  # kernel[pointer dtypes,constexprs,warps,stages,specialisation]: unique
    kernel: str  # "module:function" of the @triton.jit function
    signature: dict[str, str]  # every parameter in order: "*fp16", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, object]  # the launcher's constexprs and the ints specialised to 1
    attrs: dict[str, list]  # Triton's attributes of the specialised arguments (divisibility by 16)
    num_warps: int
    num_stages: int
    workload: str  # the first workload that launches it
    scope: str = "all"  # the narrowest of SCOPES that builds it


@functools.cache
def _jit_function(fn) -> JITFunction:
    # Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction that keeps the Python
    # function in .fn; its parameters (and compilation) need a JITFunction of it.
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


_signature = functools.cache(inspect.signature)  # of a kernel's Python function


def _kernel(path: str) -> JITFunction:
    module, _, name = path.partition(":")
    return _jit_function(getattr(importlib.import_module(module), name))


@functools.cache
def _backend():
    return make_backend(GPUTarget("cuda", 90, 32))  # the specialisation is the same for every NVIDIA target


def _runs(items: Iterable[str]) -> str:
    """``"fp16x2,fp32x5"`` for fp16, fp16, fp32, fp32, fp32, fp32, fp32."""
    return ",".join(k + (f"x{n}" if (n := len(list(group))) > 1 else "") for k, group in itertools.groupby(items))


def spec_of(launch: Launch, workload: str = "") -> CompileSpec:
    """The spec one recorded launch compiles to (its ``scope`` is :func:`compile_specs`'s to set)."""
    fn = _jit_function(launch.kernel)
    path = f"{fn.fn.__module__}:{fn.fn.__name__}"
    config = launch.config
    declared = [p.name for p in fn.params if p.is_constexpr]
    if sorted(config.constexprs) != sorted(declared) or len(launch.args) != len(fn.params) - len(declared):
        raise RuntimeError(f"{path} takes constexprs {declared} and {len(fn.params) - len(declared)} other arguments; "
                           f"its launcher passed constexprs {list(config.constexprs)} and {len(launch.args)} arguments")
    values = _signature(fn.fn).bind(*launch.args, **config.constexprs).arguments
    signature, constexprs, attrs, code = {}, {}, {}, []
    for p in fn.params:
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(_backend(), value, p.is_const, not p.do_not_specialize,
                                           not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = key
            code.append("1")
        elif isinstance(key, str) and _backend().parse_attr(key):
            attrs[p.name] = _backend().parse_attr(key)
            code.append("D")
        else:
            code.append(".")
    dtypes = _runs(t[1:] for t in signature.values() if t.startswith("*"))
    settings = ",".join(f"{k}={v}" for k, v in config.constexprs.items())
    name = (f"{fn.fn.__name__.removesuffix('_kernel')}[{dtypes},{settings},{config.num_warps}w{config.num_stages}s,"
            f"{''.join(code)}]")
    return CompileSpec(name, path, signature, constexprs, attrs, config.num_warps, config.num_stages, workload)


def _build(spec: CompileSpec) -> tuple:
    """Everything triton.compile sees of a spec."""
    return (spec.kernel, spec.signature, spec.constexprs, spec.attrs, spec.num_warps, spec.num_stages)


@functools.cache
def _all_specs() -> tuple[CompileSpec, ...]:
    specs: dict[str, CompileSpec] = {}
    # (kernel, pointer dtypes, launcher's constexprs, warps, stages, arguments specialised to 1): spec
    first_of_config: dict[tuple, str] = {}
    first_of_dtypes: dict[tuple, str] = {}  # (kernel, pointer dtypes' classes): spec
    seen = set()  # ids of the (cached) launches already turned into specs
    for w in WORKLOADS:
        for launch in launches(w):
            if id(launch) in seen:
                continue
            seen.add(id(launch))
            spec = specs.setdefault((new := spec_of(launch, str(w))).name, new)
            if _build(spec) != _build(new):
                raise RuntimeError(f"two different kernel variants are both named {spec.name}")
            pointers = tuple(t for t in spec.signature.values() if t.startswith("*"))
            config = launch.config
            ones = tuple(k for k in spec.constexprs if k not in config.constexprs)
            first_of_config.setdefault((spec.kernel, pointers, tuple(config.constexprs.items()), config.num_warps,
                                        config.num_stages, ones), spec.name)
            first_of_dtypes.setdefault((spec.kernel, tuple(map(dtype_class, pointers))), spec.name)
    sample, configs = set(first_of_dtypes.values()), set(first_of_config.values())
    return tuple(dataclasses.replace(s, scope="sample" if s.name in sample else "configs" if s.name in configs
                                     else "all") for s in specs.values())


# What the compile matrix builds, narrowest first; each scope holds the ones before it.
SCOPES = ("sample", "configs", "all")


def dtype_class(pointer: str) -> str:
    """A pointer argument's type as the "sample" scope tells them apart: fp16 and bf16 are one
    class (the same layouts, tiles and MMA shapes; their builds differ by a few registers, up to 20
    in the expand's backward on sm_80), every other type its own."""
    return "*16-bit float" if pointer in ("*fp16", "*bf16") else pointer


def in_scope(specs: Iterable[CompileSpec], scope: str) -> list[CompileSpec]:
    """The ``specs`` (:func:`compile_specs`'s, of any scope) that ``scope`` (:data:`SCOPES`) builds."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    return [s for s in specs if SCOPES.index(s.scope) <= SCOPES.index(scope)]


def compile_specs(scope: str = "configs") -> list[CompileSpec]:
    """The specs of the kernel launches :data:`WORKLOADS` make, in first-launch order, in ``scope``
    (:data:`SCOPES`): one per kernel and pointer dtypes ("sample", the test suite's; fp16 and bf16 one
    class), one per launch config and layout ("configs") or every specialisation ("all")."""
    return in_scope(_all_specs(), scope)


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
    fn = _kernel(spec.kernel)
    attrs = {(fn.arg_names.index(name),): attr for name, attr in spec.attrs.items()}
    source = ASTSource(fn, spec.signature, spec.constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    registers, spills, shared = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return CompileReport(name=spec.name, arch=arch, registers=registers, spill_bytes=spills,
                         shared_bytes=max(shared, compiled.metadata.shared), uses_wgmma="wgmma" in ptx,
                         uses_mma="mma.sync" in ptx or "wgmma" in ptx)


def _compile_job(job: tuple[CompileSpec, int]) -> CompileReport:
    return compile_spec(*job)


def compiles_natively() -> bool:
    """Whether triton compiles in this process: TRITON_INTERPRET was unset (or 0) when it was imported."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def compile_specs_for(specs: Iterable[CompileSpec], arches, jobs: int | None = None) -> list[CompileReport]:
    """Each spec built for each arch, in ``jobs`` processes (default: CPU count); needs
    :func:`compiles_natively`."""
    work = [(spec, arch) for spec in specs for arch in arches]
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count()) as pool:
        return list(pool.map(_compile_job, work))


def compile_matrix(arches=(80, 90), jobs: int | None = None, scope: str = "configs",
                   specs: Iterable[CompileSpec] | None = None) -> dict[tuple[str, int], CompileReport]:
    """Compile ``specs`` (default: :func:`compile_specs` of ``scope``) for every arch; {(spec name, arch): report}.

    Runs in this process when triton compiles natively, else (under TRITON_INTERPRET=1, as in the
    CPU test suite) in a child process without it (``python -m fastconformer.kernels --specs FILE``:
    the specs derived here, not again there)."""
    specs = compile_specs(scope) if specs is None else list(specs)
    reports = compile_specs_for(specs, arches, jobs) if compiles_natively() else _compile_in_child(specs, arches, jobs)
    return {(r.name, r.arch): r for r in reports}


def _compile_in_child(specs: list[CompileSpec], arches, jobs: int | None) -> list[CompileReport]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns unless the (default) choice is explicit
    with tempfile.NamedTemporaryFile("w", suffix=".json") as listed:
        listed.write(specs_json(specs))
        listed.flush()
        cmd = [sys.executable, "-m", __package__, "--arches", *map(str, arches), "--specs", listed.name]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [CompileReport(**r) for r in json.loads(proc.stdout)]


def specs_json(specs: Iterable[CompileSpec]) -> str:
    """``specs`` as the JSON list ``python -m fastconformer.kernels --list`` prints (:func:`read_specs` reads it)."""
    return json.dumps([dataclasses.asdict(s) for s in specs])


def read_specs(path: str) -> list[CompileSpec]:
    """The specs in a JSON file as :func:`specs_json` writes it."""
    with open(path) as f:
        return [CompileSpec(**s) for s in json.load(f)]


def summary(reports: Iterable[CompileReport]) -> str:
    """A Markdown table per kernel and arch: variants built, most registers and shared memory, how
    many spill (and the worst), wgmma use; then every spilling variant by name."""
    by_kernel = collections.defaultdict(list)
    for r in reports:
        by_kernel[(r.name.partition("[")[0], r.arch)].append(r)
    lines = ["| kernel | arch | variants | max registers | max shared (B) | spilling | worst spill (B) | wgmma |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for (kernel, arch), rs in sorted(by_kernel.items()):
        spilling = [r for r in rs if r.spill_bytes]
        wgmma = sum(r.uses_wgmma for r in rs)
        lines.append(f"| {kernel} | sm_{arch} | {len(rs)} | {max(r.registers for r in rs)} | "
                     f"{max(r.shared_bytes for r in rs)} | {len(spilling)} | "
                     f"{max((r.spill_bytes for r in spilling), default=0)} | {wgmma}/{len(rs)} |")
    spills = sorted((r for rs in by_kernel.values() for r in rs if r.spill_bytes), key=lambda r: (r.name, r.arch))
    lines += ["", "Spills: " + ("none." if not spills else "")]
    lines += [f"- sm_{r.arch} {r.name}: {r.spill_bytes} B, {r.registers} registers" for r in spills]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastconformer.kernels", description=(
        "Compile the kernel variants the launchers launch for the real workloads (--scope), ahead of time (no GPU "
        "needed), and print ptxas's reports as JSON."))
    parser.add_argument("--arches", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--scope", choices=SCOPES, default="configs",
                       help="sample: one variant per kernel and pointer dtypes (the test suite's); configs (default): "
                            "one per launch config and layout; all: every specialisation")
    scope.add_argument("--all", dest="scope", action="store_const", const="all", help="the same as --scope all")
    scope.add_argument("--sample", dest="scope", action="store_const", const="sample",
                       help="the same as --scope sample")
    scope.add_argument("--specs", metavar="FILE",
                       help="build the specs in FILE (a JSON list as --list prints it, e.g. filtered) instead")
    parser.add_argument("--list", action="store_true", help="print the scope's specs as JSON, build nothing")
    parser.add_argument("--summary", action="store_true", help="a Markdown summary per kernel instead of JSON")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs}")
    if args.specs:
        try:
            specs = read_specs(args.specs)
        except (OSError, ValueError, TypeError) as e:
            parser.error(f"--specs {args.specs}: not a JSON list of specs as --list prints them ({e})")
    else:
        specs = compile_specs(args.scope)
    if args.list:
        print(specs_json(specs))
        return
    reports = compile_matrix(tuple(args.arches), jobs=args.jobs, specs=specs).values()
    if args.summary:
        print(f"triton {triton.__version__}, torch {torch.__version__}\n\n{summary(reports)}")
    else:
        print(json.dumps([dataclasses.asdict(r) for r in reports]))

