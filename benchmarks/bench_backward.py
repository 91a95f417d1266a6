"""Training step through the fused ops: forward + backward (gradients of every input and parameter)
of each fused op against its reference module, at Conformer-S shapes (D = 384, 14x14 token grid,
stages 2/3/4: C = 64/128/256 at 56/28/14 pixels, dw_stride 4/2/1); batch 64 on a GPU, 8 on the
CPU. Train mode (batch statistics), as in training.

- fcu_down: reference ``FCUDown(x2, x_t) + x_t`` against ``FusedFCUDown(x2, x_t, add_x_t=True)``
  (the ConvTransBlock's transformer input).
- fcu_up: reference ``act1(bn1(conv1_out)) + FCUUp(x_t)`` against ``FusedFCUUp.forward_low_res``
  + ``bn_relu_add_upsampled`` (the fusion block's conv2 input).
- add_layer_norm: reference ``s = x + y; LayerNorm(s)`` against ``add_layer_norm`` (a FusedBlock's
  residual add + norm2), (B, 197, 384) rows, both outputs receiving a gradient.

backend ``auto``: Triton forward and backward kernels on CUDA, the PyTorch implementations on the CPU.
"""

import copy

import pytest
import torch
import torch.nn as nn

from benchmarks.conftest import HAS_CUDA, run_benchmark
from fastconformer import dispatch
from fastconformer.modules import add_layer_norm
from fastconformer.modules.fcu_down import FusedFCUDown
from fastconformer.modules.fcu_up import FusedFCUUp, batch_norm_scale_shift, bn_relu_add_upsampled
from fastconformer.reference import FCUDown, FCUUp
from fastconformer.testing import randomize_module

B = 64 if HAS_CUDA else 8
D, GRID = 384, 14
STAGES = {"stage2": (64, 4), "stage3": (128, 2), "stage4": (256, 1)}  # C (= outplanes / 4), dw_stride
DTYPE = torch.float16 if HAS_CUDA else torch.float32


def _backend(x: torch.Tensor) -> str:
    return "triton" if dispatch.use_triton(x) else "torch"


def _train_step(outputs_fn, leaves, grads):
    """A closure running forward + backward: d(outputs)/d(leaves) for the given output gradients."""
    def run():
        outputs = outputs_fn()
        return torch.autograd.grad(outputs, leaves, grads)
    return run


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_fcu_down_backward(benchmark, device, stage, layout, impl):
    C, s = STAGES[stage]
    H = GRID * s
    gen = torch.Generator().manual_seed(0)
    ref = randomize_module(FCUDown(C, D, s), gen).to(device, DTYPE)
    module = ref if impl == "reference" else FusedFCUDown.from_reference(copy.deepcopy(ref))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x2 = torch.randn(B, C, H, H, generator=gen).to(device, DTYPE).contiguous(memory_format=fmt).requires_grad_()
    x_t = torch.randn(B, 1 + GRID * GRID, D, generator=gen).to(device, DTYPE).requires_grad_()
    grad = torch.randn(x_t.shape, generator=gen).to(device, DTYPE)
    leaves = [x2, x_t, *module.parameters()]
    forward = (lambda: module(x2, x_t) + x_t) if impl == "reference" else (lambda: module(x2, x_t, add_x_t=True))
    run_benchmark(benchmark, _train_step(forward, leaves, grad),
                  group=f"fcu_down fwd+bwd[{stage},B={B},C={C},s={s},{layout}]", impl=impl,
                  backend="reference" if impl == "reference" else _backend(x2), dtype=str(DTYPE),
                  shape={"B": B, "C": C, "D": D, "grid": GRID, "dw_stride": s})


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_fcu_up_backward(benchmark, device, stage, layout, impl):
    C, up = STAGES[stage]
    H = GRID * up
    gen = torch.Generator().manual_seed(0)
    expand = randomize_module(FCUUp(D, C, up), gen).to(device, DTYPE)
    bn1 = randomize_module(nn.BatchNorm2d(C, eps=1e-6), gen).to(device, DTYPE)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x_t = torch.randn(B, 1 + GRID * GRID, D, generator=gen).to(device, DTYPE).requires_grad_()
    conv1_out = torch.randn(B, C, H, H, generator=gen).to(device, DTYPE).contiguous(memory_format=fmt)
    conv1_out.requires_grad_()
    grad = torch.randn(B, C, H, H, generator=gen).to(device, DTYPE).contiguous(memory_format=fmt)
    if impl == "reference":
        def forward():
            return torch.relu(bn1(conv1_out)) + expand(x_t, GRID, GRID)
        params = [*expand.parameters(), *bn1.parameters()]
    else:
        fused = FusedFCUUp.from_reference(copy.deepcopy(expand))

        def forward():
            low = fused.forward_low_res(x_t, GRID, GRID)
            scale, shift = batch_norm_scale_shift(bn1, conv1_out)
            return bn_relu_add_upsampled(conv1_out, scale, shift, low, up)
        params = [*fused.parameters(), *bn1.parameters()]
    run_benchmark(benchmark, _train_step(forward, [x_t, conv1_out, *params], grad),
                  group=f"fcu_up+fusion_input fwd+bwd[{stage},B={B},C={C},s={up},{layout}]", impl=impl,
                  backend="reference" if impl == "reference" else _backend(x_t), dtype=str(DTYPE),
                  shape={"B": B, "C": C, "D": D, "grid": GRID, "up": up})


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_add_layer_norm_backward(benchmark, device, impl):
    gen = torch.Generator().manual_seed(0)
    shape = (B, 1 + GRID * GRID, D)
    x, y = (torch.randn(shape, generator=gen).to(device, DTYPE).requires_grad_() for _ in range(2))
    norm = randomize_module(nn.LayerNorm(D, eps=1e-6), gen).to(device, DTYPE)
    grads = tuple(torch.randn(shape, generator=gen).to(device, DTYPE) for _ in range(2))
    if impl == "reference":
        def forward():
            s = x + y
            return s, norm(s)
    else:
        def forward():
            return add_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
    run_benchmark(benchmark, _train_step(forward, [x, y, norm.weight, norm.bias], grads),
                  group=f"add_layer_norm fwd+bwd[B={B},N={shape[1]},D={D}]", impl=impl,
                  backend="reference" if impl == "reference" else _backend(x), dtype=str(DTYPE),
                  shape={"B": B, "N": shape[1], "D": D})
