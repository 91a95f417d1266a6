"""ONNX export (``fastconformer.export``, ``fastconformer export``, ``bench --engines``): the
reference and the fast model, at 224 with a dynamic batch and at 256x320 with a static one, verified
in ONNX Runtime and OpenVINO against the float64 model; standard operators only; the fast export
keeps the fast algebra; a file that does not compute the model fails verification.

The tiny variant at depth 3 (stem, one stride-2 fusion block, the last-fusion block): every kind of
block the deeper models repeat, and each export takes seconds instead of minutes."""

import copy
import importlib.util
import json
import os

import pytest
import torch

for _package in ("onnx", "onnxscript", "onnxruntime", "openvino"):
    pytest.importorskip(_package, reason=f"ONNX export tests need {_package}: pip install 'fastconformer[export]'")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

import fastconformer  # noqa: E402
from fastconformer import cli, export_onnx  # noqa: E402
from fastconformer.environment import timing_environment  # noqa: E402
from fastconformer.export import (EXPORT_TOL, OUTPUT_NAMES, ExportError, onnx_op_histogram, output_names,  # noqa: E402
                                  verify_onnx)
from fastconformer.testing import reference_and_fast  # noqa: E402

MODEL = "conformer_tiny_patch16"
DEPTH = 3
# name: (model, input_shape traced, dynamic batch)
EXPORTS = {"reference-224-dynamic": ("reference", (1, 3, 224, 224), True),
           "fast-224-dynamic": ("fast", (1, 3, 224, 224), True),
           "fast-256x320-static": ("fast", (2, 3, 256, 320), False)}


@pytest.fixture(scope="module")
def models():
    """(reference, fast): random weights and BatchNorm statistics, the same in both."""
    return dict(zip(("reference", "fast"), reference_and_fast(MODEL, depth=DEPTH)))


def _tf32_state():
    b = torch.backends
    return [getattr(s, "fp32_precision", None) for s in (b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul)]


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory, once_per_run):
    """{name: the export of each EXPORTS entry}; each model is in train mode before its export,
    which must restore that and the TF32 settings. Made once per run (and shared by pytest-xdist's
    workers), with the models in it."""
    return once_per_run("onnx_exports", lambda: _export_all(models, tmp_path_factory.mktemp("onnx")))


def _export_all(models, folder):
    made = {}
    for name, (kind, shape, dynamic) in EXPORTS.items():
        model = models[kind]
        model.train()
        tf32_before = _tf32_state()
        verifications = export_onnx(model, folder / f"{name}.onnx", input_shape=shape, dynamic_batch=dynamic)
        restored = model.training and all(m.training for m in model.modules()) and _tf32_state() == tf32_before
        model.eval()
        made[name] = dict(kind=kind, shape=shape, dynamic=dynamic, model=model, path=folder / f"{name}.onnx",
                          verifications=verifications, restored=restored)
    return made


@pytest.fixture(params=list(EXPORTS))
def exported(request, exports):
    return exports[request.param]


def test_export_is_verified_in_both_engines(exported):
    assert [v.engine for v in exported["verifications"]] == ["onnxruntime", "openvino"]
    batch = 3 if exported["dynamic"] else exported["shape"][0]  # a dynamic export is checked at another batch
    for verification in exported["verifications"]:
        assert verification.batch == batch
        assert set(verification.errors) == set(OUTPUT_NAMES)
        assert verification.error <= EXPORT_TOL, str(verification)
    assert exported["restored"], "export_onnx must restore the training flags and the TF32 settings"


def test_graph_is_standard_onnx_with_declared_inputs_and_outputs(exported):
    histogram = onnx_op_histogram(exported["path"])
    assert all(op.startswith("ai.onnx:") for op in histogram), histogram
    graph = onnx.load(exported["path"]).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == list(exported["shape"][1:])
    if exported["dynamic"]:
        assert dims[0].dim_param and not dims[0].dim_value
    else:
        assert dims[0].dim_value == exported["shape"][0]


