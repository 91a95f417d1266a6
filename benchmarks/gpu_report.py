"""One-command validation and benchmark run on this machine's GPU (or CPU), with published results.

    python -m benchmarks.gpu_report [--device cuda|cpu] [--out DIR] [--quick] [--budget SECONDS]

A tool of the source checkout, run from its root: it runs the checkout's ``tests/`` and writes
into its ``benchmarks/results/``; it is not part of the installed package (a wheel install has
neither folder), and it uses the package only through its public modules.

In order, within one time budget (default 540 s on CUDA, so that the whole run fits in 10 minutes
on an H100; rows that no longer fit are recorded as skipped, never silently dropped):

1. the environment (GPU, driver, CUDA, torch, triton, Python, CPU);
2. the pytest suite in a subprocess on this device, ``gpu`` tests included (pass/fail counts);
3. the card's roofline, measured now: device copy bandwidth and matmul TFLOP/s (bf16, fp16,
   fp32 with TF32, fp32 IEEE);
4. per-kernel achieved bandwidth and TFLOP/s of the squeeze (``fcu_down``), the expand
   (``fcu_up_expand``, ``bn_relu_add_upsampled``) and ``attention`` at Conformer-S shapes vs the
   roofline and vs PyTorch (attention: vs every SDPA backend, each op timed in alternation with
   its baselines), bytes moved = inputs read once + outputs written once, L2 flushed before each
   timed call; next to each, the performance model's predicted H100 time for the op's Triton launches
   at the same shapes (:mod:`fastconformer.kernels.perf_model`; on the CPU too, from meta tensors);
5. whole-model images/s for Conformer-Ti/S/B, batch 1/64/128/256, fp32 and AMP fp16/bf16, inference
   and a training step (forward + backward + AdamW): reference eager, fast (:func:`fastconformer.convert`),
   ``torch.compile(reference)`` (default and ``max-autotune``) and ``torch.compile(fast)``, from the
   median call, with the first call's time (the compile time for compiled models), in priority
   order (the goal rows first);
   compiled rows run in a child process with a timeout, failures (exceptions, OOM) are recorded per row;
6. ``compute-sanitizer --tool memcheck`` over the Triton kernel tests, when the binary exists.

Every time comes from :func:`fastconformer.timing.time_interleaved`, the timer of ``fastconformer
bench`` too: CUDA events around each call on the GPU, after each candidate's warm-up.

It writes ``report.json`` (every number) and ``summary.md`` (tables, with the H100 goals met / not
met) into ``--out`` (default ``benchmarks/results/<device-slug>/``) and prints the summary; progress
goes to stderr. ``--device cpu`` runs the same flow at small sizes (a 3-block Conformer-Ti at 64x64,
batch 1-2); ``--quick`` skips pytest, the compiled models and the sanitizer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import math
import multiprocessing
import os
import pathlib
import platform
import queue
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import fastconformer
from fastconformer import testing
from fastconformer.environment import DTYPES, cpu_model, device_name, device_slug
from fastconformer.kernels import perf_model, tf32_matmul_enabled
from fastconformer.modules import attention, bn_relu_add_upsampled, fcu_down, fcu_up_expand
from fastconformer.timing import time_interleaved

__all__ = ["Plan", "build_plan", "evaluate_goals", "main", "markdown_summary", "parse_pytest_counts", "run_report"]

REPO = pathlib.Path(__file__).resolve().parent.parent  # the checkout: benchmarks/..
IMPLS = ("reference", "fast", "compile(reference)", "compile(reference, max-autotune)", "compile(fast)")
EAGER_IMPLS = ("reference", "fast")
GOAL_MODEL, GOAL_DTYPE, GOAL_BATCHES = "Conformer-S", "bf16", (64, 128)
# Conformer-S/16 at 224x224: the squeeze and expand per stage (C = bottleneck width, dw_stride,
# CNN side), and the transformer's attention (tokens, dim, heads).
S_STAGES = ((64, 4, 56), (128, 2, 28), (256, 1, 14))
S_EMBED, S_HEADS, S_TOKENS = 384, 6, 197
# Interleaved rounds (after each candidate's warm-up) per kernel or copy timing, and per matmul.
KERNEL_ROUNDS = {"cuda": 20, "cpu": 5}
MATMUL_ROUNDS = {"cuda": 10, "cpu": 3}

_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the run started."""
    print(f"[gpu_report {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Plan:
    """What one run measures. ``models`` maps a label to (registry name, constructor overrides)."""

    device: str
    quick: bool
    budget_s: float
    image_size: int
    models: dict[str, tuple[str, dict]]
    model_images: dict[str, tuple[int, int]]  # (H, W) of the models that do not run at image_size
    rows: list[dict]  # model benchmark rows in priority order: model, dtype, batch, mode, impl
    kernel_batch: int
    min_time_s: float  # per timed model row, after its warm-up
    min_iters: int  # rounds at least per timed model row, after its warm-up
    pytest_args: list[str] | None  # None: pytest skipped
    pytest_budget_s: float
    compile_timeout_s: float
    sanitizer: bool


def _row(model: str, dtype: str, batch: int, mode: str, impl: str) -> dict:
    return {"model": model, "dtype": dtype, "batch": batch, "mode": mode, "impl": impl}


def build_plan(device: str, quick: bool, budget_s: float | None = None) -> Plan:
    """The benchmark matrix for ``device`` ("cuda" or "cpu"), most important rows first."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cpu":
        label, backbone = "Conformer-Ti (3 blocks, dim 96)", "Conformer-Ti backbone (3 blocks, dim 96, 64x96)"
        tiny = dict(depth=3, embed_dim=96, num_heads=2)
        models = {label: ("conformer_tiny_patch16", tiny),
                  backbone: ("conformer_tiny_patch16", dict(tiny, features_only=True))}
        images = {backbone: (64, 96)}
        if quick:
            combos = [("fp32", "inference"), ("bf16", "inference"), ("fp32", "train")]
            rows = [_row(label, dtype, 2, mode, impl) for dtype, mode in combos for impl in EAGER_IMPLS]
            rows[2:2] = [_row(backbone, "fp32", 2, "inference", impl) for impl in EAGER_IMPLS]  # while budget lasts
        else:
            rows = [_row(label, dtype, batch, mode, impl) for batch in (2, 1) for mode in ("inference", "train")
                    for dtype in DTYPES for impl in EAGER_IMPLS]
            rows += [_row(label, "fp32", 2, "inference", impl) for impl in ("compile(reference)", "compile(fast)")]
        return Plan(device, quick, budget_s or (40.0 if quick else 300.0), 64, models, images, rows, kernel_batch=2,
                    min_time_s=0.05, min_iters=2, pytest_args=None if quick else ["-k", "compile and add_layer_norm"],
                    pytest_budget_s=120.0, compile_timeout_s=120.0, sanitizer=False)
    backbone = "Conformer-S/32 backbone (800x1344)"  # the official detection configs' backbone and input
    models = {"Conformer-Ti": ("conformer_tiny_patch16", {}), "Conformer-S": ("conformer_small_patch16", {}),
              "Conformer-B": ("conformer_base_patch16", {}),
              backbone: ("conformer_small_patch32", dict(features_only=True))}
    S = "Conformer-S"
    # the goal rows first: eager, then compiled (max-autotune only here); then the detection backbone
    rows = [_row(S, "bf16", batch, mode, impl) for batch in GOAL_BATCHES for mode in ("inference", "train")
            for impl in EAGER_IMPLS]
    rows += [_row(S, "bf16", 64, "inference", impl)
             for impl in ("compile(reference)", "compile(fast)", "compile(reference, max-autotune)")]
    rows += [_row(S, "bf16", 64, "train", "compile(reference)"), _row(S, "bf16", 128, "inference",
                                                                       "compile(reference)")]
    rows += [_row(backbone, "bf16", 2, "inference", impl) for impl in EAGER_IMPLS]
    # breadth, eager: every model and mode; every dtype at batch 64, bf16 at batch 256 and 1
    for batch, dtypes in ((64, list(DTYPES)), (256, ["bf16"]), (1, ["bf16"])):
        rows += [_row(model, dtype, batch, mode, impl) for model in models for dtype in dtypes
                 for mode in ("inference", "train") for impl in EAGER_IMPLS]
    # then compiled models beyond the goals, while the budget lasts
    rows += [_row(S, "bf16", 64, "train", "compile(fast)")]
    for model in ("Conformer-Ti", "Conformer-B"):
        rows += [_row(model, "bf16", 64, "inference", impl) for impl in ("compile(reference)", "compile(fast)")]
    rows += [_row(S, dtype, 64, "inference", impl) for dtype in ("fp16", "fp32")
             for impl in ("compile(reference)", "compile(fast)")]
    rows += [_row(S, "bf16", 256, "inference", impl) for impl in ("compile(reference)", "compile(fast)")]
    unique = list({tuple(r.values()): r for r in rows}.values())  # first occurrence wins (dicts keep order)
    return Plan(device, quick, budget_s or (180.0 if quick else 540.0), 224, models, {backbone: (800, 1344)}, unique,
                kernel_batch=256, min_time_s=0.3, min_iters=3, pytest_args=None if quick else [], pytest_budget_s=180.0,
                compile_timeout_s=150.0, sanitizer=not quick)


class Budget:
    """Seconds left of the run's time budget."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


# ------------------------------------------------------------------------------------------ environment


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"nvidia_smi": "not found"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia_smi": f"failed: {exc}"}
    fields = [f.strip() for f in out.stdout.strip().splitlines()[0].split(",")] if out.stdout.strip() else []
    keys = ("name", "driver_version", "memory_total", "max_sm_clock", "power_limit")
    return {"nvidia_smi": dict(zip(keys, fields)) if fields else f"failed: {out.stderr.strip()[:200]}"}


def environment(device: str) -> dict:
    """Versions and hardware of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env: dict[str, Any] = {
        "device": device, "device_name": device_name(device), "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton_version, "fastconformer": fastconformer.__version__,
        "cuda": torch.version.cuda, "cudnn": cudnn, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "allow_tf32_matmul": tf32_matmul_enabled(), "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 2))
        env.update(_nvidia_smi())  # the driver version comes from nvidia-smi
        smi = env["nvidia_smi"]
        env["driver_version"] = smi.get("driver_version") if isinstance(smi, dict) else f"unknown ({smi})"
    return env


# ------------------------------------------------------------------------------------------ subprocesses


_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")


def parse_pytest_counts(output: str) -> dict[str, int]:
    """{outcome: count} from pytest's output: its final summary line, or (a run cut short) the
    progress characters of ``-q`` (. passed, F failed, E error, s skipped, x xfailed, X xpassed)."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and _COUNT.search(line):
            counts = {}
            for n, what in _COUNT.findall(line):
                what = {"error": "errors", "warning": "warnings"}.get(what, what)
                counts[what] = int(n)
            return counts
    names = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}
    counts = {}
    for line in output.splitlines():
        m = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())
        if m:
            for ch in m.group(1):
                counts[names[ch]] = counts.get(names[ch], 0) + 1
    return counts


