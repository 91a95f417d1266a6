"""ONNX export of the reference and of the fast model, verified in the engines that will run it.

:func:`export_onnx` writes one ONNX file with torch's recommended exporter
(``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``): input ``images``
(B, 3, H, W) float32, the model's outputs in its order, named by :func:`output_names`
(``conv_logits`` and ``trans_logits`` (B, num_classes) float32 for a classifier; ``stride4`` ...
for the maps of a ``features_only`` backbone), and by default a dynamic batch dimension. A fast
model exports the algebra of its PyTorch path (pool-first squeeze, expand at token resolution,
BatchNorm folded into the convolutions), as standard ``ai.onnx`` operators only: no Triton, no
oneDNN-internal op (see :func:`fastconformer.dispatch.exporting`).

Verification (on by default): the file runs in ONNX Runtime and in OpenVINO (fp32, each where
installed), on random inputs of another batch size than the traced one when the batch is dynamic,
and every output must be within :data:`EXPORT_TOL` relative error of the model computed in float64
from the same weights; otherwise :class:`ExportError` names the engine, the output and the error.

``pip install "fastconformer[export]"`` brings onnx, onnxscript, onnxruntime and openvino.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .dispatch import backend
from .onednn_graph import OneDNNGraph
from .reference import ConformerFeatures
from .testing import rel_error

__all__ = ["ENGINES", "EXPORT_TOL", "OUTPUT_NAMES", "ExportError", "Verification", "check_writable",
           "engine_runner", "export_onnx", "missing_engines", "onnx_op_histogram", "output_names",
           "require_export_packages", "verify_onnx"]

EXPORT_TOL = 1e-5
INPUT_NAME = "images"
OUTPUT_NAMES = ("conv_logits", "trans_logits")  # a classifier's outputs
# The inference engines an export is verified in (and ``bench --engines`` times), by their module.
ENGINES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
# ONNX's own operator set; anything else (a custom domain) would tie the file to one runtime.
STANDARD_DOMAINS = ("", "ai.onnx")
_EXTRA = 'pip install "fastconformer[export]"'


class ExportError(RuntimeError):
    """The export could not be made, or the file it wrote does not compute the model."""


@dataclasses.dataclass(frozen=True)
class Verification:
    """One engine's check of an exported file: relative error of each output vs float64."""

    engine: str
    batch: int
    errors: dict[str, float]

    @property
    def error(self) -> float:
        return max(self.errors.values())

    def __str__(self) -> str:
        per_output = ", ".join(f"{name} {err:.2e}" for name, err in self.errors.items())
        return f"{self.engine} (fp32, batch {self.batch}): rel. error {per_output} <= {EXPORT_TOL:.0e}: ok"


def missing_engines() -> dict[str, str]:
    """{engine: why it cannot run here} for the engines of :data:`ENGINES` that are not installed."""
    return {engine: f"{module} is not installed ({_EXTRA})" for engine, module in ENGINES.items()
            if importlib.util.find_spec(module) is None}