def test_batch_sizes_in_onnxruntime(exported, models):
    """A dynamic export runs any batch (1 and 4 here, the trace used 2); a static one only its own."""
    session = onnxruntime.InferenceSession(str(exported["path"]), providers=["CPUExecutionProvider"])
    _, _, H, W = exported["shape"]
    for batch in (1, 4) if exported["dynamic"] else (exported["shape"][0],):
        images = torch.randn(batch, 3, H, W)
        outputs = session.run(list(OUTPUT_NAMES), {"images": images.numpy()})
        assert [o.shape for o in outputs] == [(batch, 1000)] * 2
    if not exported["dynamic"]:
        with pytest.raises(Exception):
            session.run(list(OUTPUT_NAMES), {"images": torch.randn(1, 3, H, W).numpy()})


def _squeeze_convs_before_pooling(path) -> int:
    """How many AveragePool nodes read a convolution's output (the reference's squeeze: conv at full
    resolution, then pool; the fast one pools first)."""
    graph = onnx.load(path).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return sum(producer.get(node.input[0]) == "Conv" for node in graph.node if node.op_type == "AveragePool")


def test_fast_export_keeps_the_fast_algebra(exported):
    """Pool-first squeeze and folded BatchNorm in the fast export; the reference export pools after
    its squeeze convolutions."""
    histogram = onnx_op_histogram(exported["path"])
    assert "ai.onnx:BatchNormalization" not in histogram
    if exported["kind"] == "fast":
        assert _squeeze_convs_before_pooling(exported["path"]) == 0
    else:
        assert _squeeze_convs_before_pooling(exported["path"]) >= 1


def test_verification_fails_for_a_file_that_is_not_the_model(exports):
    """The same file checked against other weights: ExportError naming the engine, output and error."""
    exported = exports["fast-224-dynamic"]
    other = copy.deepcopy(exported["model"])
    with torch.no_grad():
        other.trans_cls_head.weight.mul_(1.01)
    with pytest.raises(ExportError, match=r"onnxruntime output trans_logits has relative error .* \(limit 1e-05"):
        verify_onnx(exported["path"], other, (2, 3, 224, 224))


def test_feature_backbone_exports_and_verifies_every_map(tmp_path):
    """A features_only model's maps, each named by its stride and each verified (a wrong one fails;
    the model is in train mode, verification compares with it in eval mode, as exported)."""
    features = fastconformer.create_model(MODEL, features_only=True, depth=DEPTH, out_indices=(0, 1, 2))
    fast = fastconformer.convert(copy.deepcopy(features))
    names = output_names(features)
    assert names == ("stride4", "stride8", "stride32")
    path = tmp_path / "features.onnx"
    verifications = export_onnx(fast, path, input_shape=(1, 3, 256, 256))
    assert [o.name for o in onnx.load(path).graph.output] == list(names)
    assert verifications and all(list(v.errors) == list(names) and v.error <= EXPORT_TOL for v in verifications)
    with torch.no_grad():
        fast.conv_trans_3.fusion_block.bn3.bias.add_(0.1)  # only the last map's block
    with pytest.raises(ExportError, match="output stride32 has relative error"):
        verify_onnx(path, fast, (2, 3, 256, 256))
    two_at_stride4 = fastconformer.create_model(MODEL, features_only=True, depth=6, out_indices=(0, 1, 5))
    assert output_names(two_at_stride4) == ("block0_stride4", "block1_stride4", "block5_stride32")
    assert output_names(fastconformer.onednn_graph(features)) == names


def test_model_without_heads_exports_its_pooled_features(tmp_path):
    model = fastconformer.create_model(MODEL, depth=DEPTH, num_classes=0, fast=True)
    verifications = export_onnx(model, tmp_path / "pooled.onnx", dynamic_batch=False)
    assert all(list(v.errors) == ["conv_features", "trans_features"] for v in verifications)
    session = onnxruntime.InferenceSession(str(tmp_path / "pooled.onnx"), providers=["CPUExecutionProvider"])
    assert [o.shape for o in session.run(None, {"images": torch.randn(1, 3, 224, 224).numpy()})] == [(1, 256), (1, 384)]


def test_export_onnx_rejects_wrong_arguments(models, tmp_path):
    model = models["reference"]
    with pytest.raises(ValueError, match="input_shape must be"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 224, 224))
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="float32"):
        export_onnx(copy.deepcopy(model).double(), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="multiple"):  # the model's own check, before any tracing
        export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 3, 100, 100))
    assert not (tmp_path / "m.onnx").exists()