def _child_env(device: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress survives a kill at the timeout
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
    return env


def _run(cmd: list[str], device: str, timeout: float) -> dict:
    """Run ``cmd`` in the repository root; its exit code, duration and output tail."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_child_env(device), capture_output=True, text=True,
                              timeout=max(timeout, 1.0), check=False)
        output, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else (p or "") for p in (exc.stdout, exc.stderr)]
        output, rc, timed_out = "".join(parts), None, True
    return {"command": " ".join(cmd), "returncode": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - start, 2), "output_tail": output[-3000:], "_output": output}


def run_pytest(plan: Plan, budget: Budget) -> dict:
    """The test suite on this device (``gpu`` tests run where CUDA is present), within its budget."""
    tests = REPO / "tests"
    if plan.pytest_args is None:
        return {"status": "skipped (--quick)"}
    if not tests.is_dir():
        return {"status": f"skipped: {tests} not found (run from a source checkout)"}
    timeout = min(plan.pytest_budget_s, budget.left() * 0.4)
    cmd = [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider", *plan.pytest_args]
    log(f"pytest: {' '.join(cmd[3:])} (timeout {timeout:.0f}s)")
    result = _run(cmd, plan.device, timeout)
    output = result.pop("_output")
    counts = parse_pytest_counts(output)
    status = ("timed out" if result["timed_out"] else
              "passed" if result["returncode"] == 0 else f"failed (exit code {result['returncode']})")
    log(f"pytest {status}: {counts}")
    return {"status": status, "counts": counts, **result}


def run_sanitizer(plan: Plan, budget: Budget) -> dict:
    """``compute-sanitizer --tool memcheck`` over the Triton backend's kernel tests."""
    if plan.device != "cuda":
        return {"status": "skipped: needs CUDA"}
    default = pathlib.Path("/usr/local/cuda/bin/compute-sanitizer")
    exe = shutil.which("compute-sanitizer") or (str(default) if default.exists() else None)
    if exe is None:
        return {"status": "not found"}
    if not plan.sanitizer:
        return {"status": "skipped (--quick)", "binary": exe}
    timeout = min(120.0, budget.left() - 5)
    if timeout < 30:
        return {"status": "skipped: time budget", "binary": exe}
    kernel_tests = [str(REPO / "tests" / f"test_{name}.py") for name in ("fcu_down", "fcu_up", "attention",
                                                                         "add_layer_norm")]
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, "-m", "pytest", *kernel_tests, "-q",
           "-x", "-p", "no:cacheprovider", "-k", "triton and not grad and not compile"]
    log(f"compute-sanitizer memcheck (timeout {timeout:.0f}s)")
    result = _run(cmd, "cuda", timeout)
    output = result.pop("_output")
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    status = ("timed out" if result["timed_out"] else "memcheck errors" if result["returncode"] == 99 else
              "clean" if result["returncode"] == 0 else f"tests failed (exit code {result['returncode']})")
    return {"status": status, "binary": exe, "memcheck_errors": int(errors[-1]) if errors else None,
            "pytest_counts": parse_pytest_counts(output), **result}


