"""The ``fastconformer`` command line: info, bench, check, predict, export.

Exit status: 0 on success; 1 when a command ran but something it checked failed (an equality
check, an image that could not be read); 2 when the arguments or the files given are wrong, with
one ``error: ...`` line on stderr saying what was wrong and what is expected (never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import sys
from typing import Callable

import torch

from . import __version__
from .checkpoint import CheckpointMismatchError
from .convert import convert
from .dispatch import (BackendUnavailableError, check_environment, interpreter_enabled, onednn_available,
                       onednn_bf16_available, triton_available, use_triton)
from .environment import DTYPES, device_name, timing_environment
from .export import ExportError, check_writable
from .malloc import keep_freed_memory
from .modules.prepack import prepack_weights
from .onednn_graph import OneDNNGraph, onednn_graph, onednn_graph_available
from .registry import VARIANTS, Pretrained, create_model, pretrained_variant, read_pretrained, resolve_name
from .testing import rel_error, tf32
from .timing import Timing, per_round_speedup, time_interleaved

# A timing whose interquartile range exceeds SPREAD_LIMIT of its median, or fewer than MIN_ROUNDS
# rounds, is flagged: the speed-up from such medians is not to be trusted.
SPREAD_LIMIT = 0.05
MIN_ROUNDS = 5


def _triton_version() -> str:
    if not triton_available():
        return "not installed"
    import triton

    return triton.__version__


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def _model_device(name: str) -> torch.device:
    """:func:`_device`, where the backend in force (FASTCONFORMER_BACKEND) can run the fast model:
    BackendUnavailableError before anything is built otherwise."""
    device = _device(name)
    use_triton(torch.empty(0, device=device))
    return device


DEFAULT_MODEL = "conformer_small_patch16"


def _model_and_weights(model: str | None, pretrained: str | None) -> tuple[str, Pretrained | None]:
    """(The variant --model names, else the one the --pretrained checkpoint holds
    (:func:`~fastconformer.registry.pretrained_variant`), else DEFAULT_MODEL; what create_model's
    ``pretrained=`` takes: the checkpoint, read once here)."""
    name = resolve_name(model) if model is not None else None
    if pretrained is None:
        return name or DEFAULT_MODEL, None
    weights = read_pretrained(pretrained)  # before any progress line: an unreadable file is the error's one line
    return name or pretrained_variant(weights), weights


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_info(args: argparse.Namespace) -> int:
    """Variants with parameter counts, and what this machine offers the kernels."""
    print(f"fastconformer {__version__}  (Python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {_triton_version()})")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"device: CUDA {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}): Triton kernels run by default")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), no CUDA: the PyTorch implementations run"
              + ("; TRITON_INTERPRET=1 lets backend('triton') run kernels in the interpreter"
                 if not interpreter_enabled() else "; the Triton interpreter is enabled"))
    print("CPU inference: oneDNN fused linear + GELU / residual and convolution + residual "
          + ("available" if onednn_available() else "not available in this torch build (plain ops run)")
          + "; oneDNN Graph (attention, onednn_graph) "
          + ("available" if onednn_graph_available() else "not available in this torch build"))
    print()
    print(f"{'model':<26}{'params':>14}{'patch':>7}{'embed':>7}{'heads':>7}{'top-1':>8}")
    for name, v in VARIANTS.items():
        print(f"{name:<26}{v.num_params:>14,}{v.kwargs['patch_size']:>7}{v.kwargs['embed_dim']:>7}"
              f"{v.kwargs['num_heads']:>7}{v.top1:>7.1f}%")
    return 0


def _exact_logits(reference: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The reference's logits for x computed in float64 (the equality policy's yardstick)."""
    with torch.inference_mode():
        return copy.deepcopy(reference).double()(x.double())


def _check_image_size(name: str, size: int) -> None:
    patch = VARIANTS[name].kwargs["patch_size"]
    if size % patch:
        raise ValueError(f"--image-size must be a positive multiple of {name}'s patch size {patch}, got {size}")


