"""The expand (FCUUp, tokens -> CNN) plus the fusion block's conv2 input, forward, at Conformer-S
shapes (D = 384, 14x14 token grid, stages 2/3/4: C = 64/128/256 at 56/28/14 pixels, dw_stride
4/2/1); batch 64 on a GPU, 8 on the CPU.

reference: ``x_t_r = FCUUp(x_t)`` (transpose copy, 1x1 conv, BatchNorm, ReLU, nearest upsample
written at full resolution), then ``act1(bn1(conv1_out)) + x_t_r``.
fused: ``FusedFCUUp.forward_low_res`` (one GEMM + BatchNorm + ReLU kernel on the token grid), then
``bn_relu_add_upsampled`` (bn1 + ReLU + the upsampled add in one pass); backend ``auto`` (Triton
on CUDA, the PyTorch implementations on the CPU).

``bytes_moved`` in extra_info: the tensor traffic of the ops each path launches (every op reads
its inputs and writes its output once; the fused count is that of the Triton kernels). In train
mode the expand's BatchNorm runs as the module on the low-resolution conv output.
"""

import copy

import pytest
import torch

from benchmarks.conftest import HAS_CUDA, run_benchmark
from fastconformer import dispatch
from fastconformer.modules.fcu_up import FusedFCUUp, batch_norm_scale_shift, bn_relu_add_upsampled
from fastconformer.reference import FCUUp
from fastconformer.testing import randomize_module

B = 64 if HAS_CUDA else 8
D, GRID = 384, 14
STAGES = {"stage2": (64, 4), "stage3": (128, 2), "stage4": (256, 1)}  # C (= outplanes / 4), dw_stride
DTYPE = torch.float16 if HAS_CUDA else torch.float32


def _bytes_moved(impl: str, mode: str, C: int, up: int, element: int) -> int:
    """Elements read + written by the path's ops (each reads its inputs and writes its output
    once), times the element size."""
    tokens, weights = B * GRID * GRID * D, C * D
    low, full = B * C * GRID * GRID, B * C * (GRID * up) ** 2
    if impl == "reference":
        moved = (tokens + weights + low  # 1x1 conv (strided view of the tokens)
                 + 2 * low + 2 * low  # BatchNorm, ReLU
                 + low + full  # upsample, written at full resolution
                 + 2 * full + 2 * full  # bn1, act1 (in place)
                 + 3 * full)  # the add
        if mode == "train":
            moved += low + full  # the two BatchNorms' statistics passes
    elif mode == "eval":
        moved = (tokens + weights + low  # expand kernel: GEMM + bias + BatchNorm + ReLU
                 + 2 * full + low)  # upsample-add kernel: conv1_out and low in, conv2's input out
    else:
        moved = (tokens + weights + low  # expand kernel: GEMM + bias
                 + 3 * low + 2 * low  # the BatchNorm module (statistics, normalise), ReLU
                 + full  # bn1's statistics
                 + 2 * full + low)  # upsample-add kernel
    return moved * element


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_fcu_up_fusion_input(benchmark, device, stage, layout, mode, impl):
    C, up = STAGES[stage]
    H = GRID * up
    gen = torch.Generator().manual_seed(0)
    expand = randomize_module(FCUUp(D, C, up), gen).to(device, DTYPE).train(mode == "train")
    bn1 = randomize_module(torch.nn.BatchNorm2d(C, eps=1e-6), gen).to(device, DTYPE).train(mode == "train")
    act1 = torch.nn.ReLU(inplace=True)
    x_t = torch.randn(B, 1 + GRID * GRID, D, generator=gen).to(device, DTYPE)
    conv1_out = torch.randn(B, C, H, H, generator=gen).to(device, DTYPE)
    if layout == "channels_last":
        conv1_out = conv1_out.contiguous(memory_format=torch.channels_last)

    if impl == "reference":
        def run():
            with torch.no_grad():
                return act1(bn1(conv1_out)) + expand(x_t, GRID, GRID)
    else:
        fused = FusedFCUUp.from_reference(copy.deepcopy(expand))

        def run():
            with torch.no_grad():
                low = fused.forward_low_res(x_t, GRID, GRID)
                scale, shift = batch_norm_scale_shift(bn1, conv1_out)
                return bn_relu_add_upsampled(conv1_out, scale, shift, low, up)

    resolved = "reference" if impl == "reference" else ("triton" if dispatch.use_triton(x_t) else "torch")
    run_benchmark(benchmark, run, group=f"fcu_up+fusion_input[{stage},B={B},C={C},s={up},{layout},{mode}]",
                  impl=impl, backend=resolved, dtype=str(DTYPE), shape={"B": B, "D": D, "C": C, "grid": GRID, "up": up},
                  bytes_moved=_bytes_moved(impl, mode, C, up, torch.finfo(DTYPE).bits // 8))