# ---------------------------------------------------------------------------------------------- timing


def _median_seconds(candidates: dict[str, Callable[[], Any]], device: str, rounds: int,
                    flush: Callable[[], Any] | None = None) -> dict[str, float]:
    """Median seconds per call of each candidate, timed against each other in interleaved rounds
    after each settled its warm-up (:func:`fastconformer.timing.time_interleaved`)."""
    timings, _ = time_interleaved(candidates, rounds, 0.0, device=device, flush=flush)
    return {label: t.median for label, t in timings.items()}


# -------------------------------------------------------------------------------------------- roofline


def roofline(device: str) -> dict:
    """Copy bandwidth (GB/s: bytes read + written) and matmul TFLOP/s of this device, measured now."""
    dev = torch.device(device)
    nbytes = 2**30 if device == "cuda" else 2**26
    pair = torch.empty(2, nbytes // 4, dtype=torch.float32, device=dev).normal_()  # source, destination
    seconds = _median_seconds({"copy": lambda: pair[1].copy_(pair[0])}, device, KERNEL_ROUNDS[device])["copy"]
    result: dict[str, Any] = {"copy": {"bytes": 2 * nbytes, "seconds": seconds, "GB_per_s": 2 * nbytes / seconds / 1e9}}
    pair = None  # free it before the matmuls
    n = 8192 if device == "cuda" else 512
    matmul = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                              ("fp32_tf32", torch.float32, True), ("fp32_ieee", torch.float32, False)):
        if device == "cpu" and dtype == torch.float16:
            continue
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        with testing.tf32(tf32):  # either of torch's TF32 APIs, the user's setting restored
            s = _median_seconds({"mm": lambda a=a, b=b: torch.mm(a, b)}, device, MATMUL_ROUNDS[device])["mm"]
        matmul[name] = {"n": n, "seconds": s, "TFLOP_per_s": 2 * n**3 / s / 1e12}
    result["matmul"] = matmul
    log(f"roofline: copy {result['copy']['GB_per_s']:.0f} GB/s, " +
        ", ".join(f"{k} {v['TFLOP_per_s']:.1f} TFLOP/s" for k, v in matmul.items()))
    return result