def _spread_warnings(timings: dict[str, Timing]) -> list[str]:
    rounds = len(next(iter(timings.values())).rounds)
    if rounds < MIN_ROUNDS:
        return [f"only {rounds} round(s): too few to judge the spread; use --iters {MIN_ROUNDS} or more "
                "for a speed-up to quote"]
    # compared as printed (one decimal of a percent), so that no warning quotes a spread of exactly the limit
    wide = {label: t.spread for label, t in timings.items() if round(t.spread, 3) > SPREAD_LIMIT}
    if not wide:
        return []
    listed = ", ".join(f"{label} {spread:.1%}" for label, spread in wide.items())
    return [f"timing spread (interquartile range / median) above {SPREAD_LIMIT:.0%}: {listed}; the machine is "
            "busy or its clock varies, so the speed-up is not trustworthy: rerun on a quiet machine or with "
            "more --iters / --min-seconds"]


def _top1_agreement(logits, exact: list[torch.Tensor]) -> float:
    """The fraction of (image, head) pairs whose top-1 class in ``logits`` (tensors or arrays, one per
    head) is the float64 reference's."""
    hits = [torch.as_tensor(o).argmax(-1) == e.argmax(-1) for o, e in zip(logits, exact)]
    return torch.cat(hits).double().mean().item()


def _result_rows(timings: dict[str, Timing], outputs: dict[str, object], exact: list[torch.Tensor], batch_size: int,
                 precisions: dict[str, str] | None = None) -> list[dict]:
    """One result row per timed model (``bench``'s table and JSON): medians, spread, speed-up over the
    ``"reference"`` row (ratio of medians, and the median of the per-round ratios, which a drifting
    machine moves less), the logits' relative error vs ``exact`` (float64; outputs may be arrays),
    their top-1 agreement with it (:func:`_top1_agreement`) and every round; with ``precisions``,
    each row's precision after its label."""
    base, base_rounds = timings["reference"].median, timings["reference"].rounds
    return [dict(impl=label, **({} if precisions is None else {"precision": precisions[label]}),
                 seconds_per_batch=t.median, spread=t.spread, images_per_s=batch_size / t.median,
                 speedup=base / t.median, speedup_per_round=per_round_speedup(base_rounds, t.rounds),
                 rel_error_vs_float64=rel_error([torch.as_tensor(o) for o in outputs[label]], exact),
                 top1_agreement=_top1_agreement(outputs[label], exact),
                 seconds=list(t.rounds), warmup_seconds=list(t.warmup), warmup_settled=t.settled)
            for label, t in timings.items()]