def require_export_packages(verify: bool = True) -> None:
    """ImportError naming what is missing unless onnx and onnxscript (the exporter's) are installed
    and, for ``verify``, at least one engine of :data:`ENGINES`."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: {_EXTRA}")
    if verify and len(missing_engines()) == len(ENGINES):
        raise ImportError(f"verifying an export needs onnxruntime or openvino: {_EXTRA} (from Python, "
                          "export_onnx(..., verify=False) writes the file unverified)")


def onnx_op_histogram(path: str | os.PathLike) -> dict[str, int]:
    """{"domain:op_type" ("ai.onnx" for the standard domain): count} over the nodes of an ONNX
    file's main graph and local functions, most frequent first."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        key = f"{node.domain or 'ai.onnx'}:{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def engine_runner(engine: str, path: str | os.PathLike, *, precision: str = "fp32",
                  threads: int | None = None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A callable running the ONNX file in ``engine`` ("onnxruntime" or "openvino") on the CPU:
    images (B, 3, H, W) float32 array -> the file's outputs (float32 arrays, in the file's order).

    precision: "fp32" (both engines; OpenVINO's inference precision hint f32, so it computes in
    fp32 on CPUs that have bf16 too) or "bf16" (OpenVINO only: its bf16 inference precision hint).
    threads: intra-op threads (default: torch's)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    if precision not in ("fp32", "bf16") or (engine == "onnxruntime" and precision != "fp32"):
        raise ValueError(f"{engine} runs precision 'fp32'{' or bf16' if engine == 'openvino' else ''}, "
                         f"got {precision!r}")
    missing = missing_engines().get(engine)
    if missing:
        raise ImportError(missing)
    threads = threads or torch.get_num_threads()
    if engine == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {INPUT_NAME: images})
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(os.fspath(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(images: np.ndarray) -> list[np.ndarray]:
        result = request.infer({INPUT_NAME: images})
        return [result[o].copy() for o in outputs]

    return run


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The names an export gives ``model``'s outputs, in order: one per map of a ``features_only``
    backbone, by its stride (``stride4``, ``stride8``, ...; ``block3_stride4`` ... when two maps
    share a stride); ``conv_features`` and ``trans_features`` for a model built with
    ``num_classes=0`` (its heads' inputs); else :data:`OUTPUT_NAMES`. A :class:`OneDNNGraph`
    exports its model (it runs eagerly while exporting)."""
    if isinstance(model, OneDNNGraph):
        model = model.model
    if not isinstance(model, ConformerFeatures):
        return ("conv_features", "trans_features") if getattr(model, "num_classes", None) == 0 else OUTPUT_NAMES
    reductions, blocks = model.feature_info.reduction(), model.feature_info.out_indices
    if len(set(reductions)) == len(reductions):
        return tuple(f"stride{reduction}" for reduction in reductions)
    return tuple(f"block{block}_stride{reduction}" for block, reduction in zip(blocks, reductions))


def _fold_weight_arithmetic(program) -> None:
    """Fold what the graph computes from the weights alone (the BatchNorm folding of the fast model,
    weight transposes and reshapes) into initializers, in place: the exporter's optimizer folds
    only tensors up to 8192 elements. The same float32 arithmetic, done once in the file."""
    import onnxscript.optimizer

    program.model = onnxscript.optimizer.optimize(program.model, input_size_limit=2**40, output_size_limit=2**40)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape) \
            or shape[1] != 3:
        raise ValueError(f"input_shape must be (B, 3, H, W) with positive ints, got {input_shape!r}")
    return shape


def check_writable(path: str, what: str) -> None:
    """ValueError naming ``what`` (e.g. ``"--json"``) unless a file can be written at ``path``: a
    non-empty path, not a folder, in a folder that exists, with permission to write the file (an
    existing one, not opened: a FIFO would block) or to create it there (tried, with O_EXCL, and
    removed again; a dangling symbolic link is judged by its target's folder, never created)."""
    if not os.fspath(path):
        raise ValueError(f"{what}: the path is empty; expected a file path")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; expected a file path")
    target = os.path.realpath(path)  # a symbolic link's target: what writing creates or overwrites
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r}: the folder {folder!r} does not exist")
    try:
        os.stat(path)  # follows links, and honours a trailing slash (a file is not a folder)
    except FileNotFoundError:
        pass
    except OSError as error:  # a link loop, a file named as a folder
        raise ValueError(f"{what} {path!r}: cannot be written ({error.strerror or error})") from None
    else:
        if not os.access(target, os.W_OK):
            raise ValueError(f"{what} {path!r}: no permission to write there")
        return
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path!r}: no permission to write there")
    if os.path.lexists(path):
        return  # a dangling link: its target's folder takes files
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as error:
        raise ValueError(f"{what} {path!r}: cannot be written ({error.strerror or error})") from None
    os.remove(path)


@contextlib.contextmanager
def _ieee_fp32_legacy_flags():
    """IEEE float32 (TF32 off) for CUDA matmuls and cuDNN, set through torch's legacy ``allow_tf32``
    flags inside the block, every TF32 setting restored after. torch.export reads the legacy flags,
    which raise once the newer ``fp32_precision`` API has set cuDNN's conv and RNN precision (as
    :func:`fastconformer.testing.tf32` does on torch >= 2.9); no effect on CPU arithmetic."""
    b = torch.backends
    new_api = [s for s in (b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul) if hasattr(s, "fp32_precision")]
    saved = [(s, s.fp32_precision) for s in new_api] if new_api else [
        (s, s.allow_tf32) for s in (b.cudnn, b.cuda.matmul)]
    try:
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
        yield
    finally:
        for switch, value in saved:  # parents before children: cudnn before its conv and rnn
            setattr(switch, "fp32_precision" if new_api else "allow_tf32", value)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines (stdout), warnings and its log lines about torchvision ops it
    skips, silenced inside the block (a failure still raises)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block, every submodule's training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def _float64_outputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs for ``images`` computed in float64 from the same weights (a copy in eval
    mode, as exported, on the CPU, through the PyTorch implementations: the reference algebra in
    float64)."""
    with torch.inference_mode(), backend("torch"):
        return list(copy.deepcopy(model).cpu().double().eval()(images.double()))


def verify_onnx(path: str | os.PathLike, model: nn.Module, input_shape: Sequence[int]) -> list[Verification]:
    """Run the ONNX file in each installed engine of :data:`ENGINES` (fp32, CPU) on random images of
    ``input_shape`` (B, 3, H, W) and compare each output with ``model`` computed in float64 from the
    same weights: one :class:`Verification` per engine, or :class:`ExportError` naming the engine,
    the output and its relative error when one exceeds :data:`EXPORT_TOL` (or the engine fails)."""
    path, shape = os.fspath(path), _check_input_shape(input_shape)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact, names = _float64_outputs(model, images), output_names(model)
    results = []
    for engine in ENGINES:
        if engine in missing_engines():
            continue
        try:
            outputs = engine_runner(engine, path)(images.numpy())
        except Exception as err:  # the engine refused the file: that is what verification is for
            raise ExportError(f"{engine} could not run {path}: {str(err).strip().splitlines()[0]}") from err
        if len(outputs) != len(exact):
            raise ExportError(f"export verification failed: {path} has {len(outputs)} outputs, the model "
                              f"{len(exact)}")
        errors = {name: rel_error(torch.from_numpy(out), ref) for name, out, ref in zip(names, outputs, exact)}
        for name, err in errors.items():
            if not err <= EXPORT_TOL:
                raise ExportError(f"export verification failed: {engine} output {name} has relative error "
                                  f"{err:.2e} vs the float64 model (limit {EXPORT_TOL:.0e}, batch {shape[0]})")
        results.append(Verification(engine, shape[0], errors))
    return results


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_shape: Sequence[int] = (1, 3, 224, 224),
                dynamic_batch: bool = True, verify: bool = True) -> list[Verification]:
    """Write ``model`` (the reference or the fast model, float32) as ONNX to ``path``.

    input_shape: (B, 3, H, W) the graph is traced for; H and W must suit the model (multiples of
    the patch size). dynamic_batch: the batch dimension stays symbolic (traced with B = 2 when
    B = 1, since torch.export specialises a size of 1); else the file takes exactly B images.
    verify: run the file in ONNX Runtime and OpenVINO (those installed; at least one must be) and
    raise :class:`ExportError` unless each output is within :data:`EXPORT_TOL` of the float64 model.
    The model is traced in eval mode (its modules' training flags are restored afterwards), under
    IEEE float32 (TF32 off; restored afterwards) and the PyTorch implementations of the fused ops.

    Returns the verifications made, one per engine (empty when ``verify`` is False). Raises
    ImportError without the export extra, ValueError for a wrong model, shape or path, ExportError
    when the exporter fails, the graph holds a non-standard operator or verification fails."""
    path = os.fspath(path)
    shape = _check_input_shape(input_shape)
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx takes the model (an nn.Module), got {type(model).__name__}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export_onnx exports float32 models; call model.float() first")
    check_writable(path, "the ONNX file")
    require_export_packages(verify)
    device = next(model.parameters()).device
    traced = (max(shape[0], 2) if dynamic_batch else shape[0], *shape[1:])
    example = torch.randn(traced, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with _eval_mode(model), _ieee_fp32_legacy_flags(), backend("torch"), _quiet_exporter():
        with torch.no_grad():
            model(example[:1])  # the model's own input checks, as one line, before the exporter's long report
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=list(output_names(model)), dynamic_shapes=dynamic_shapes,
                                        verbose=False)
            _fold_weight_arithmetic(program)
            program.save(path, external_data=False)
        except Exception as err:
            cause = err
            while cause.__cause__ is not None:  # the exporter wraps the error that stopped it
                cause = cause.__cause__
            raise ExportError(f"torch.onnx.export failed: {type(cause).__name__}: "
                              f"{(str(cause).strip() or '?').splitlines()[0]}") from err
        custom = sorted({op for op in onnx_op_histogram(path) if op.split(":")[0] not in STANDARD_DOMAINS})
        if custom:
            raise ExportError(f"the exported graph holds non-standard operators {custom}; expected ai.onnx only")
        if not verify:
            return []
        verified = (traced[0] + 1 if dynamic_batch else shape[0], *shape[1:])  # another batch than traced
        return verify_onnx(path, model, verified)