# --------------------------------------------------------------------------------------------- kernels


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def predicted_seconds(op: Callable, *args, build: bool = False, **kwargs) -> float:
    """The performance model's H100 time for the Triton launches the fused ``op`` (a ``@fused_op``
    function) makes for these arguments' shapes and dtypes, run on meta tensors; with ``build``,
    occupancy from the sm_90 builds (else estimated)."""
    module, _, name = op.triton_impl.partition(":")
    triton_impl = getattr(importlib.import_module(f"fastconformer.kernels.{module}"), name)
    return sum(p.seconds for p in perf_model.predict_call(triton_impl, *args, build=build, **kwargs))


def _kernel_row(op: str, shape: str, fused: Callable, baselines: dict[str, Callable], bytes_moved: int, flops: int,
                device: str, flush: Callable[[], Any] | None, copy_gbs: float, predicted: Callable[[], float],
                **extra) -> dict:
    """One op's row: ``fused`` timed against its ``baselines`` ({name: callable}) in one interleaved
    run, ``flush`` before every call; the fused op's median seconds, GB/s, TFLOP/s and fraction of
    the copy bandwidth, each baseline's median in ``baseline_seconds`` (and ``speedup_vs_torch``
    against the one named ``torch``), and ``predicted()``, the performance model's time, with
    ``measured_over_predicted``. A failure is recorded as the row's status."""
    row: dict[str, Any] = dict(op=op, shape=shape, bytes_moved=bytes_moved, flops=flops, **extra)
    try:
        row["predicted_seconds"] = predicted()
    except Exception as exc:  # recorded, the measurement goes on
        row["predicted_seconds"] = None
        row["prediction_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        medians = _median_seconds({"fused": fused, **baselines}, device, KERNEL_ROUNDS[device], flush)
        s = medians.pop("fused")
        row.update(seconds=s, GB_per_s=bytes_moved / s / 1e9, TFLOP_per_s=flops / s / 1e12,
                   fraction_of_copy_bw=bytes_moved / s / 1e9 / copy_gbs, baseline_seconds=medians)
        if "torch" in medians:
            row["speedup_vs_torch"] = medians["torch"] / s
        if row["predicted_seconds"]:
            row["measured_over_predicted"] = s / row["predicted_seconds"]
        row["status"] = "ok"
    except Exception as exc:  # recorded per row, the run goes on
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        _free(device)
    return row


def kernel_benchmarks(plan: Plan, copy_gbs: float) -> list[dict]:
    """Squeeze, expand and attention ops at Conformer-S shapes (batch ``plan.kernel_batch``, bf16 on
    CUDA, fp32 on the CPU) through the dispatcher (Triton on CUDA), vs their PyTorch implementations."""
    device = plan.device
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, D = plan.kernel_batch, S_EMBED
    gen = torch.Generator().manual_seed(0)
    # zeroed before every timed call on CUDA: a cold L2 cache (256 MiB, larger than any GPU's L2)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev).zero_ if device == "cuda" else None

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dev, dt)

    def model(op, *args, **kwargs):  # the performance model's time for op's launches at these shapes
        return lambda: predicted_seconds(op, *args, build=device == "cuda", **kwargs)

    rows = []
    with torch.no_grad(), fastconformer.backend("auto"):
        for C, dw, side in S_STAGES:
            grid = side // dw
            N = grid * grid
            x2 = rand(B, C, side, side).contiguous(memory_format=torch.channels_last)
            x_t = rand(B, 1 + N, D)
            w, bias, lw, lb = rand(D, C), rand(D), rand(D), rand(D)
            args = (x2, x_t, w, bias, lw, lb, dw, 1e-6)
            out_bytes = B * (1 + N) * D * x_t.element_size()
            rows.append(_kernel_row("squeeze fcu_down(+x_t)", f"B={B} C={C} {side}x{side} s={dw} D={D}",
                                    lambda a=args: fcu_down(*a, add_x_t=True),
                                    {"torch": lambda a=args: fcu_down.torch_impl(*a, add_x_t=True)},
                                    _nbytes(x2, x_t, w, bias, lw, lb) + out_bytes, 2 * B * N * C * D, device, flush,
                                    copy_gbs, model(fcu_down, *args, add_x_t=True), dtype=str(dtype)))
            log(f"kernel {rows[-1]['op']} {rows[-1]['shape']}: {rows[-1].get('GB_per_s', 0):.0f} GB/s")
        for C, up, side in S_STAGES:
            grid = side // up
            x_t = rand(B, 1 + grid * grid, D)
            w, scale, shift = rand(C, D), rand(C, dt=torch.float32), rand(C, dt=torch.float32)
            args = (x_t, w, scale, shift, grid, grid, True)
            rows.append(_kernel_row("expand fcu_up_expand", f"B={B} D={D} C={C} {grid}x{grid}",
                                    lambda a=args: fcu_up_expand(*a),
                                    {"torch": lambda a=args: fcu_up_expand.torch_impl(*a)},
                                    _nbytes(x_t, w, scale, shift) + B * C * grid * grid * x_t.element_size(),
                                    2 * B * grid * grid * C * D, device, flush, copy_gbs, model(fcu_up_expand, *args),
                                    dtype=str(dtype)))
            log(f"kernel {rows[-1]['op']} {rows[-1]['shape']}: {rows[-1].get('GB_per_s', 0):.0f} GB/s")
            x = rand(B, C, side, side).contiguous(memory_format=torch.channels_last)
            low = rand(B, C, grid, grid).contiguous(memory_format=torch.channels_last)
            args = (x, scale, shift, low, up)
            rows.append(_kernel_row("expand bn_relu_add_upsampled", f"B={B} C={C} {side}x{side} up={up}",
                                    lambda a=args: bn_relu_add_upsampled(*a),
                                    {"torch": lambda a=args: bn_relu_add_upsampled.torch_impl(*a)},
                                    _nbytes(x, scale, shift, low) + _nbytes(x), 0, device, flush, copy_gbs,
                                    model(bn_relu_add_upsampled, *args), dtype=str(dtype)))
            log(f"kernel {rows[-1]['op']} {rows[-1]['shape']}: {rows[-1].get('GB_per_s', 0):.0f} GB/s")
        Dh = D // S_HEADS
        qkv = rand(B, S_TOKENS, 3 * D)
        scale = Dh ** -0.5
        q, k, v = qkv.unflatten(-1, (3, S_HEADS, Dh)).permute(2, 0, 3, 1, 4).unbind(0)
        flops = 4 * B * S_HEADS * S_TOKENS * S_TOKENS * Dh
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa, unavailable = {}, {}
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue

            def run_sdpa(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)

            try:
                run_sdpa()  # a backend that cannot take these inputs raises on its first call
                sdpa[name] = run_sdpa
            except Exception as exc:
                unavailable[name] = (f"unavailable: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:160] if str(exc) else ''}")
        row = _kernel_row("attention", f"B={B} N={S_TOKENS} D={D} heads={S_HEADS}",
                          lambda: attention(qkv, S_HEADS, scale), sdpa,
                          _nbytes(qkv) + B * S_TOKENS * D * qkv.element_size(), flops, device, flush, copy_gbs,
                          model(attention, qkv, S_HEADS, scale), dtype=str(dtype))
        timed = row.pop("baseline_seconds", {})
        row["sdpa_seconds"] = {**timed, **unavailable}
        if timed:
            best = min(timed, key=timed.get)
            row.update(sdpa_best_seconds=timed[best], speedup_vs_sdpa_best=timed[best] / row["seconds"],
                       sdpa_best_backend=best)
        rows.append(row)
        log(f"kernel attention: {row.get('TFLOP_per_s', 0):.1f} TFLOP/s, SDPA: {row['sdpa_seconds']}")
    return rows