def cmd_bench(args: argparse.Namespace) -> int:
    """Reference vs fast (and torch.compile(reference)) on the same weights and inputs, timed in
    interleaved rounds after each settled its warm-up."""
    device = _model_device(args.device)
    if args.json is not None:
        check_writable(args.json, "--json")
    if args.engines:
        if args.dtype is not None or args.compile:
            raise ValueError("--engines runs fp32 and bf16 and torch.compile of both models itself; drop "
                             f"{'--dtype' if args.dtype is not None else '--compile'}")
        if device.type != "cpu" and args.device != "auto":
            raise ValueError("--engines compares CPU inference engines; use --device cpu (or auto)")
    name, weights = _model_and_weights(args.model, args.pretrained)
    _check_image_size(name, args.image_size)
    malloc = _apply_malloc_setting(args.keep_freed_memory)
    if args.engines:
        return _bench_engines(args, name, weights, malloc)
    args.dtype = args.dtype or "fp32"
    torch.manual_seed(args.seed)
    _progress(f"building {name} (reference and fast, same weights) on {device_name(device)} ...")
    reference = create_model(name, pretrained=weights).eval()
    fast = convert(copy.deepcopy(reference)).to(device)
    reference = reference.to(device)
    dtype = DTYPES[args.dtype]
    autocast_dtype = None if dtype == torch.float32 else dtype
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    models = {"reference": reference, "fast": fast}
    if args.compile:
        models["compile(reference)"] = torch.compile(reference)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with torch.inference_mode(), ctx:
        timings, outputs = time_interleaved({label: functools.partial(model, x) for label, model in models.items()},
                                            args.iters, args.min_seconds, device=device, progress=_progress)
    _progress("computing the reference in float64 for the error column ...")
    exact = _exact_logits(reference, x)
    rows = _result_rows(timings, outputs, exact, args.batch_size)
    warnings = _malloc_warnings(malloc) + _spread_warnings(timings)
    rounds = len(timings["reference"].rounds)
    print(f"{name}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.dtype}"
          f"{' (autocast)' if autocast_dtype else ''}, {device_name(device)}, torch {torch.__version__}; "
          f"malloc: {malloc}; environment: " + _environment_text(timing_environment()))
    print(f"{rounds} interleaved rounds after warm-up; latency: median; spread: interquartile range / median; "
          "speedup: ratio of the medians; per round: median of the per-round speed-ups")
    print("logits error: relative to the reference computed in float64 (the fast model passes at <= 1e-4 in fp32, "
          "<= 2x the reference's own error in fp16/bf16); top-1 agreement with it over the batch's images and both "
          "heads")
    print(f"{'impl':<22}{'images/s':>12}{'latency ms':>13}{'spread':>9}{'speedup':>10}{'per round':>11}"
          f"{'logits rel. err':>18}{'top-1 agree':>13}")
    for row in rows:
        print(f"{row['impl']:<22}{row['images_per_s']:>12.1f}{row['seconds_per_batch'] * 1e3:>13.1f}"
              f"{row['spread']:>9.1%}{row['speedup']:>9.2f}x{row['speedup_per_round']:>10.2f}x"
              f"{row['rel_error_vs_float64']:>18.2e}{row['top1_agreement']:>13.1%}")
    for warning in warnings:
        print(f"warning: {warning}")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(dict(model=name, batch_size=args.batch_size, image_size=args.image_size, dtype=args.dtype,
                           device=device_name(device), torch=torch.__version__, triton=_triton_version(),
                           environment=timing_environment(), malloc=malloc, rounds=rounds,
                           spread_limit=SPREAD_LIMIT, warnings=warnings, results=rows), f, indent=2)
        _progress(f"wrote {args.json}")
    return 0


MALLOC_REFUSED = "keep_freed_memory() returned False"


def _apply_malloc_setting(keep: bool) -> str:
    """Calls :func:`~fastconformer.keep_freed_memory` when ``keep``; returns what the benchmark's
    header and JSON say of the allocator: "keep_freed_memory()" when it took, MALLOC_REFUSED when it
    did not, else "process defaults" (glibc's adaptive thresholds, or what GLIBC_TUNABLES or an
    LD_PRELOAD allocator set: the header's environment says)."""
    if not keep:
        return "process defaults"
    return "keep_freed_memory()" if keep_freed_memory() else MALLOC_REFUSED


