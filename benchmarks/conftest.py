"""Shared pieces of the pytest-benchmark suite.

Run: ``pytest benchmarks --benchmark-enable -n0 [--benchmark-json=benchmarks/results/<device>.json]``
(``-n0``: one process; pyproject's addopts run tests in one pytest-xdist worker per CPU, and
timings taken side by side with other workers would measure the contention).
Each benchmark belongs to a group (one op at one shape) and has an ``impl`` (``reference``,
``fused``, ...); the summary at the end prints every impl's speed relative to the group's
``reference``, measured side by side in the same run. pytest-benchmark times these (its timer and
statistics make the saved JSON); :func:`run_benchmark` only adds the device wait of
:mod:`fastconformer.timing`, whose ``time_interleaved`` times ``fastconformer bench`` and the GPU
report (``python -m benchmarks.gpu_report``).
"""

from __future__ import annotations

import pytest
import torch

from fastconformer import environment
from fastconformer.timing import synchronize

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_configure(config):
    if config.getoption("benchmark_enable", False) and config.getoption("numprocesses", None):
        raise pytest.UsageError("the benchmarks time one process at a time: add -n0 (the tests' default, "
                                "pyproject's addopts, runs one pytest-xdist worker per CPU)")


def device_name() -> str:
    """The benchmark device's name (GPU name, or CPU model and threads)."""
    return environment.device_name(DEVICE)


@pytest.fixture(scope="session")
def device():
    """The benchmark device: CUDA when present, else the CPU (usable by module-scoped fixtures)."""
    return DEVICE


def run_benchmark(benchmark, fn, *, group: str, impl: str, rounds: int | None = None, **info):
    """Time ``fn()`` (CUDA-synchronised on GPUs) under ``group``/``impl``; ``info`` (bytes moved,
    flops, shapes) lands in the JSON's extra_info. Returns fn's last result."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=device_name(), torch=torch.__version__, **info)

    def timed():
        out = fn()
        synchronize(DEVICE)
        return out

    if rounds is None:
        return benchmark(timed)
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        if bench.stats is None:
            continue
        groups.setdefault(bench.group, {})[bench.extra_info.get("impl", bench.name)] = bench.stats.median
    terminalreporter.section(f"speed relative to the reference, same run, on {device_name()}")
    for group, medians in groups.items():
        ref = medians.get("reference")
        for impl, median in medians.items():
            ratio = f"{ref / median:6.2f}x" if ref else "   n/a"
            terminalreporter.write_line(f"{group:<48} {impl:<22} median {median * 1e3:9.3f} ms   {ratio}")