# ---------------------------------------------------------------------------------------------- models


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _build(plan_models: dict, label: str, fast: bool, device: str) -> torch.nn.Module:
    name, overrides = plan_models[label]
    torch.manual_seed(0)
    model = fastconformer.create_model(name, **overrides)
    if fast:
        fastconformer.convert(model)
    return model.to(device)


def _step_fn(model: torch.nn.Module, row: dict, device: str, image: tuple[int, int]) -> Callable[[], Any]:
    """One inference call or one training step of ``model`` on a fixed random batch of (H, W) ``image``s."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(row["batch"], 3, *image, generator=gen).to(device)
    dtype = DTYPES[row["dtype"]]
    amp = (torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    if row["mode"] == "inference":
        model.eval()

        def infer():
            with torch.inference_mode(), amp:
                return model(x)

        return infer
    model.train()
    y = torch.randint(0, 1000, (row["batch"],), generator=gen).to(device) % model.num_classes
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with amp:
            conv_logits, trans_logits = model(x)
            loss = F.cross_entropy(conv_logits.float(), y) + F.cross_entropy(trans_logits.float(), y)
        loss.backward()
        opt.step()
        return loss

    return train_step


def bench_model_row(row: dict, model: torch.nn.Module, plan: Plan) -> dict:
    """images/s of one (model, dtype, batch, mode, impl) row, from the median call once the warm-up
    settled, and the first call's seconds; ``model`` is already compiled if the impl says so (its
    first call then includes the compile time)."""
    device = plan.device
    image = plan.model_images.get(row["model"], (plan.image_size, plan.image_size))
    timings, _ = time_interleaved({"model": _step_fn(model, row, device, image)}, plan.min_iters,
                                  plan.min_time_s, device=device)
    timing = timings["model"]
    result = {"image": list(image), "first_call_s": timing.warmup[0], "seconds_per_call": timing.median,
              "spread": timing.spread,
              "warmup_calls": len(timing.warmup), "iters": len(timing.rounds),
              "images_per_s": row["batch"] / timing.median, "status": "ok"}
    if device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _compiled_row_worker(row: dict, plan: Plan, out) -> None:
    """Child-process body of a compiled row: build, compile, time; puts the result dict on ``out``."""
    try:
        if plan.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = _build(plan.models, row["model"], row["impl"].endswith("(fast)"), plan.device)
        mode = "max-autotune" if "max-autotune" in row["impl"] else None
        compiled = torch.compile(model, mode=mode, dynamic=False)
        out.put(bench_model_row(row, compiled, plan))
    except Exception as exc:
        out.put({"status": _error_status(exc)})


def _error_status(exc: BaseException) -> str:
    kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"error: {kind}: {message}"


def _run_compiled(row: dict, plan: Plan, timeout: float) -> dict:
    """A compiled row in a fresh process (a compile that overruns is killed, a crash stays contained)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    target = importlib.import_module("benchmarks.gpu_report")._compiled_row_worker
    proc = ctx.Process(target=target, args=(row, plan, out))
    proc.start()
    deadline, result = time.perf_counter() + timeout, None
    while result is None:
        alive = proc.is_alive()
        try:
            result = out.get(timeout=1.0)
        except queue.Empty:
            if not alive:  # died without a result (a crash): its last put would have arrived by now
                result = {"status": f"error: the child process exited with code {proc.exitcode}"}
            elif time.perf_counter() > deadline:
                proc.kill()
                result = {"status": f"timeout: not done within {timeout:.0f}s (killed)"}
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return result


