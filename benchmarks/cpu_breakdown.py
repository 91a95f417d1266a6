"""Where a CPU forward's time goes: inside oneDNN's primitives, by kind, and outside them.

    python -m benchmarks.cpu_breakdown                      # Conformer-S, batch 8, 224, fp32
    python -m benchmarks.cpu_breakdown --rounds 8 --batch-size 1 --bf16

Runs the eager fast model, the same with prepacked weights and the fast model through oneDNN
Graph (:func:`fastconformer.onednn_graph`), same random weights, in interleaved rounds. Each round
times every model's forward twice: once plainly (wall clock, and the process's system time and
minor page faults from ``getrusage``), once with oneDNN's verbose mode on, whose ``exec`` lines give
every primitive's execution time (the verbose forward's own wall time is not used: printing slows
it). The table holds the medians over rounds: the primitives summed by kind (convolutions 1x1 and
larger, the linear layers' inner products or matmuls, the attention's matmuls and softmax,
LayerNorm, pooling, reorders, the rest), their total, and the wall time less that total: what runs
outside oneDNN (aten's element-wise ops, Python, the dispatcher, page faults).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

import fastconformer
from fastconformer.environment import device_name
from fastconformer.testing import randomize_module

KINDS = ("convolution 1x1", "convolution kxk", "linear", "attention matmul", "softmax", "layer norm", "pooling",
         "reorder", "other")


def primitive_kind(line: str, tokens: int) -> tuple[str, float] | None:
    """(kind, milliseconds) of one ``onednn_verbose,...,primitive,exec,cpu,...`` line, else None.
    A matmul is the attention's when the token count is one of its inner or output dims."""
    fields = line.strip().split(",")
    if len(fields) < 8 or fields[2:5] != ["primitive", "exec", "cpu"]:
        return None
    kind, problem, ms = fields[5], fields[-2], float(fields[-1])
    if kind == "convolution":
        return ("convolution 1x1" if "kh1" in problem and "kw1" in problem else "convolution kxk"), ms
    if kind == "inner_product":
        return "linear", ms
    if kind == "matmul":
        dims = [d.split("x") for d in problem.split(":")[:2]]
        inner, out = dims[0][-1], dims[1][-1]
        return ("attention matmul" if str(tokens) in (inner, out) else "linear"), ms
    named = {"softmax": "softmax", "layer_normalization": "layer norm", "pooling": "pooling", "reorder": "reorder"}
    return named.get(kind, "other"), ms


def onednn_times(fn: Callable[[], object], tokens: int) -> dict[str, float]:
    """{kind: milliseconds} of the oneDNN primitives ``fn()`` executes (verbose mode, whose lines
    oneDNN prints to the process's standard output: captured through a temporary file)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile("w+") as capture:
        os.dup2(capture.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        times = collections.Counter()
        for line in capture:
            parsed = primitive_kind(line, tokens)
            if parsed:
                times[parsed[0]] += parsed[1]
    return dict(times)


def timed(fn: Callable[[], object]) -> tuple[float, float, int]:
    """(wall ms, system-time ms, minor page faults) of one ``fn()``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall * 1e3, (after.ru_stime - before.ru_stime) * 1e3, after.ru_minflt - before.ru_minflt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_breakdown", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="conformer_small_patch16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bf16", action="store_true", help="under CPU bfloat16 autocast")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    reference = fastconformer.create_model(args.model)
    randomize_module(reference, torch.Generator().manual_seed(0))
    fast = fastconformer.convert(reference.eval())
    models = {"fast": fast, "fast prepacked": fastconformer.prepack_weights(copy.deepcopy(fast)),
              "fast oneDNN graph": fastconformer.onednn_graph(copy.deepcopy(fast))}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    tokens = (args.image_size // reference.patch_size) ** 2 + 1
    precision = contextlib.nullcontext if not args.bf16 else lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    walls, system, faults = ({name: [] for name in models} for _ in range(3))
    kinds = {name: {kind: [] for kind in KINDS} for name in models}
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {device_name('cpu')}", file=sys.stderr)
    with torch.inference_mode(), precision():
        for model in models.values():
            for _ in range(3):
                model(x)
        for index in range(args.rounds):
            for name, model in models.items():
                wall, sys_ms, minflt = timed(lambda: model(x))
                walls[name].append(wall)
                system[name].append(sys_ms)
                faults[name].append(minflt)
                times = onednn_times(lambda: model(x), tokens)
                for kind in KINDS:
                    kinds[name][kind].append(times.get(kind, 0.0))
            print(f"round {index + 1}: " + ", ".join(f"{name} {walls[name][-1]:.0f} ms" for name in models),
                  file=sys.stderr)

    def row(label: str, values: dict[str, list[float]], fmt: str = "{:.1f}") -> str:
        return f"| {label} | " + " | ".join(fmt.format(statistics.median(values[name])) for name in models) + " |"

    totals = {name: [sum(kinds[name][kind][i] for kind in KINDS) for i in range(args.rounds)] for name in models}
    outside = {name: [w - t for w, t in zip(walls[name], totals[name])] for name in models}
    print("| ms per forward (median of rounds) | " + " | ".join(models) + " |")
    print("|---" * (len(models) + 1) + "|")
    for kind in KINDS:
        if any(any(kinds[name][kind]) for name in models):
            print(row(f"oneDNN {kind}", {name: kinds[name][kind] for name in models}))
    print(row("**oneDNN primitives, total**", totals))
    print(row("**outside oneDNN** (wall - primitives)", outside))
    print(row("system time (page faults)", system))
    print(row("minor page faults", faults, "{:.0f}"))
    print(row("**wall**", walls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
