"""Where a CPU forward's time goes: inside oneDNN's primitives, by kind, and outside them.

    python -m benchmarks.cpu_breakdown                      # Conformer-S, batch 8, 224, fp32
    python -m benchmarks.cpu_breakdown --rounds 8 --batch-size 1 --bf16 --json out.json

Runs the eager fast model, the same with prepacked weights and the fast model through oneDNN
Graph (:func:`fastconformer.onednn_graph`), same random weights, in interleaved rounds. Each round
times every model's forward twice: once plainly (wall clock, and the process's system time and
minor page faults from ``getrusage``), once with oneDNN's verbose mode on, whose ``exec`` lines give
every primitive's start (``ONEDNN_VERBOSE_TIMESTAMP``) and execution time (the verbose forward's
own wall time is not used: printing slows it). A kind's time is how long at least one primitive of
that kind ran: oneDNN runs some primitives side by side, one per thread (oneDNN Graph's attention
partition runs a small matmul and softmax per image and head on each thread), so their times are
merged as intervals, never summed. The table holds the medians over rounds: each kind's time, the
time any primitive ran ("total"; below the kinds' sum by the time kinds ran side by side, its own
row) and the wall time less that.

What the rows hold: "outside oneDNN" is everything else, aten's kernels included (element-wise
passes; the eager models' LayerNorms, pooling and classifier heads; convolutions torch sends to
its own kernels, as it does for some small ones), Python and the dispatcher; a page fault on a
primitive's fresh output counts inside that primitive. The kinds are the primitives each path runs:
the graph runs the FCUs' linear layers as 1x1 convolutions, which the eager models run as inner
products ("linear"). A "-" marks a kind that model runs no oneDNN primitive of.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterable

import torch

import fastconformer
from fastconformer.cli import _check_image_size, _int_between, _Parser
from fastconformer.dispatch import onednn_available, onednn_bf16_available
from fastconformer.environment import device_name, timing_environment
from fastconformer.export import check_writable
from fastconformer.onednn_graph import onednn_graph_available
from fastconformer.registry import VARIANTS, resolve_name
from fastconformer.testing import reference_and_fast

KINDS = ("convolution 1x1", "convolution kxk", "linear", "attention matmul", "softmax", "layer norm", "pooling",
         "reorder", "other")
VERBOSE_VARIABLES = ("ONEDNN_VERBOSE", "DNNL_VERBOSE")  # either would print lines outside the tool's window
TIMESTAMP = "ONEDNN_VERBOSE_TIMESTAMP"  # read once, when oneDNN first prints a verbose line in the process


def primitive_time(line: str, tokens: int) -> tuple[str, float | None, float] | None:
    """(kind, start in ms or None, milliseconds) of one oneDNN verbose line reporting a CPU
    primitive's execution (``onednn_verbose,v1,[timestamp,]primitive,exec,cpu,<kind>,...,<problem>,<ms>``;
    the timestamp, printed under ``ONEDNN_VERBOSE_TIMESTAMP=1``, is the execution's start), else None.
    A matmul counts as the attention's when the token count is its inner or output dim (no linear
    layer of the registered variants has a dim of n*n + 1, which a token count is; a head of such a
    num_classes would be counted as attention)."""
    fields = line.strip().split(",")
    if not fields or fields[0] != "onednn_verbose" or "primitive" not in fields:
        return None
    at = fields.index("primitive")
    if fields[at + 1:at + 3] != ["exec", "cpu"] or len(fields) < at + 6:
        return None
    try:
        start = float(fields[2]) if at == 3 else None
    except ValueError:  # another field before the marker: a format this parser does not know
        start = None
    kind, problem, ms = fields[at + 3], fields[-2], float(fields[-1])
    if kind == "convolution":
        kind = "convolution 1x1" if "kh1" in problem and "kw1" in problem else "convolution kxk"
    elif kind == "inner_product":
        kind = "linear"
    elif kind == "matmul":
        dims = [d.split("x") for d in problem.split(":")[:2]]
        inner, out = dims[0][-1], dims[1][-1]
        kind = "attention matmul" if str(tokens) in (inner, out) else "linear"
    else:
        named = {"softmax": "softmax", "layer_normalization": "layer norm", "pooling": "pooling", "reorder": "reorder"}
        kind = named.get(kind, "other")
    return kind, start, ms


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """How long at least one of the (start, end) intervals was running: their union's length."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def busy_times(lines: Iterable[str], tokens: int) -> tuple[dict[str, float], float]:
    """({kind: milliseconds at least one primitive of that kind ran}, milliseconds any primitive
    ran) from oneDNN's verbose lines (others are skipped). RuntimeError when no line reports an
    execution, or when one carries no start time (oneDNN fixes its line format for the process when
    it prints its first verbose line: one printed before ONEDNN_VERBOSE_TIMESTAMP=1 was set, or a
    format this parser does not know)."""
    intervals = collections.defaultdict(list)
    for line in lines:
        parsed = primitive_time(line, tokens)
        if parsed:
            kind, start, ms = parsed
            if start is None:
                raise RuntimeError("oneDNN's verbose lines carry no start time: oneDNN printed a verbose line in "
                                   "this process before ONEDNN_VERBOSE_TIMESTAMP=1 was set (run the tool in a "
                                   f"fresh process), or prints a format this tool does not know: {line.strip()!r}")
            intervals[kind].append((start, start + ms))
    if not intervals:
        raise RuntimeError("oneDNN's verbose mode reported no primitive execution: this torch's oneDNN prints "
                           "another format, or the forward ran no oneDNN primitive")
    return ({kind: busy_time(spans) for kind, spans in intervals.items()},
            busy_time([span for spans in intervals.values() for span in spans]))