def model_benchmarks(plan: Plan, budget: Budget, reserve_s: float = 0.0) -> list[dict]:
    """Every row of the plan, in order, until the budget less ``reserve_s`` runs low (the rest
    recorded as skipped)."""
    device = plan.device
    budget = Budget(budget.left() - reserve_s)
    cache: dict[tuple[str, bool], torch.nn.Module] = {}  # (label, fast) -> model; all fit on one GPU
    results = []
    for row in plan.rows:
        compiled = row["impl"].startswith("compile")
        need = (90.0 if "max-autotune" in row["impl"] else 45.0) if compiled else 3.0
        need = need if device == "cuda" else (20.0 if compiled else 1.0)
        result = dict(row)
        if compiled and plan.quick:
            result["status"] = "skipped (--quick)"
        elif budget.left() < need:
            result["status"] = f"skipped: time budget ({budget.left():.0f}s left, needs ~{need:.0f}s)"
        elif compiled:
            timeout = min(plan.compile_timeout_s, budget.left() - 2)
            log(f"model {row} (child process, timeout {timeout:.0f}s)")
            result.update(_run_compiled(row, plan, timeout))
        else:
            key = (row["model"], row["impl"] == "fast")
            try:
                if key not in cache:
                    cache[key] = _build(plan.models, row["model"], key[1], device)
                model = cache[key]
                if row["mode"] == "train":  # the optimizer changes the weights: train a copy
                    model = copy.deepcopy(model)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                result.update(bench_model_row(row, model, plan))
            except Exception as exc:  # OOM and any other failure: recorded, the run goes on
                result["status"] = _error_status(exc)
            finally:
                model = None
                _free(device)
        if result["status"] == "ok":
            log(f"model {row['model']} {row['dtype']} B={row['batch']} {row['mode']} {row['impl']}: "
                f"{result['images_per_s']:.1f} img/s (first call {result['first_call_s']:.1f}s)")
        elif not result["status"].startswith("skipped"):
            log(f"model {row}: {result['status']}")
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------- goals


