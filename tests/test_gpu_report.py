"""``python -m benchmarks.gpu_report`` (run from the checkout's root): the CPU flow end to end
(``--device cpu --quick`` into a temporary folder, checking report.json and summary.md), and the
pieces the GPU run relies on that can be checked without one: the plan's priorities and budget,
the default paths, pytest output parsing, goal evaluation (met / not met / not measured) and the
Markdown tables."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu_report
from fastconformer.environment import device_slug

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, once_per_run):
    def run():
        # a budget the kernel rows fit in on a loaded 2-core machine too (they come first; model rows fill the rest)
        out = tmp_path_factory.mktemp("gpu_report")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--device", "cpu", "--quick",
                               "--out", str(out), "--budget", "20"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out, proc

    return once_per_run("gpu_report_cpu_run", run)


def test_cpu_quick_run_writes_json_and_markdown(cpu_run):
    out, proc = cpu_run
    report = json.loads((out / "report.json").read_text())
    summary = (out / "summary.md").read_text()
    assert proc.stdout == summary  # the summary is printed; progress went to stderr
    assert "[gpu_report" in proc.stderr and "[gpu_report" not in proc.stdout

    assert set(report) >= {"environment", "pytest", "roofline", "kernels", "models", "sanitizer", "goals",
                           "elapsed_s", "budget_s"}
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["python"] and env["cpu"]
    assert all(math.isfinite(x) for x in _numbers(report))  # JSON holds no NaN / Infinity
    assert report["pytest"]["status"] == "skipped (--quick)"
    assert report["sanitizer"]["status"] == "skipped: needs CUDA"

    roof = report["roofline"]
    assert roof["copy"]["GB_per_s"] > 0 and {"bf16", "fp32_ieee"} <= set(roof["matmul"])
    assert all(m["TFLOP_per_s"] > 0 for m in roof["matmul"].values())

    ops = {k["op"] for k in report["kernels"]}
    assert ops == {"squeeze fcu_down(+x_t)", "expand fcu_up_expand", "expand bn_relu_add_upsampled", "attention"}
    for k in report["kernels"]:
        assert k["status"] == "ok", k
        assert k["seconds"] > 0 and k["GB_per_s"] > 0 and k["bytes_moved"] > 0
        # the performance model's H100 time for the op's Triton launches at the row's shapes, on the CPU too
        assert 0 < k["predicted_seconds"] < 1e-3 and k["measured_over_predicted"] > 0, k
    attn = next(k for k in report["kernels"] if k["op"] == "attention")
    assert attn["sdpa_best_seconds"] > 0 and "MATH" in attn["sdpa_seconds"]

    rows = report["models"]
    assert rows and all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows), rows
    assert rows[0]["status"] == "ok"  # the first row always runs
    for r in rows:
        if r["status"] == "ok":
            assert r["images_per_s"] > 0 and r["first_call_s"] > 0 and r["batch"] in (1, 2)
    backbone = [r for r in rows if r["model"].startswith("Conformer-Ti backbone")]  # features_only, 64x96
    assert len(backbone) == 2 and all(r["image"] == [64, 96] for r in backbone if r["status"] == "ok")

    goals = report["goals"]
    assert len(goals) == 10 and all(g["status"] == "n/a on CPU" for g in goals)
    assert sum("training step" in g["goal"] for g in goals) == 2
    for heading in ("## Goals", "## Tests", "## Roofline", "## Kernels", "## Models"):
        assert heading in summary
    assert summary.count("n/a on CPU") == 10
    assert "| Conformer-Ti (3 blocks, dim 96) | fp32 | 2 | inference | reference |" in summary
    assert "predicted (µs, H100 model) | measured / predicted |" in summary


def test_plan_puts_goal_rows_first_and_bounds_the_matrix():
    plan = gpu_report.build_plan("cuda", quick=False)
    assert plan.budget_s <= 540 and plan.image_size == 224
    goal_rows = plan.rows[:13]  # eager goal rows, then the compiled ones, before the breadth
    assert all((r["model"], r["dtype"]) == ("Conformer-S", "bf16") and r["batch"] in (64, 128) for r in goal_rows)
    assert {r["impl"] for r in goal_rows} == set(gpu_report.IMPLS)
    assert plan.rows[13]["model"] != "Conformer-S"
    assert [r["impl"] for r in plan.rows[:8]] == ["reference", "fast"] * 4
    autotuned = [r for r in plan.rows if "max-autotune" in r["impl"]]
    assert len(autotuned) == 1  # max-autotune only for Conformer-S batch 64
    keys = [tuple(r.values()) for r in plan.rows]
    assert len(keys) == len(set(keys))
    assert {r["batch"] for r in plan.rows} == {1, 2, 64, 128, 256}
    backbone = "Conformer-S/32 backbone (800x1344)"
    assert {r["model"] for r in plan.rows} == {"Conformer-Ti", "Conformer-S", "Conformer-B", backbone}
    assert [r["impl"] for r in plan.rows[13:15]] == ["reference", "fast"] and plan.rows[13]["model"] == backbone
    assert plan.model_images == {backbone: (800, 1344)} and plan.models[backbone][1] == {"features_only": True}
    cpu = gpu_report.build_plan("cpu", quick=True)
    assert cpu.pytest_args is None and not cpu.sanitizer and {r["batch"] for r in cpu.rows} <= {1, 2}
    assert all(not r["impl"].startswith("compile") for r in cpu.rows)
    with pytest.raises(ValueError, match="device"):
        gpu_report.build_plan("tpu", quick=True)


def test_parse_pytest_counts():
    done = "....s..F\n[100%]\n=== 1 failed, 6 passed, 1 skipped, 2 warnings in 3.21s ==="
    assert gpu_report.parse_pytest_counts(done) == {"failed": 1, "passed": 6, "skipped": 1, "warnings": 2}
    assert gpu_report.parse_pytest_counts("12 passed, 1 error in 0.5s") == {"passed": 12, "errors": 1}
    cut_short = "....sF..  [ 10%]\n..E.\n"  # killed at the time budget: progress characters
    assert gpu_report.parse_pytest_counts(cut_short) == {"passed": 9, "skipped": 1, "failed": 1, "errors": 1}


def _synthetic_report(device):
    models = []
    for batch in (64, 128):
        for mode, impl, ips in (("inference", "reference", 1000.0), ("inference", "fast", 2500.0),
                                ("inference", "compile(reference)", 1800.0),
                                ("inference", "compile(reference, max-autotune)", 2200.0),
                                ("train", "reference", 400.0), ("train", "fast", 500.0)):
            if batch == 128 and "max-autotune" in impl:
                continue
            models.append(dict(model="Conformer-S", dtype="bf16", batch=batch, mode=mode, impl=impl,
                               status="ok", images_per_s=ips, first_call_s=1.0))
    models.append(dict(model="Conformer-S", dtype="bf16", batch=256, mode="train", impl="compile(fast)",
                       status="skipped: time budget (3s left, needs ~45s)"))
    kernels = [dict(op=op, shape="s", status="ok", seconds=1e-5, GB_per_s=gbs, fraction_of_copy_bw=gbs / 3000,
                    TFLOP_per_s=1.0, flops=1, bytes_moved=1, speedup_vs_torch=2.0)
               for op, gbs in (("squeeze fcu_down(+x_t)", 2400.0), ("squeeze fcu_down(+x_t)", 2000.0),
                               ("expand fcu_up_expand", 2500.0), ("expand bn_relu_add_upsampled", 2700.0))]
    kernels.append(dict(op="attention", shape="s", status="ok", seconds=1e-4, GB_per_s=100.0,
                        fraction_of_copy_bw=0.03, TFLOP_per_s=200.0, flops=1, bytes_moved=1,
                        sdpa_seconds={"FLASH_ATTENTION": 1.2e-4, "CUDNN_ATTENTION": "unavailable: no"},
                        sdpa_best_seconds=1.2e-4, speedup_vs_sdpa_best=1.2, sdpa_best_backend="FLASH_ATTENTION"))
    env = dict(device=device, device_name="NVIDIA H100 80GB HBM3", date_utc="2026-01-01 00:00:00", torch="2.11",
               triton="3.6", cuda="12.8", driver_version="570", python="3.12", cpu="x", cpu_count=16)
    return dict(environment=env, models=models, kernels=kernels, budget_s=540.0, elapsed_s=500.0,
                pytest={"status": "passed", "counts": {"passed": 10}, "seconds": 100.0},
                sanitizer={"status": "not found"},
                roofline={"copy": {"GB_per_s": 3000.0}, "matmul": {"bf16": {"n": 8192, "TFLOP_per_s": 700.0}}})


def test_goals_met_and_not_met_on_cuda():
    report = _synthetic_report("cuda")
    goals = {g["goal"]: g for g in gpu_report.evaluate_goals(report)}
    g = goals["inference B=64: fast / reference eager"]
    assert g["value"] == pytest.approx(2.5) and g["status"] == "met"
    g = goals["inference B=64: fast / torch.compile(reference)"]  # against the best compiled variant
    assert g["value"] == pytest.approx(2500 / 2200) and g["status"] == "not met"
    assert "max-autotune" in g["detail"]
    assert goals["inference B=128: fast / torch.compile(reference)"]["status"] == "met"
    assert goals["training step B=64: fast / reference eager"]["status"] == "not met"
    g = goals["squeeze kernel: achieved / copy bandwidth (worst stage)"]
    assert g["value"] == pytest.approx(2000 / 3000) and g["status"] == "not met"
    assert goals["expand GEMM kernel: achieved / copy bandwidth (worst stage)"]["status"] == "met"
    assert goals["attention: SDPA best backend time / fused time"]["status"] == "met"

    del report["models"][:]
    assert {g["status"] for g in gpu_report.evaluate_goals(report)[:6]} == {"not measured"}


def test_markdown_tables():
    report = _synthetic_report("cuda")
    report["goals"] = gpu_report.evaluate_goals(report)
    md = gpu_report.markdown_summary(report)
    assert md.startswith("# fastconformer on NVIDIA H100 80GB HBM3")
    assert "| inference B=64: fast / reference eager | ≥ 2× | 2.50 | met |" in md
    assert "| Conformer-S | bf16 | 64 | inference | fast | 2500.0 | 2.50× | 1.0 | ok |" in md
    assert "skipped: time budget" in md and "not met" in md
    assert "FLASH_ATTENTION 120.0 µs" in md


def test_default_paths_are_the_checkouts(capsys):
    """The report runs the checkout's tests and writes under its benchmarks/results/, wherever the
    package is installed."""
    assert gpu_report.REPO == ROOT and (gpu_report.REPO / "tests" / "conftest.py").is_file()
    with pytest.raises(SystemExit) as exit_:
        gpu_report.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: python -m benchmarks.gpu_report") and "benchmarks/results/" in help_text


def test_device_slug_is_file_name_safe():
    slug = device_slug("cpu")
    assert slug and all(c.isalnum() or c == "-" for c in slug) and slug == slug.lower()
