"""fastconformer.timing: the timer of ``fastconformer bench`` and the GPU report. On the CPU with a
scripted clock (``fake_clock``: each timed call takes the next duration): the warm-up settles, the
rounds alternate the candidates, the flush runs before every call outside the timed region, and
the Timing record's median, spread and settled flag. On CUDA (``gpu``): the events time the work
queued on the GPU, not its launch."""

import math

import pytest
import torch

from fastconformer import timing
from fastconformer.timing import MAX_WARMUP, Timing, time_interleaved


def test_settles_then_alternates(fake_clock):
    calls, messages = [], []
    # a: slow first calls, settled after its 5th (within 5%); b: settled at once. Rounds: a 1 s, b 2 s.
    # (Durations exact in binary, so that the fake clock's differences are too.)
    fake_clock([9.0, 4.0, 1.0, 1.03125, 1.015625] + [2.0] * 3 + [1.0, 2.0] * 5)
    candidates = {label: (lambda label=label: calls.append(label) or label) for label in "ab"}
    timings, outputs = time_interleaved(candidates, min_rounds=2, min_seconds=5.0, progress=messages.append)
    assert calls == ["a"] * 5 + ["b"] * 3 + ["a", "b"] * 5  # 5 rounds: a needs 5 x 1 s
    assert outputs == {"a": "a", "b": "b"}
    assert timings["a"].warmup == (9.0, 4.0, 1.0, 1.03125, 1.015625) and timings["a"].settled
    assert timings["a"].rounds == (1.0,) * 5 and timings["b"].median == 2.0 and timings["b"].spread == 0.0
    assert messages[0] == "  a: warm-up 1: 9000.0 ms" and messages[-1] == "  round 5: a 1000.0 ms, b 2000.0 ms"


def test_caps_the_warm_up(fake_clock):
    fake_clock([1.0, 2.0] * (MAX_WARMUP // 2) + [1.0])
    messages = []
    timings, _ = time_interleaved({"a": lambda: None}, min_rounds=1, min_seconds=0.0, progress=messages.append)
    assert len(timings["a"].warmup) == MAX_WARMUP and not timings["a"].settled
    assert f"  a: times did not settle within {MAX_WARMUP} warm-up calls; timing anyway" in messages


def test_flush_runs_before_every_call_outside_the_timing(fake_clock):
    clock = fake_clock([1.0] * 3 + [2.0] * 3 + [1.0, 2.0] * 2)
    calls = []

    def flush():
        calls.append("flush")
        clock.now += 100.0  # a flush that took time: none of it may be counted

    timings, _ = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, min_rounds=2,
                                  min_seconds=0.0, flush=flush)
    assert calls == ["flush", "a"] * 3 + ["flush", "b"] * 3 + ["flush", "a", "flush", "b"] * 2
    assert timings["a"].warmup == (1.0,) * 3 and timings["a"].rounds == (1.0, 1.0)
    assert timings["b"].warmup == (2.0,) * 3 and timings["b"].rounds == (2.0, 2.0)


def test_timing_record():
    t = Timing(warmup=(3.0, 1.0, 1.0, 1.0), rounds=(1.0, 1.25, 1.5, 1.0, 1.375))
    assert t.settled and t.median == 1.25
    assert t.spread == pytest.approx((1.375 - 1.0) / 1.25)  # interquartile range over the median
    assert Timing(warmup=(1.0, 2.0), rounds=(4.0,)).spread == 0.0
    assert not Timing(warmup=(1.0, 2.0), rounds=(4.0,)).settled  # fewer calls than the window
    assert not Timing(warmup=(1.0, 1.0, 1.1), rounds=(1.0,)).settled  # 10% apart


@pytest.mark.parametrize("candidates, min_rounds, min_seconds, message", [
    ({}, 1, 0.0, "no candidates to time"),
    ({"a": lambda: None}, 0, 0.0, "need min_rounds >= 1"),
    ({"a": lambda: None}, 1, math.inf, "a finite min_seconds >= 0"),
    ({"a": lambda: None}, 1, -1.0, "a finite min_seconds >= 0"),
])
def test_rejects_what_cannot_be_timed(candidates, min_rounds, min_seconds, message):
    with pytest.raises(ValueError, match=message):
        time_interleaved(candidates, min_rounds, min_seconds)


def test_cpu_times_are_real_without_a_fake_clock():
    timings, outputs = time_interleaved({"sum": lambda: torch.ones(1000).sum()}, min_rounds=2, min_seconds=0.0)
    assert outputs["sum"].item() == 1000 and all(0 < t < 1 for t in timings["sum"].rounds)
    timing.synchronize("cpu")  # nothing to wait for


@pytest.mark.gpu
def test_cuda_events_time_the_queued_work():
    """torch.cuda._sleep returns at once on the host and keeps the GPU busy: only timing the
    device's work (events, waited for) sees it; the flush runs on the GPU before it."""
    buffer = torch.empty(64 * 2**20, dtype=torch.int8, device="cuda")
    cycles = 10**7  # about 5 ms at 2 GHz
    timings, _ = time_interleaved({"short": lambda: torch.cuda._sleep(cycles // 10),
                                   "long": lambda: torch.cuda._sleep(cycles)}, min_rounds=3, min_seconds=0.0,
                                  device="cuda", flush=buffer.zero_)
    assert 1e-3 < timings["long"].median < 1.0
    assert timings["short"].median < timings["long"].median / 3


def test_per_round_speedup_is_the_median_of_the_round_ratios():
    # a drift that slows round 2 for both candidates leaves the per-round ratio alone
    assert timing.per_round_speedup([2.0, 4.0, 2.0], [1.0, 2.0, 1.0]) == 2.0
    assert timing.per_round_speedup([1.0, 1.0, 1.0], [1.0, 2.0, 4.0]) == 0.5
    with pytest.raises(ValueError, match="equally long"):
        timing.per_round_speedup([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        timing.per_round_speedup([], [])
