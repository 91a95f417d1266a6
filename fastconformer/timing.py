"""Timing things against each other on one device: the one timer of the CLI's ``bench`` and of the
GPU report, and the device wait every timer needs.

Which timer serves what:

- :func:`time_interleaved` times zero-argument callables against each other, call by call: the
  CLI's ``bench`` (reference vs fast vs ``torch.compile(reference)``) and the GPU report
  (``benchmarks/gpu_report.py``: the roofline; each kernel together with its PyTorch baseline, or
  with the SDPA backends, in one call; each model row, whose first warm-up call is its first-call
  time, compilation included). On CUDA each call is timed by a pair of CUDA events around it; on
  the CPU by ``time.perf_counter`` around the call and :func:`synchronize`.
- The benchmark suite (``pytest benchmarks --benchmark-enable -n0``) keeps pytest-benchmark's timer and
  statistics, which its JSON results and comparisons across runs are made of; its adapter
  ``benchmarks.conftest.run_benchmark`` waits for the device with :func:`synchronize` from here.

``triton.testing.do_bench`` times one function alone; here each candidate's calls alternate with
the others', so that all of them see the machine's drifts alike and the ratio of their medians
holds.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["MAX_WARMUP", "SETTLE_TOLERANCE", "SETTLE_WINDOW", "Timing", "per_round_speedup", "synchronize",
           "time_interleaved"]

# Warm-up ends when the last SETTLE_WINDOW calls agree within SETTLE_TOLERANCE of their median, or
# after MAX_WARMUP calls.
SETTLE_WINDOW = 3
SETTLE_TOLERANCE = 0.05
MAX_WARMUP = 10


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where calls are synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One candidate's times in seconds: its warm-up calls (the first one includes any compilation
    or lazy set-up), then one call per interleaved round."""

    warmup: tuple[float, ...]
    rounds: tuple[float, ...]

    @property
    def settled(self) -> bool:
        """Whether the warm-up ended with its last SETTLE_WINDOW calls within SETTLE_TOLERANCE."""
        return _settled(self.warmup)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> float:
        """Interquartile range of the rounds over their median (0 for a single round)."""
        if len(self.rounds) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.rounds, n=4, method="inclusive")
        return (q3 - q1) / self.median


def _settled(times) -> bool:
    last = times[-SETTLE_WINDOW:]
    return len(last) == SETTLE_WINDOW and max(last) - min(last) <= SETTLE_TOLERANCE * statistics.median(last)


def _time_call(fn: Callable[[], object], device: torch.device, flush: Callable[[], object] | None
               ) -> tuple[float, object]:
    """(seconds, result) of one call of ``fn``; ``flush`` runs first, outside the timed region."""
    if flush is not None:
        flush()
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        result = fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_interleaved(candidates: dict[str, Callable[[], object]], min_rounds: int, min_seconds: float, *,
                     device: str | torch.device = "cpu", flush: Callable[[], object] | None = None,
                     progress: Callable[[str], None] = lambda msg: None
                     ) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time zero-argument callables against each other: ({label: Timing}, {label: last result}).

    Each candidate first warms up alone until its times settle (:data:`SETTLE_WINDOW` calls within
    :data:`SETTLE_TOLERANCE` of their median, at most :data:`MAX_WARMUP` calls). Then rounds call
    every candidate once, in the given order, until ``min_rounds`` rounds are done and each
    candidate has run for ``min_seconds`` in all: interleaving exposes all of them alike to the
    machine's drifts (other load, clock changes), so ratios of their medians hold where sequential
    blocks would not.

    Every call is timed alone, on the work queued on ``device``'s current stream: on CUDA by CUDA
    events recorded before and after it (waited for before the next call), elsewhere by
    ``time.perf_counter`` before the call and after :func:`synchronize`. ``flush`` (e.g. zeroing a
    buffer larger than the GPU's L2 cache, ``buffer.zero_``) runs before every call, outside the
    timed region: each call then starts with a cold cache, and on CUDA the flush keeps the GPU busy
    while the call is launched, so that launch latency stays out of the time. ``progress`` receives
    one line per warm-up call and per round.
    """
    if not candidates:
        raise ValueError("no candidates to time")
    if min_rounds < 1 or not 0 <= min_seconds < math.inf:
        raise ValueError(f"need min_rounds >= 1 and a finite min_seconds >= 0, got {min_rounds}, {min_seconds}")
    device = torch.device(device)
    results = {}

    def call(label: str) -> float:
        seconds, results[label] = _time_call(candidates[label], device, flush)
        return seconds

    warmups = {}
    for label in candidates:
        times = []
        while not _settled(times) and len(times) < MAX_WARMUP:
            times.append(call(label))
            progress(f"  {label}: warm-up {len(times)}: {times[-1] * 1e3:.1f} ms")
        if not _settled(times):
            progress(f"  {label}: times did not settle within {MAX_WARMUP} warm-up calls; timing anyway")
        warmups[label] = tuple(times)
    rounds = {label: [] for label in candidates}
    done = 0
    while done < min_rounds or min(sum(times) for times in rounds.values()) < min_seconds:
        for label in candidates:
            rounds[label].append(call(label))
        done += 1
        progress(f"  round {done}: " + ", ".join(f"{label} {t[-1] * 1e3:.1f} ms" for label, t in rounds.items()))
    return {label: Timing(warmups[label], tuple(rounds[label])) for label in candidates}, results


def per_round_speedup(baseline: Sequence[float], times: Sequence[float]) -> float:
    """The median over rounds of ``baseline[i] / times[i]``: the speed-up of one candidate over
    another timed in the same interleaved rounds, which drifts of the machine between rounds move
    less than the ratio of the two medians."""
    if len(baseline) != len(times) or not times:
        raise ValueError(f"per_round_speedup needs two equally long, non-empty series of round times, got "
                         f"{len(baseline)} and {len(times)}")
    return statistics.median(b / t for b, t in zip(baseline, times))
