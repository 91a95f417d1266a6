"""The whole model, forward (inference, eval mode): reference eager vs the fast model vs
``torch.compile(reference)``, same weights and inputs, side by side in one run.

Conformer-S/16 at 224x224; batch 8 fp32 on the CPU, batch 64 under bf16 autocast on a GPU. On
the CPU the fast model also runs with oneDNN's fused linear epilogues switched off
(``fast (no oneDNN)``), to show what they add, and with its linear weights prepacked for oneDNN
(``fast prepacked``, :func:`fastconformer.prepack_weights`), and through oneDNN Graph
(``fast oneDNN graph``, :func:`fastconformer.onednn_graph`: traced per input shape, verified, fused).

On the CPU, the engines a CPU user would pick run beside them (where installed, else skipped with
the reason): ONNX Runtime and OpenVINO on both models' ONNX exports (``fastconformer.export_onnx``,
static batch, verified at export), fp32 in the same group; and a bf16 group: the eager models under
CPU autocast and OpenVINO with its bf16 inference precision hint (ONNX Runtime runs fp32 only).
``fastconformer bench --engines`` times the same rows in interleaved rounds.
"""

import contextlib
import copy
import functools

import pytest
import torch

import fastconformer
from benchmarks.conftest import HAS_CUDA, run_benchmark
from fastconformer.dispatch import onednn
from fastconformer.export import engine_runner, export_onnx, missing_engines, require_export_packages

MODEL = "conformer_small_patch16"
B = 64 if HAS_CUDA else 8
AUTOCAST = torch.bfloat16 if HAS_CUDA else None
CPU_ONLY = ["fast (no oneDNN)", "fast prepacked", "fast oneDNN graph"]
IMPLS = ["reference", "fast", "compile(reference)"] + ([] if HAS_CUDA else CPU_ONLY)


@pytest.fixture(scope="module")
def models(device):
    torch.manual_seed(0)
    reference = fastconformer.create_model(MODEL).eval()
    fast = fastconformer.convert(copy.deepcopy(reference)).to(device)
    reference = reference.to(device)
    return {"reference": reference, "fast": fast, "compile(reference)": torch.compile(reference),
            "fast (no oneDNN)": fast, "fast prepacked": fastconformer.prepack_weights(copy.deepcopy(fast)),
            "fast oneDNN graph": fastconformer.onednn_graph(fast)}


@pytest.mark.parametrize("impl", IMPLS)
def test_model_inference(benchmark, models, device, impl):
    model = models[impl]
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    autocast = (torch.autocast(device.type, dtype=AUTOCAST) if AUTOCAST is not None
                else contextlib.nullcontext())

    def run():
        with torch.inference_mode(), autocast, onednn(impl != "fast (no oneDNN)"):
            return model(x)

    run()  # compile, trace / warm up outside the timing
    assert impl != "fast oneDNN graph" or model.graphs(), "the graph row would time the eager model"
    run_benchmark(benchmark, run, group=f"{MODEL}[B={B},224,{'fp32' if AUTOCAST is None else 'amp-bf16'},eval]",
                  impl=impl, rounds=8, batch=B, images=B)


ENGINE_ROWS = [(engine, model, precision) for engine in ("onnxruntime", "openvino")
               for precision in (("fp32", "bf16") if engine == "openvino" else ("fp32",))
               for model in ("reference", "fast")]


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """Both models as ONNX (batch B, 224x224, static batch), each verified at export."""
    if HAS_CUDA:
        pytest.skip("the engine rows run on the CPU")
    try:
        require_export_packages()
    except ImportError as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("onnx")
    paths = {label: folder / f"{label}.onnx" for label in ("reference", "fast")}
    for label, path in paths.items():
        export_onnx(models[label], path, input_shape=(B, 3, 224, 224), dynamic_batch=False)
    return paths


@pytest.mark.parametrize("engine, model, precision", ENGINE_ROWS)
def test_engine_inference(benchmark, exports, engine, model, precision):
    if engine in missing_engines():
        pytest.skip(missing_engines()[engine])
    run = functools.partial(engine_runner(engine, exports[model], precision=precision),
                            torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1)).numpy())
    run()  # compile / warm up outside the timing
    run_benchmark(benchmark, run, group=f"{MODEL}[B={B},224,{precision},eval]", impl=f"{engine}({model})",
                  rounds=8, batch=B, images=B)


@pytest.mark.parametrize("impl", ["reference", "fast", "fast prepacked", "fast oneDNN graph"])
def test_model_inference_cpu_bf16(benchmark, models, device, impl):
    """The eager models under CPU bf16 autocast: the group the OpenVINO bf16 rows join."""
    if HAS_CUDA:
        pytest.skip("the GPU rows already run bf16 autocast")
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return models[impl](x)

    run()
    assert impl != "fast oneDNN graph" or models[impl].graphs(), "the graph row would time the eager model"
    run_benchmark(benchmark, run, group=f"{MODEL}[B={B},224,bf16,eval]", impl=impl, rounds=8, batch=B, images=B)