def run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def shallow_models(monkeypatch):
    """The CLI builds the tiny model at DEPTH (its exports take seconds)."""
    create_model = cli.create_model
    monkeypatch.setattr(cli, "create_model", lambda name, **kwargs: create_model(name, depth=DEPTH, **kwargs))


def test_cli_export_writes_and_verifies(shallow_models, tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    status, out, err = run(["export", MODEL, str(path), "--image-size", "64", "--batch", "2", "--static-batch"],
                           capsys)
    assert status == 0, err
    assert "verified: onnxruntime (fp32, batch 2)" in out and "verified: openvino (fp32, batch 2)" in out
    assert "outputs conv_logits and trans_logits" in out  # the names the file gives them (export.output_names)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.shape for o in session.run(None, {"images": torch.randn(2, 3, 64, 64).numpy()})] == [(2, 1000)] * 2


@pytest.mark.parametrize("argv, message", [
    (["export", "conformer_huge", "{out}"], "unknown model 'conformer_huge'"),
    (["export", MODEL, "{out}", "--image-size", "100"], "--image-size must be a positive multiple of"),
    (["export", MODEL, "/no/such/folder/m.onnx"], "does not exist"),
    (["export", MODEL, "{out}", "--image-size", "0"], "expected an integer in [1, 2147483647]"),
    (["export", MODEL, ""], "the path is empty"),
    (["export", MODEL, "/proc/m.onnx"], "/proc/m.onnx"),  # an existing folder where no file can be made
])
def test_cli_export_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{out}", str(tmp_path / "m.onnx")) for a in argv]
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_cli_export_without_the_extra(monkeypatch, tmp_path, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnxscript"
                        else find_spec(name, *args))
    status, _, err = run(["export", MODEL, str(tmp_path / "m.onnx")], capsys)
    assert status == 2 and err.startswith("error: ONNX export needs onnxscript") and err.count("\n") == 1


def test_bench_engines_rows(shallow_models, monkeypatch, tmp_path, capsys):
    """Every engine's row, fp32 and bf16, with its error; torch.compile is replaced by the identity
    here (it is tested in test_compile.py; compiling would dominate this test's time)."""
    monkeypatch.setattr(torch, "compile", lambda model: model)
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: True)  # the real one changes this process for good
    path = tmp_path / "engines.json"
    status, out, err = run(["bench", "--engines", "--model", MODEL, "--batch-size", "1", "--image-size", "64",
                            "--iters", "1", "--min-seconds", "0", "--device", "cpu", "--keep-freed-memory",
                            "--json", str(path)], capsys)
    assert status == 0, err
    result = json.loads(path.read_text())
    rows = {r["impl"]: r for r in result["results"]}
    assert list(rows) == ["reference", "fast", "fast prepacked", "fast oneDNN graph", "compile(reference)",
                          "compile(fast)", "onnxruntime(reference)", "onnxruntime(fast)", "openvino(reference)",
                          "openvino(fast)", "reference bf16", "fast bf16", "fast prepacked bf16",
                          "fast oneDNN graph bf16", "compile(reference) bf16", "compile(fast) bf16",
                          "openvino(reference) bf16", "openvino(fast) bf16"]
    for label, row in rows.items():
        bound = 1e-4 if row["precision"] == "fp32" else 0.1
        assert row["rel_error_vs_float64"] <= bound, (label, row["rel_error_vs_float64"])
        assert 0.0 <= row["top1_agreement"] <= 1.0 and (row["precision"] != "fp32" or row["top1_agreement"] == 1.0)
        assert row["speedup"] > 0 and label in out
    assert rows["reference"]["speedup"] == rows["reference"]["speedup_per_round"] == 1.0
    assert "skipped: onnxruntime bf16" in out
    assert not any("served by a graph" in warning for warning in result["warnings"])
    assert set(result["load_average"]) == {"before", "after"} and result["versions"]["openvino"] != "not installed"
    assert result["environment"] == timing_environment() and result["malloc"] == "keep_freed_memory()"
    assert "; malloc: keep_freed_memory(); environment: " in out.splitlines()[0]
    assert all(k in os.environ for k in result["environment"])


def test_top1_agreement_counts_images_and_heads():
    exact = [torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    assert cli._top1_agreement([e.float() for e in exact], exact) == 1.0
    assert cli._top1_agreement([exact[0].numpy(), torch.tensor([[0.0, 1.0], [0.0, 1.0]])], exact) == 0.75
