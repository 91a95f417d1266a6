"""``python -m benchmarks.cpu_breakdown``: the parsing of oneDNN's verbose lines into kinds, and the
whole tool at a small size (CPU only: it reads oneDNN's verbose output)."""

import json
import os

import pytest
import torch

from benchmarks import cpu_breakdown
from fastconformer.onednn_graph import onednn_graph_available

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not onednn_graph_available(),
                                  reason="needs torch's oneDNN and its oneDNN Graph fuser")
PREFIX = "onednn_verbose,v1,primitive,exec,cpu,"
LINES = {  # verbose lines as this machine's oneDNN 3.12 prints them, trimmed to the fields the parser reads
    PREFIX + "convolution,brgconv_1x1:avx512_core,forward_inference,src:f32::blocked:acdb::f0,attr-scratchpad:user,"
             "alg:convolution_direct,mb8_ic64oc64_ih56oh56kh1sh1dh0ph0_iw56ow56kw1sw1dw0pw0,1.07104":
        ("convolution 1x1", None, 1.07104),
    PREFIX + "convolution,brg_conv_fwd:avx512_core,forward_inference,src:f32::blocked:acdb::f0,attr-scratchpad:user,"
             "alg:convolution_direct,mb8_ic64oc64_ih56oh56kh3sh1dh0ph1_iw56ow56kw3sw1dw0pw1,5.19678":
        ("convolution kxk", None, 5.19678),
    PREFIX + "inner_product,brg_matmul:avx512_core,forward_inference,src:f32::blocked:ab::f0,"
             "attr-scratchpad:user attr-post-ops:eltwise_gelu_erf,,mb1576ic384oc1536,5.68115":
        ("linear", None, 5.68115),
    PREFIX + "matmul,brg_matmul:avx512_core,undef,src:f32::blocked:ab::f0,attr-scratchpad:user,,"
             "1576x384:384x1152,3.21313": ("linear", None, 3.21313),
    PREFIX + "matmul,brg_matmul:avx512_core,undef,src:f32::blocked:ab::f0,attr-scratchpad:user "
             "attr-post-ops:binary_mul:f32:0,,197x64:64x197,0.0390625": ("attention matmul", None, 0.0390625),
    PREFIX + "matmul,brg_matmul:avx512_core,undef,src:f32::blocked:ab::f0,attr-scratchpad:user,,"
             "197x197:197x64,0.0251465": ("attention matmul", None, 0.0251465),
    PREFIX + "softmax,jit:avx512_core_bf16,forward_inference,src:f32::blocked:ab::f0,,alg:softmax_accurate axis:1,"
             "197x197,0.02": ("softmax", None, 0.02),
    PREFIX + "eltwise,jit:avx512_core_bf16,forward_inference,data:f32::blocked:ab::f0,,alg:eltwise_gelu_erf,"
             "1576x1536,0.15": ("other", None, 0.15),
    "onednn_verbose,v1,primitive,create:cache_hit,cpu,convolution,brgconv_1x1:avx512_core,forward_inference,"
    "src:f32,,,mb8,0.01": None,
    "onednn_verbose,v1,info,oneDNN v3.12.0": None,
    # with ONEDNN_VERBOSE_TIMESTAMP=1 a timestamp precedes the marker
    "onednn_verbose,v1,1764790000123.45,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:ab::f0,,,"
    "197x64,0.006": ("reorder", 1764790000123.45, 0.006),
    "some other line, primitive,exec,cpu": None,
}


@pytest.mark.parametrize("line", list(LINES))
def test_primitive_time(line):
    assert cpu_breakdown.primitive_time(line, tokens=197) == LINES[line]


def test_busy_time_merges_what_ran_side_by_side():
    assert cpu_breakdown.busy_time([]) == 0.0
    assert cpu_breakdown.busy_time([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.75), (2.5, 2.75)]) == 4.0