def _environment_text(environment: dict[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in environment.items()) or "default"


def _malloc_warnings(malloc: str) -> list[str]:
    return ([f"--keep-freed-memory: {MALLOC_REFUSED} (glibc's malloc does not serve this process, or glibc refused "
             "the 32 MiB mmap threshold), so the process's own allocator settings were timed"]
            if malloc == MALLOC_REFUSED else [])


def _engine_candidates(reference: torch.nn.Module, fast: torch.nn.Module, graph: OneDNNGraph, x: torch.Tensor,
                       folder: str) -> tuple[dict[str, tuple[str, Callable[[], object]]], dict[str, str]]:
    """The rows of ``bench --engines``: ({label: (precision, call)}, {what was skipped: why}).
    Eager models (the fast one also with prepacked weights, :func:`~fastconformer.prepack_weights`),
    the fast model through oneDNN Graph (:func:`~fastconformer.onednn_graph`) and torch.compile run
    fp32 and bf16 (CPU autocast); each installed engine runs
    both models' ONNX exports (static batch, verified at export), ONNX Runtime in fp32, OpenVINO in
    fp32 and with its bf16 inference precision hint."""
    from .export import ENGINES, engine_runner, export_onnx, missing_engines

    def autocast(fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn()
        return run

    # the prepacked model is a copy: packing is registered per parameter
    models = {"reference": reference, "fast": fast, "fast prepacked": prepack_weights(copy.deepcopy(fast)),
              "fast oneDNN graph": graph,
              "compile(reference)": torch.compile(reference), "compile(fast)": torch.compile(fast)}
    skipped = missing_engines()
    if not onednn_graph_available():
        del models["fast oneDNN graph"]
        skipped["fast oneDNN graph"] = "this torch has no oneDNN Graph fuser (torch.jit.enable_onednn_fusion)"
    rows = {}
    for label, model in models.items():
        rows[label] = ("fp32", functools.partial(model, x))
        if model is graph and not onednn_bf16_available():
            skipped["fast oneDNN graph bf16"] = "oneDNN has no native bf16 on this CPU"
            continue
        rows[f"{label} bf16"] = ("bf16", autocast(functools.partial(model, x)))
    paths = {}
    try:
        for label, model in (("reference", reference), ("fast", fast)) if len(skipped) < len(ENGINES) else ():
            paths[label] = os.path.join(folder, f"{label}.onnx")
            _progress(f"exporting the {label} model to ONNX and verifying it ...")
            for verification in export_onnx(model, paths[label], input_shape=tuple(x.shape), dynamic_batch=False):
                _progress(f"  {verification}")
    except ImportError as err:  # onnx or onnxscript missing: no file for the engines to run
        skipped, paths = {engine: str(err) for engine in ENGINES}, {}
    for engine in ENGINES if paths else ():
        if engine in skipped:
            continue
        for precision in ("fp32", "bf16") if engine == "openvino" else ("fp32",):
            for label, path in paths.items():
                runner = engine_runner(engine, path, precision=precision)
                suffix = "" if precision == "fp32" else " bf16"
                rows[f"{engine}({label}){suffix}"] = (precision, functools.partial(runner, x.numpy()))
    if "onnxruntime" in ENGINES and "onnxruntime" not in skipped:
        skipped["onnxruntime bf16"] = "ONNX Runtime's CPU provider runs this export in fp32 only"
    return dict(sorted(rows.items(), key=lambda row: row[1][0] != "fp32")), skipped  # fp32 rows first


def _bench_engines(args: argparse.Namespace, name: str, weights: Pretrained | None, malloc: str) -> int:
    """``bench --engines``: eager reference and fast model, torch.compile of each, ONNX Runtime and
    OpenVINO on both models' exports, fp32 and bf16, in one interleaved run on the CPU."""
    import tempfile

    device = torch.device("cpu")  # --device auto on a CUDA machine: the engines compared are CPU ones
    torch.manual_seed(args.seed)
    _progress(f"building {name} (reference and fast, same weights) on {device_name(device)} ...")
    reference = create_model(name, pretrained=weights).eval()
    fast = convert(copy.deepcopy(reference))
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    load = [os.getloadavg()[0]]
    graph = onednn_graph(fast)
    with tempfile.TemporaryDirectory() as folder:
        candidates, skipped = _engine_candidates(reference, fast, graph, x, folder)
        with torch.inference_mode():
            timings, outputs = time_interleaved({label: call for label, (_, call) in candidates.items()},
                                                args.iters, args.min_seconds, device=device, progress=_progress)
    load.append(os.getloadavg()[0])

    _progress("computing the reference in float64 for the error column ...")
    exact = _exact_logits(reference, x)
    rows = _result_rows(timings, outputs, exact, args.batch_size,
                        precisions={label: precision for label, (precision, _) in candidates.items()})
    warnings = _malloc_warnings(malloc) + _spread_warnings(timings)
    graph_rows = [label for label in candidates if label.startswith("fast oneDNN graph")]
    if len(graph.graphs()) < len(graph_rows):  # a row that timed the eager model must say so
        warnings.insert(0, f"{', '.join(graph_rows)}: {len(graph.graphs())} of {len(graph_rows)} served by a graph, "
                           "the others ran the eager model (see onednn_graph's warning above)")
    rounds = len(timings["reference"].rounds)
    environment = timing_environment()
    print(f"{name}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {device_name(device)}, "
          f"torch {torch.__version__}; load average {load[0]:.2f} before, {load[1]:.2f} after; malloc: {malloc}; "
          "environment: " + _environment_text(environment))
    print(f"{rounds} interleaved rounds after warm-up; latency: median; spread: interquartile range / median; "
          "speedup vs the eager reference in fp32: ratio of the medians; per round: median of the per-round "
          "speed-ups")
    print("bf16: torch.autocast for eager and compiled models, OpenVINO's bf16 inference precision hint; "
          "logits error relative to the reference computed in float64, top-1 agreement with it over the batch's "
          "images and both heads")
    print(f"{'impl':<28}{'precision':>10}{'images/s':>11}{'latency ms':>12}{'spread':>8}{'speedup':>9}"
          f"{'per round':>11}{'logits rel. err':>17}{'top-1 agree':>13}")
    for row in rows:
        print(f"{row['impl']:<28}{row['precision']:>10}{row['images_per_s']:>11.1f}"
              f"{row['seconds_per_batch'] * 1e3:>12.1f}{row['spread']:>8.1%}{row['speedup']:>8.2f}x"
              f"{row['speedup_per_round']:>10.2f}x{row['rel_error_vs_float64']:>17.2e}{row['top1_agreement']:>13.1%}")
    for what, why in skipped.items():
        print(f"skipped: {what}: {why}")
    for warning in warnings:
        print(f"warning: {warning}")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(dict(model=name, batch_size=args.batch_size, image_size=args.image_size, engines=True,
                           device=device_name(device), threads=torch.get_num_threads(), torch=torch.__version__,
                           versions=_engine_versions(), environment=environment, malloc=malloc,
                           load_average=dict(before=load[0], after=load[1]),
                           rounds=rounds, spread_limit=SPREAD_LIMIT, skipped=skipped, warnings=warnings,
                           results=rows), f, indent=2)
        _progress(f"wrote {args.json}")
    return 0


def _engine_versions() -> dict[str, str]:
    """Versions of the export and engine packages installed here."""
    from importlib import metadata

    versions = {}
    for package in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def cmd_export(args: argparse.Namespace) -> int:
    """Write the reference (or with --fast the fast model) as ONNX and verify the file in ONNX
    Runtime and OpenVINO against the model in float64."""
    from .export import export_onnx, missing_engines, output_names, require_export_packages

    name = resolve_name(args.model)
    _check_image_size(name, args.image_size)
    check_writable(args.output, "output")
    require_export_packages()
    model = create_model(name, pretrained=args.pretrained, fast=args.fast)
    shape = (args.batch, 3, args.image_size, args.image_size)
    kind = "fast" if args.fast else "reference"
    _progress(f"exporting {name} ({kind}, {'batch ' + str(args.batch) if args.static_batch else 'dynamic batch'}, "
              f"{args.image_size}x{args.image_size}) to {args.output} ...")
    verifications = export_onnx(model, args.output, input_shape=shape, dynamic_batch=not args.static_batch)
    batch = f"= {args.batch}" if args.static_batch else "dynamic"
    print(f"wrote {args.output}: {name} ({kind}), input images (B, 3, {args.image_size}, {args.image_size}) with "
          f"B {batch}, outputs {' and '.join(output_names(model))}")
    for verification in verifications:
        print(f"verified: {verification}")
    for engine, why in missing_engines().items():
        print(f"not verified in {engine}: {why}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Module and whole-model equality checks on this machine; exit status 1 on any failure."""
    from .validation import run_checks, select_checks

    device = _device(args.device)  # each row holds its own backend: FASTCONFORMER_BACKEND does not matter here
    checks = select_checks(args.only)
    backends = ["torch"]
    if triton_available() and (device.type == "cuda" or interpreter_enabled()):
        backends.append("triton")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    print(f"equality checks on {device_name(device)}, torch {torch.__version__}, triton {_triton_version()}")
    if "triton" not in backends:
        why = ("triton is not installed" if not triton_available() else
               "they run on CUDA tensors (--device cuda)" if torch.cuda.is_available() else
               "they need a CUDA device (or TRITON_INTERPRET=1 set before the run, for triton's CPU interpreter)")
        print(f"the Triton kernels are not checked here: {why}")
    width = max(len(c.name) for c in checks) + 2
    print(f"{'check':<{width}}{'backend':<9}{'dtype':<10}{'rel. error':>12}{'bound':>11}  verdict")
    failures = ran = 0
    # float32 is checked in IEEE arithmetic, as the test suite does: with cuDNN's default TF32
    # convolutions a float32 model is ~1e-3 from float64 on Ampere and later, whatever the kernels do.
    with tf32(False):
        for result in run_checks(checks, device, tuple(dtypes), tuple(backends), seed=args.seed):
            dtype = "-" if result.dtype is None else str(result.dtype).replace("torch.", "")
            row = f"{result.check:<{width}}{result.backend or '-':<9}{dtype:<10}"
            if result.comparison is not None:
                c = result.comparison
                print(f"{row}{c.error:>12.2e}{c.bound:>11.2e}  {'pass' if c.passed else 'FAIL'}", flush=True)
            else:
                verdict = f"not run: {result.not_run}" if result.not_run else f"FAIL ({result.error})"
                print(f"{row}{'-':>12}{'-':>11}  {verdict}", flush=True)
            ran += result.not_run is None
            failures += result.failed
    print(f"{failures} check(s) FAILED" if failures else "all checks passed" if ran else "no check runs here")
    return 1 if failures else 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes for each image (with ImageNet's names for 1000-class heads), with the official
    evaluation preprocessing; an image
    that cannot be read gets one error line on stderr and exit status 1, the others their results."""
    from .data import imagenet_classes, load_image

    device = _device(args.device) if args.reference else _model_device(args.device)
    name, weights = _model_and_weights(args.model, args.pretrained)
    _progress(f"loading {name} from {args.pretrained} ...")
    model = create_model(name, pretrained=weights, fast=not args.reference).eval().to(device)
    if model.num_classes == 0:
        raise ValueError(f"{args.pretrained} has no classifier heads (a num_classes=0 model's checkpoint): predict "
                         "needs a classifier's")
    if args.top_k > model.num_classes:
        raise ValueError(f"--top-k must be at most the model's {model.num_classes} classes, got {args.top_k}")
    # class names for ImageNet-1k heads; a checkpoint fine-tuned to other classes prints their indices alone
    names = imagenet_classes()
    classes = names if model.num_classes == len(names) else None
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        paths, images = [], []
        for path in args.images[start:start + args.batch_size]:
            try:
                images.append(load_image(path))
                paths.append(path)
            except Exception as err:  # one line per unreadable image; the others still get their results
                print(f"error: {_describe(err, path)}", file=sys.stderr, flush=True)
                failed += 1
        if not images:
            continue
        with torch.inference_mode():
            conv_logits, trans_logits = model(torch.stack(images).to(device))
            top = (conv_logits + trans_logits).float().softmax(-1).topk(args.top_k, dim=-1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            print(path)
            for p, i in zip(values, indices):
                print(f"  {p * 100:6.2f}%  {i:4d}" + (f"  {classes[i]}" if classes else ""))
    if failed:
        _progress(f"{failed} of {len(args.images)} image(s) could not be read")
    return 1 if failed else 0


def _describe(err: BaseException, path: str | None = None) -> str:
    """An error as one line: an OS error as 'file: reason' (without the errno), any other as its
    text, after ``path`` when given."""
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else path
        return f"{where}: {err.strerror}" if where is not None else err.strerror
    text = str(err) or type(err).__name__
    return f"{path}: {text}" if path is not None and str(path) not in text else text


def _int_between(low: int, high: int = 2 ** 31 - 1) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (the upper bound keeps sizes and seeds within
    what torch takes, so a huge value is refused here in one line)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a usage error as one ``error:`` line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastconformer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastconformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    devices = ["auto", "cpu", "cuda"]
    positive = _int_between(1)
    seed = _int_between(0, 2 ** 63 - 1)  # what torch.manual_seed takes

    sub.add_parser("info", help="variants, parameter counts, device and Triton availability").set_defaults(
        func=cmd_info)

    bench = sub.add_parser("bench", help="reference vs fast throughput and logits error, same weights")
    bench.add_argument("--model", default=None,
                       help=f"variant (default: the one --pretrained holds, else {DEFAULT_MODEL})")
    bench.add_argument("--batch-size", type=positive, default=8)
    bench.add_argument("--image-size", type=positive, default=224, help="a multiple of the patch size (default 224)")
    bench.add_argument("--device", choices=devices, default="auto")
    bench.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="fp32 (default); fp16/bf16 run under torch.autocast, as the official evaluation did")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    bench.add_argument("--pretrained", default=None,
                       help="checkpoint file, save_pretrained folder or hf-hub:ORG/REPO (default: random weights)")
    bench.add_argument("--iters", type=positive, default=10,
                       help="interleaved rounds at least, each timing every model once (default 10)")
    bench.add_argument("--min-seconds", type=_seconds, default=3.0,
                       help="time each model at least this long in all (default 3)")
    bench.add_argument("--seed", type=seed, default=0)
    bench.add_argument("--json", default=None, help="write the results to this JSON file")
    bench.add_argument("--keep-freed-memory", action="store_true",
                       help="first call fastconformer.keep_freed_memory(), as the README's Deploy on CPU advises for "
                            "serving: glibc's malloc keeps the memory a forward frees for the next one (the header "
                            "and JSON say which allocator settings were timed)")
    bench.add_argument("--engines", action="store_true",
                       help="on the CPU: also torch.compile of both models, and ONNX Runtime and OpenVINO (where "
                            "installed) on both models' ONNX exports, fp32 and bf16, in one interleaved run (so "
                            "without --dtype and --compile)")
    bench.set_defaults(func=cmd_bench)

    check = sub.add_parser("check", help="equality checks of every fused module and the whole model here")
    check.add_argument("--device", choices=devices, default="auto")
    check.add_argument("--seed", type=seed, default=0)
    check.add_argument("--only", default=None, help="run only the checks whose name contains this text")
    check.set_defaults(func=cmd_check)

    predict = sub.add_parser("predict", help="top-5 classes for images (ImageNet names for 1000-class heads)")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--pretrained", required=True,
                         help="checkpoint file, save_pretrained folder or hf-hub:ORG/REPO")
    predict.add_argument("--model", default=None, help="variant (default: the one --pretrained holds)")
    predict.add_argument("--device", choices=devices, default="auto")
    predict.add_argument("--top-k", type=positive, default=5,
                         help="classes per image, at most the model's number of classes (default 5)")
    predict.add_argument("--batch-size", type=positive, default=16, help="images per forward pass (default 16)")
    predict.add_argument("--reference", action="store_true", help="use the reference model instead of the fast one")
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="ONNX file of a model, verified in ONNX Runtime and OpenVINO")
    export.add_argument("model", help="variant, e.g. conformer_small_patch16")
    export.add_argument("output", help="the .onnx file to write")
    export.add_argument("--fast", action="store_true",
                        help="export the fast model's algebra (pool-first squeeze, folded BatchNorm)")
    export.add_argument("--pretrained", default=None,
                        help="checkpoint file, save_pretrained folder or hf-hub:ORG/REPO (default: random weights)")
    export.add_argument("--image-size", type=positive, default=224, help="a multiple of the patch size (default 224)")
    export.add_argument("--batch", type=positive, default=1, help="the batch size traced (default 1)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch")
    export.set_defaults(func=cmd_export)
    return parser


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocation that failed or could not be sized: torch.OutOfMemoryError
    (CUDA), the CPU allocator's RuntimeError, or a storage size beyond 64 bits."""
    text = str(err)
    return (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text
            or "size calculation overflowed" in text)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse's usage errors exit with status 2).
    The errors a user's arguments, files or environment can cause (a missing optional extra such as
    huggingface_hub for hf-hub: weights, a wrong FASTCONFORMER_BACKEND, FASTCONFORMER_BACKEND=triton
    without a GPU included) and sizes too large to allocate end as one ``error:`` line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        check_environment()
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`fastconformer info | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except (ValueError, TypeError, OSError, CheckpointMismatchError, ImportError, BackendUnavailableError) as err:
        print(f"error: {_describe(err)}", file=sys.stderr)
        return 2
    except ExportError as err:  # the export ran, and its file failed verification (or could not be made)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"error: out of memory ({first}); expected sizes (batch, image size) whose tensors fit this "
              "machine's memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
