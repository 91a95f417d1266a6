"""The performance model (fastconformer.kernels.perf_model): its numbers for launches small enough
to check by hand, that every kernel the workloads launch has a model and a PyTorch counterpart, and
the ``python -m fastconformer.kernels --model`` command line."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fastconformer.kernels import add_layer_norm, compile_matrix, perf_model, record_launches  # noqa: E402
from fastconformer.kernels.perf_model import H100  # noqa: E402


def _add_layer_norm_launch(M, D, dtype, backward=False):
    rows = [torch.empty(M, D, device="meta", dtype=dtype) for _ in range(2)]
    params = [torch.empty(D, device="meta", dtype=dtype) for _ in range(2)]
    with record_launches() as made:
        if backward:
            stats = torch.empty(M, device="meta")
            add_layer_norm.add_layer_norm_backward_op(rows[0], None, rows[1], params[0], stats, stats)
        else:
            add_layer_norm.add_layer_norm_op(*rows, *params, 1e-6, dtype)
    (launch,) = made
    return launch


def test_add_layer_norm_bytes_by_hand():
    """10 fp16 rows of 384: reads x, y (2 x 10 x 384 x 2 B) and the weight and bias (2 x 384 x 2 B),
    writes the sum and the normalised rows (2 x 10 x 384 x 2 B) and fp32 mean and rstd (2 x 10 x 4 B)."""
    p = perf_model.predict(_add_layer_norm_launch(10, 384, torch.float16))
    assert (p.cost.read, p.cost.written) == (2 * 10 * 384 * 2 + 2 * 384 * 2, 2 * 10 * 384 * 2 + 2 * 10 * 4)
    assert p.programs == 10 and p.cost.steps == 1
    assert p.memory_s == pytest.approx((16896 + 15440) / 3.35e12)
    # 10 programs on 132 SMs: one wave, one round trip
    assert p.latency_s == pytest.approx(700e-9) and p.seconds == max(p.memory_s, p.compute_s, p.latency_s)


def test_row_loop_backward_by_hand():
    """M = 64 x 197 bf16 rows of 384: tiles of 4 rows (BLOCK_D 512, 2048-element tiles) on at most
    528 programs: 526 programs of 24 rows, 6 round trips each with 4 rows of grad_out and s (6 KiB)
    in flight. At 64 registers (8 warps: 4 CTAs per SM) all programs are resident at once: latency
    6 x 700 ns, below the HBM time, so HBM-bound."""
    launch = _add_layer_norm_launch(64 * 197, 384, torch.bfloat16, backward=True)
    p = perf_model.predict(launch, perf_model.Resources(64, 4096, "sm_90"))
    assert (p.programs, launch.config.constexprs["BLOCK_R"], launch.config.num_warps) == (526, 4, 8)
    assert (p.cost.steps, p.cost.in_flight) == (6, 4 * 2 * 384 * 2)
    M = 64 * 197
    assert p.cost.read == 2 * M * 384 * 2 + 8 * M + 384 * 2
    assert p.cost.written == M * 384 * 2 + 2 * 526 * 384 * 4  # grad of the sum, partial dweight and dbias
    assert (p.ctas_per_sm, p.limiter) == (4, "registers")
    assert p.latency_s == pytest.approx(6 * 700e-9) and p.bound == "HBM"


def test_occupancy_by_hand():
    # 8 warps x 128 registers: 4096 registers a warp, 2 CTAs in 64K; 64 KB shared would allow 3; warps 8
    assert perf_model.occupancy(8, 128, 64 * 1024) == (2, "registers")
    assert perf_model.occupancy(8, 32, 100 * 1024) == (2, "shared")  # 228 KB / (100 + 1) KB
    assert perf_model.occupancy(16, 32, 0) == (4, "warps")
    assert perf_model.occupancy(1, 32, 0) == (32, "CTA slots")
    assert H100.in_flight_needed == pytest.approx(3.35e12 * 700e-9 / 132)


def test_every_launched_kernel_has_a_model_and_a_torch_counterpart(all_specs):
    kernels = {s.kernel.rpartition(":")[2] for s in all_specs}
    assert kernels == set(perf_model.COSTS) == set(perf_model.TORCH_BASELINES)


def test_every_launch_of_the_headline_workloads_predicts():
    for w in perf_model.HEADLINE:
        made = compile_matrix.launches(w)
        predicted = perf_model.predictions(made)
        for p in predicted:
            assert 0 < p.seconds < 1 and p.cost.bytes > 0 and p.ctas_per_sm >= 1, (str(w), p.config)
            assert p.cost.useful_flops <= p.cost.flops
        calls = perf_model.op_calls(made, predicted)
        assert sum(len(c.predictions) for c in calls) == len(made)
        assert all(perf_model.torch_seconds(c.torch_ops) > 0 for c in calls)


def test_model_command_line():
    workload = str(perf_model.HEADLINE[1])
    proc = subprocess.run([sys.executable, "-m", "fastconformer.kernels", "--model", "--no-build", "--workload",
                           workload], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"### {workload}" in proc.stdout
    for kernel in perf_model.COSTS:
        assert f"| {kernel.removesuffix('_kernel')}[" in proc.stdout
    assert "| attention backward | 3 |" in proc.stdout and "(estimate)" in proc.stdout


def test_model_command_line_rejects_an_unknown_workload(capsys):
    with pytest.raises(SystemExit) as exc:
        perf_model.main(["--model", "--workload", "conformer_huge"])
    assert exc.value.code == 2
    assert "unknown workload 'conformer_huge'" in capsys.readouterr().err
