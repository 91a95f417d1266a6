"""Names of what a result was measured on: the machine, and the precision asked for (CLI, GPU
report and benchmark files share them)."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import platform
import re

import torch

__all__ = ["DTYPES", "TIMING_PREFIXES", "TIMING_VARIABLES", "cpu_model", "device_name", "device_slug",
           "timing_environment"]

# The precisions that ``fastconformer bench --dtype`` and the GPU report's rows name (fp16 and bf16
# run under torch.autocast).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Environment variables that change CPU timings: the allocator (glibc's tunables, a preloaded
# jemalloc or tcmalloc), fastconformer's own switches; and every variable of the OpenMP runtimes,
# MKL and oneDNN (threads, affinity, dispatch).
TIMING_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "FASTCONFORMER_BACKEND", "FASTCONFORMER_ONEDNN")
TIMING_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "ONEDNN_", "DNNL_")


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what platform reports."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's with the thread count torch uses."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: str | torch.device) -> str:
    """A file-name-safe :func:`device_name`, e.g. ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def timing_environment() -> dict[str, str]:
    """{name: value} of the :data:`TIMING_VARIABLES` and the variables starting with one of
    :data:`TIMING_PREFIXES` set in this process's environment, sorted by name."""
    return {name: value for name, value in sorted(os.environ.items())
            if name in TIMING_VARIABLES or name.startswith(TIMING_PREFIXES)}