@contextlib.contextmanager
def _verbose_timestamps_on():
    """ONEDNN_VERBOSE_TIMESTAMP=1 while oneDNN may first read it (its first verbose line), then the
    environment as it was."""
    preset = os.environ.get(TIMESTAMP)
    os.environ[TIMESTAMP] = "1"
    try:
        yield
    finally:
        if preset is None:
            del os.environ[TIMESTAMP]
        else:
            os.environ[TIMESTAMP] = preset


def onednn_times(fn: Callable[[], object], tokens: int) -> tuple[dict[str, float], float]:
    """:func:`busy_times` of the oneDNN primitives ``fn()`` executes, from oneDNN's verbose mode,
    whose lines oneDNN prints to the process's standard output (captured through a temporary file;
    file descriptor 1 is given back whatever ``fn`` does)."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile("w+") as capture:
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
        try:
            os.dup2(capture.fileno(), 1)
            with _verbose_timestamps_on(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        return busy_times(capture, tokens)


def timed(fn: Callable[[], object]) -> tuple[float, float, int]:
    """(wall ms, system-time ms, minor page faults) of one ``fn()``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall * 1e3, (after.ru_stime - before.ru_stime) * 1e3, after.ru_minflt - before.ru_minflt


def unavailable(bf16: bool) -> str | None:
    """Why the breakdown cannot run here, or None."""
    preset = sorted(set(VERBOSE_VARIABLES) & set(os.environ))
    if preset:
        return (f"unset {', '.join(preset)}: the tool turns oneDNN's verbose mode on for its own forwards only "
                "(with start times, which oneDNN adds only when its first verbose line in the process has them)")
    if not onednn_available() or not onednn_graph_available():
        return "this torch has no oneDNN or no oneDNN Graph fuser (torch.jit.enable_onednn_fusion)"
    if bf16 and not onednn_bf16_available():
        return "--bf16: oneDNN has no native bfloat16 on this CPU, so the graph path would run the eager model"
    return None