def test_busy_times_per_kind_and_in_all():
    """Two threads' per-head primitives overlap: each kind's time and the total are unions, so the
    total is below the kinds' sum; lines without a start time are refused, not summed."""
    stamp = "onednn_verbose,v1,{start},primitive,exec,cpu,{kind},jit,undef,src,,,{problem},{ms}"
    lines = [stamp.format(start=100.0, kind="matmul", problem="197x64:64x197", ms=2.0),
             stamp.format(start=101.0, kind="matmul", problem="197x64:64x197", ms=2.0),  # the other thread
             stamp.format(start=102.5, kind="softmax", problem="197x197", ms=1.0),  # beside the matmul till 103
             "onednn_verbose,v1,info,oneDNN v3.12.0"]
    times, total = cpu_breakdown.busy_times(lines, tokens=197)
    assert times == {"attention matmul": 3.0, "softmax": 1.0} and total == 3.5
    with pytest.raises(RuntimeError, match="no start time"):
        cpu_breakdown.busy_times([*lines, PREFIX + "softmax,jit,undef,src,,,197x197,1.0"], tokens=197)
    with pytest.raises(RuntimeError, match="no primitive execution"):
        cpu_breakdown.busy_times(lines[-1:], tokens=197)


def test_unavailable_refuses_verbose_mode_set_outside(monkeypatch):
    for name in ("ONEDNN_VERBOSE", "DNNL_VERBOSE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_VERBOSE_TIMESTAMP", "0")  # the tool sets it to 1 where oneDNN reads it
    if torch.backends.mkldnn.is_available() and onednn_graph_available():
        assert cpu_breakdown.unavailable(bf16=False) is None
    monkeypatch.setenv("DNNL_VERBOSE", "1")
    assert cpu_breakdown.unavailable(bf16=False).startswith("unset DNNL_VERBOSE:")


def test_main_ends_a_verbose_format_it_cannot_read_in_one_line(monkeypatch, capsys):
    def unreadable(*args, **kwargs):
        raise RuntimeError("oneDNN's verbose lines carry no start time: ...")

    monkeypatch.setattr(cpu_breakdown, "unavailable", lambda bf16: None)
    monkeypatch.setattr(cpu_breakdown, "breakdown", unreadable)
    assert cpu_breakdown.main(["--rounds", "1"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: oneDNN's verbose lines carry no start time")
    assert "Traceback" not in err


@needs_onednn
def test_onednn_times_restores_stdout():
    """The capture counts a primitive's execution, raises when none ran, and gives file descriptor 1
    back on every path (a forward that raises included)."""
    before = os.fstat(1)
    x, weight = torch.randn(4, 8), torch.randn(16, 8)
    inner_product = torch.ops.mkldnn._linear_pointwise  # always a oneDNN primitive
    times, total = cpu_breakdown.onednn_times(lambda: inner_product(x, weight, None, "none", [], ""), tokens=197)
    assert times.get("linear", 0) > 0 and 0 < total <= sum(times.values()), times
    assert cpu_breakdown.TIMESTAMP not in os.environ  # set only while oneDNN may read it
    with pytest.raises(RuntimeError, match="no primitive execution"):
        cpu_breakdown.onednn_times(lambda: None, tokens=197)
    with pytest.raises(ZeroDivisionError):
        cpu_breakdown.onednn_times(lambda: 1 / 0, tokens=197)
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--image-size", "100"], ["--model", "nope"],
                                  ["--batch-size", "0"], ["--json", "/no/such/folder/out.json"]])
def test_wrong_input(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cpu_breakdown.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@needs_onednn
def test_main_small(capsys, tmp_path):
    assert cpu_breakdown.main(["--model", "conformer_tiny_patch16", "--batch-size", "1", "--image-size", "32",
                               "--rounds", "1", "--json", str(tmp_path / "out.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    header, rows = table[0], {line.split(" | ")[0].strip("| *"): line for line in table[2:]}
    assert header.count("|") == 5 and "fast oneDNN graph" in header
    total = [float(v) for v in rows["oneDNN primitives, total"].strip("| ").split(" | ")[1:]]
    assert all(v > 0 for v in total), table  # every model ran oneDNN primitives, and they were captured
    assert "oneDNN convolution kxk" in rows and "wall" in rows
    saved = json.loads((tmp_path / "out.json").read_text())
    assert set(saved["results"]) == {"fast", "fast prepacked", "fast oneDNN graph"}
    assert all(len(row["wall_ms"]) == 1 for row in saved["results"].values())
    for row in saved["results"].values():  # kinds that ran side by side count once in the total
        assert 0 < row["onednn_total_ms"][0] <= sum(kind[0] for kind in row["onednn_ms"].values()) + 1e-9
    assert "kinds side by side (their sum less the total)" in rows