def _images_per_s(models: list[dict], batch: int, mode: str, impl: str) -> float | None:
    for r in models:
        if (r["model"], r["dtype"], r["batch"], r["mode"], r["impl"], r["status"]) == (
                GOAL_MODEL, GOAL_DTYPE, batch, mode, impl, "ok"):
            return r["images_per_s"]
    return None


def _goal(goal: str, value: float | None, target: float, unit: str, device: str, detail: str = "") -> dict:
    if device != "cuda":
        status = "n/a on CPU"
    elif value is None:
        status = "not measured"
    else:
        status = "met" if value >= target else "not met"
    return {"goal": goal, "target": target, "value": value, "unit": unit, "status": status, "detail": detail}


def evaluate_goals(report: dict) -> list[dict]:
    """The H100 goals (Conformer-S, AMP bf16, batch 64 and 128), each with its measured value and
    met / not met ("n/a on CPU" for a CPU run, "not measured" where the rows are missing)."""
    device = report["environment"]["device"]
    models, kernels = report["models"], report["kernels"]
    goals = []
    for batch in GOAL_BATCHES:
        ref, fast = (_images_per_s(models, batch, "inference", i) for i in ("reference", "fast"))
        compiled = {i: _images_per_s(models, batch, "inference", i)
                    for i in ("compile(reference)", "compile(reference, max-autotune)")}
        compiled = {i: v for i, v in compiled.items() if v is not None}
        best_impl = max(compiled, key=compiled.get) if compiled else None
        goals.append(_goal(f"inference B={batch}: fast / reference eager", fast / ref if fast and ref else None,
                           2.0, "x", device))
        goals.append(_goal(f"inference B={batch}: fast / torch.compile(reference)",
                           fast / compiled[best_impl] if fast and best_impl else None, 1.2, "x", device,
                           f"best compiled: {best_impl}" if best_impl else ""))
        tref, tfast = (_images_per_s(models, batch, "train", i) for i in ("reference", "fast"))
        goals.append(_goal(f"training step B={batch}: fast / reference eager",
                           tfast / tref if tfast and tref else None, 1.5, "x", device))
    for op, label in (("squeeze fcu_down(+x_t)", "squeeze kernel"), ("expand fcu_up_expand", "expand GEMM kernel"),
                      ("expand bn_relu_add_upsampled", "expand upsample-add kernel")):
        fractions = [k["fraction_of_copy_bw"] for k in kernels if k["op"] == op and k["status"] == "ok"]
        goals.append(_goal(f"{label}: achieved / copy bandwidth (worst stage)",
                           min(fractions) if fractions else None, 0.7, "fraction", device))
    attn = next((k for k in kernels if k["op"] == "attention" and k["status"] == "ok"), None)
    goals.append(_goal("attention: SDPA best backend time / fused time",
                       attn.get("speedup_vs_sdpa_best") if attn else None, 1.0, "x", device,
                       f"best SDPA backend: {attn.get('sdpa_best_backend')}" if attn else ""))
    return goals