def breakdown(name: str, batch_size: int, image_size: int, rounds: int, bf16: bool,
              progress: Callable[[str], None] = lambda msg: None) -> dict[str, dict]:
    """{model label: {"wall_ms", "system_ms", "minor_faults", "onednn_total_ms": [per round],
    "onednn_ms": {kind: [per round]}}} for the eager fast model, the prepacked one and the oneDNN
    Graph path (random weights), timed in interleaved rounds on (batch_size, 3, image_size,
    image_size) float32 images."""
    reference, fast = reference_and_fast(name)
    fast.eval()
    models = {"fast": fast, "fast prepacked": fastconformer.prepack_weights(copy.deepcopy(fast)),
              "fast oneDNN graph": fastconformer.onednn_graph(copy.deepcopy(fast))}
    x = torch.randn(batch_size, 3, image_size, image_size)
    tokens = (image_size // reference.patch_size) ** 2 + 1
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    result = {label: {"wall_ms": [], "system_ms": [], "minor_faults": [], "onednn_total_ms": [],
                      "onednn_ms": {kind: [] for kind in KINDS}} for label in models}
    with torch.inference_mode(), precision():
        for model in models.values():
            for _ in range(3):
                model(x)
        for index in range(rounds):
            for label, model in models.items():
                row = result[label]
                for key, value in zip(("wall_ms", "system_ms", "minor_faults"), timed(lambda: model(x))):
                    row[key].append(value)
                times, total = onednn_times(lambda: model(x), tokens)
                row["onednn_total_ms"].append(total)
                for kind in KINDS:
                    row["onednn_ms"][kind].append(times.get(kind, 0.0))
            progress(f"round {index + 1}: " + ", ".join(f"{label} {row['wall_ms'][-1]:.0f} ms"
                                                        for label, row in result.items()))
    return result


def table(result: dict[str, dict]) -> str:
    """The Markdown table of :func:`breakdown`'s medians over rounds."""
    labels = list(result)

    def column(key: str) -> dict[str, list[float]]:
        return {label: row[key] for label, row in result.items()}

    def cells(values: dict[str, list[float]], fmt: str = "{:.1f}", dash_if_zero: bool = False) -> str:
        return " | ".join("-" if dash_if_zero and not any(values[label])
                          else fmt.format(statistics.median(values[label])) for label in labels)

    totals = column("onednn_total_ms")
    outside = {label: [wall - total for wall, total in zip(row["wall_ms"], totals[label])]
               for label, row in result.items()}
    lines = ["| ms per forward (median of rounds) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for kind in KINDS:
        per_kind = {label: row["onednn_ms"][kind] for label, row in result.items()}
        if any(any(values) for values in per_kind.values()):
            lines.append(f"| oneDNN {kind} | {cells(per_kind, dash_if_zero=True)} |")
    side_by_side = {label: [sum(kinds) - total for kinds, total in zip(zip(*row["onednn_ms"].values()), totals[label])]
                    for label, row in result.items()}
    lines += [f"| **oneDNN primitives, total** | {cells(totals)} |",
              f"| kinds side by side (their sum less the total) | {cells(side_by_side)} |",
              f"| **outside oneDNN** (wall - primitives) | {cells(outside)} |",
              f"| system time, ms | {cells(column('system_ms'))} |",
              f"| minor page faults | {cells(column('minor_faults'), '{:.0f}')} |",
              f"| **wall** | {cells(column('wall_ms'))} |"]
    return "\n".join(lines)


def _model(text: str) -> str:
    try:
        return resolve_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m benchmarks.cpu_breakdown", description=__doc__.split("\n")[0])
    positive = _int_between(1)
    parser.add_argument("--model", type=_model, default="conformer_small_patch16", help=", ".join(VARIANTS))
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--image-size", type=positive, default=224)
    parser.add_argument("--rounds", type=positive, default=6)
    parser.add_argument("--bf16", action="store_true", help="under CPU bfloat16 autocast")
    parser.add_argument("--json", metavar="PATH", help="also write the per-round numbers as JSON")
    args = parser.parse_args(argv)
    try:
        _check_image_size(args.model, args.image_size)
        if args.json is not None:
            check_writable(args.json, "--json")
    except ValueError as error:
        parser.error(str(error))
    why = unavailable(args.bf16)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    setting = (f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
               f"{'bf16 autocast' if args.bf16 else 'fp32'}, {device_name('cpu')}, torch {torch.__version__}")
    progress(setting)
    try:
        result = breakdown(args.model, args.batch_size, args.image_size, args.rounds, args.bf16, progress)
    except RuntimeError as error:  # what oneDNN's verbose mode printed is not what the tool reads
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": setting, "environment": timing_environment(), "rounds": args.rounds,
                       "results": result}, f, indent=1)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
