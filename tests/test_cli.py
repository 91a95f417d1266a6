"""The command line, end to end at small sizes."""

import json

import pytest
import torch

import fastconformer
from fastconformer.cli import main


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


def test_check_reports_a_pass_table(capsys):
    assert main(["check", "--device", "cpu", "--only", "squeeze"]) == 0
    out = capsys.readouterr().out
    assert "squeeze (FCUDown, S block 2)" in out and "all checks passed" in out and "FAIL" not in out


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