# -------------------------------------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_summary(report: dict) -> str:
    """The report as Markdown tables."""
    env, roof = report["environment"], report["roofline"]
    lines = [f"# fastconformer on {env['device_name']}", "",
             (f"{env['date_utc']} UTC · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
              f"driver {env.get('driver_version', 'n/a')} · Python {env['python']} · CPU {env['cpu']} "
              f"({env['cpu_count']} cores) · budget {report['budget_s']:.0f}s, took {report['elapsed_s']:.0f}s"), "",
             "## Goals (set for H100: Conformer-S, AMP bf16)", "", "| goal | target | measured | status |",
             "|---|---:|---:|---|"]
    for g in report["goals"]:
        target = f"≥ {g['target']:g}{'×' if g['unit'] == 'x' else ''}"
        detail = f" ({g['detail']})" if g["detail"] else ""
        lines.append(f"| {g['goal']}{detail} | {target} | {_fmt(g['value'])} | {g['status']} |")
    pt = report["pytest"]
    counts = ", ".join(f"{n} {k}" for k, n in pt.get("counts", {}).items())
    lines += ["", "## Tests", "", f"pytest: **{pt['status']}**" + (f" — {counts}" if counts else "") +
              (f" in {pt['seconds']:.0f}s" if "seconds" in pt else ""),
              f"compute-sanitizer memcheck: **{report['sanitizer']['status']}**"
              + (f" ({report['sanitizer']['memcheck_errors']} errors)"
                 if report["sanitizer"].get("memcheck_errors") is not None else "")]
    lines += ["", "## Roofline (measured in this run)", "", "| measure | value |", "|---|---:|",
              f"| copy bandwidth (read + write) | {roof['copy']['GB_per_s']:.0f} GB/s |"]
    lines += [f"| matmul {name} ({m['n']}³) | {m['TFLOP_per_s']:.1f} TFLOP/s |" for name, m in roof["matmul"].items()]
    lines += ["", "## Kernels at Conformer-S shapes", "",
              "| op | shape | time (µs) | predicted (µs, H100 model) | measured / predicted | GB/s | % of copy BW | "
              "TFLOP/s | vs PyTorch | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in report["kernels"]:
        ok = k["status"] == "ok"
        vs = k.get("speedup_vs_torch", k.get("speedup_vs_sdpa_best"))
        predicted = k.get("predicted_seconds")
        lines.append(f"| {k['op']} | {k['shape']} | {_fmt(k['seconds'] * 1e6, 1) if ok else '—'} | "
                     f"{_fmt(predicted * 1e6 if predicted else None, 1)} | {_fmt(k.get('measured_over_predicted'))} | "
                     f"{_fmt(k.get('GB_per_s'), 0)} | {_fmt(k['fraction_of_copy_bw'] * 100, 0) if ok else '—'} | "
                     f"{_fmt(k.get('TFLOP_per_s'), 1) if k['flops'] else '—'} | "
                     f"{_fmt(vs) + '×' if vs is not None else '—'} | {k['status']} |")
    attn = next((k for k in report["kernels"] if k["op"] == "attention"), None)
    if attn is not None:
        lines += ["", "SDPA on the same q, k, v views: " + ", ".join(
            f"{name} {s * 1e6:.1f} µs" if isinstance(s, float) else f"{name} {s}"
            for name, s in attn["sdpa_seconds"].items())]
    lines += ["", "## Models (images/s; first call includes compilation)", "",
              "| model | dtype | batch | mode | impl | images/s | vs reference | first call (s) | status |",
              "|---|---|---:|---|---|---:|---:|---:|---|"]
    ref = {(r["model"], r["dtype"], r["batch"], r["mode"]): r["images_per_s"] for r in report["models"]
           if r["impl"] == "reference" and r["status"] == "ok"}
    for r in report["models"]:
        ok = r["status"] == "ok"
        base = ref.get((r["model"], r["dtype"], r["batch"], r["mode"]))
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['mode']} | {r['impl']} | "
                     f"{_fmt(r.get('images_per_s'), 1)} | "
                     f"{_fmt(r['images_per_s'] / base) + '×' if ok and base else '—'} | "
                     f"{_fmt(r.get('first_call_s'), 1)} | {r['status']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, private keys dropped."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run_report(plan: Plan, out_dir: pathlib.Path) -> dict:
    """Run the whole flow; write ``report.json`` and ``summary.md`` into ``out_dir``; return the report."""
    budget = Budget(plan.budget_s)
    started = time.perf_counter()
    log(f"device {plan.device} ({device_name(plan.device)}), budget {plan.budget_s:.0f}s, quick={plan.quick}")
    report: dict[str, Any] = {"environment": environment(plan.device), "budget_s": plan.budget_s,
                              "quick": plan.quick, "image_size": plan.image_size}
    report["pytest"] = run_pytest(plan, budget)
    report["roofline"] = roofline(plan.device)
    report["kernels"] = kernel_benchmarks(plan, report["roofline"]["copy"]["GB_per_s"])
    report["models"] = model_benchmarks(plan, budget, reserve_s=60.0 if plan.sanitizer else 0.0)
    report["sanitizer"] = run_sanitizer(plan, budget)
    report["goals"] = evaluate_goals(report)
    report["elapsed_s"] = time.perf_counter() - started
    report = _finite(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown_summary(report))
    log(f"wrote {out_dir / 'report.json'} and {out_dir / 'summary.md'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when a GPU is present) or cpu (small sizes)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default benchmarks/results/<device-slug>/)")
    parser.add_argument("--quick", action="store_true", help="skip pytest, compiled models and the sanitizer")
    parser.add_argument("--budget", type=float, default=None,
                        help="time budget in seconds (default 540 on CUDA, 300 on the CPU; 180 and 40 with --quick)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    plan = build_plan(device, args.quick, args.budget)
    out = args.out or REPO / "benchmarks" / "results" / device_slug(device)
    run_report(plan, out)
    print((out / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
