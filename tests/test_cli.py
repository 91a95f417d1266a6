"""The command line, end to end at small sizes."""

import json

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer import dispatch
from fastconformer.cli import main
from fastconformer.testing import saved_activation_bytes, to_float64
from fastconformer.validation import CHECKS


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "conformer_base_patch16" in out and "83,289,136" in out


def test_bench_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "conformer_tiny_patch16", "--batch-size", "1", "--iters", "1",
                 "--min-seconds", "0", "--device", "cpu", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "images/s" in captured.out and "fast" in captured.out
    assert "warm-up" in captured.err  # progress feedback
    result = json.loads(path.read_text())
    assert [r["impl"] for r in result["results"]] == ["reference", "fast"]
    assert result["results"][1]["rel_error_vs_reference"] < 1e-4


@pytest.mark.slow
def test_check_default_run_passes(capsys):
    """The real default `fastconformer check`: every check, on every backend that runs here (torch,
    and triton under the interpreter), in float32 and float16. The expand row failed before
    (to_float64 called .detach() on its ints H and W)."""
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    backends = ["torch"] + (["triton"] if dispatch.triton_available() and dispatch.interpreter_enabled() else [])
    rows = [line for line in out.splitlines() if line.endswith("  pass")]
    assert len(rows) == len(CHECKS) * len(backends) * 2
    assert {row.split()[-5] for row in rows} == set(backends)
    assert "FAIL" not in out and out.rstrip().endswith("all checks passed")


def test_check_reports_a_pass_table(capsys):
    assert main(["check", "--device", "cpu", "--only", "expand"]) == 0
    out = capsys.readouterr().out
    assert "expand (FCUUp, S block 2)" in out and "all checks passed" in out and "FAIL" not in out


def test_testing_helpers_take_non_tensor_inputs():
    """The helpers check feeds a module's inputs through pass non-tensors along (FCUUp takes H, W)."""
    x = torch.randn(2, 3, requires_grad=True)
    assert to_float64((x, 14, None))[1:] == (14, None) and to_float64(x).dtype == torch.float64

    class Scaled(nn.Module):
        def forward(self, scale, x):
            return x.sin() * scale

    assert saved_activation_bytes(Scaled(), 2.0, x) == x.untyped_storage().nbytes()  # sin saves its input


def test_check_rejects_unknown_filter():
    with pytest.raises(ValueError, match="no check name contains"):
        main(["check", "--device", "cpu", "--only", "nonexistent"])


def test_predict_top5(tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    image = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(image)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": fastconformer.create_model("conformer_tiny_patch16").state_dict()}, ckpt)
    assert main(["predict", str(image), "--pretrained", str(ckpt), "--model", "conformer_tiny_patch16",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 6 and lines[1].strip().endswith(
        fastconformer.data.imagenet_classes()[int(lines[1].split()[1])])


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["bench", "--batch-size", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "fp64"])
