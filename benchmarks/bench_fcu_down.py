"""The FCU squeeze at Conformer-S/16 shapes (D = 384, 14x14 tokens): reference FCUDown vs FusedFCUDown
(the torch backend on the CPU, the Triton kernel on CUDA), alone and with the block's ``+ x_t``.

extra_info records the bytes the fused op must move (x2 read once, the tokens written once, x_t read
once more with add_x_t) and its MACs, so that GPU bandwidth can be computed from the JSON.
"""

import pytest
import torch

from benchmarks.conftest import DEVICE, HAS_CUDA, run_benchmark
from fastconformer import dispatch
from fastconformer.modules.fcu_down import FusedFCUDown
from fastconformer.reference import FCUDown
from fastconformer.testing import randomize_module

BATCH = 64 if HAS_CUDA else 8
DTYPE = torch.float16 if HAS_CUDA else torch.float32
BACKEND = "triton" if HAS_CUDA else "torch"
D = 384
# (C_in, dw_stride, x2 side) of the squeeze in Conformer-S/16 stages 1-3 at 224x224.
SHAPES = [(64, 4, 56), (128, 2, 28), (256, 1, 14)]


@pytest.mark.parametrize("add_x_t", [False, True], ids=["squeeze", "squeeze+x_t"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("C, dw_stride, side", SHAPES, ids=[f"s{s}" for _, s, _ in SHAPES])
def test_fcu_down(benchmark, C, dw_stride, side, impl, add_x_t):
    gen = torch.Generator().manual_seed(0)
    ref = randomize_module(FCUDown(C, D, dw_stride), gen).to(DEVICE, DTYPE).eval()
    x2 = torch.randn(BATCH, C, side, side, generator=gen).to(DEVICE, DTYPE)
    tokens = (side // dw_stride) ** 2
    x_t = torch.randn(BATCH, 1 + tokens, D, generator=gen).to(DEVICE, DTYPE)
    if impl == "reference":
        def fn():
            out = ref(x2, x_t)
            return out + x_t if add_x_t else out
    else:
        fused = FusedFCUDown.from_reference(ref)

        def fn():
            with dispatch.backend(BACKEND):
                return fused(x2, x_t, add_x_t=add_x_t)

    element = x2.element_size()
    bytes_moved = (x2.numel() + x_t.numel() * (2 if add_x_t else 1)) * element
    with torch.no_grad():
        run_benchmark(benchmark, fn, group=f"fcu_down dw_stride={dw_stride} {'+x_t' if add_x_t else ''}".strip(),
                      impl=impl, backend=BACKEND if impl == "fused" else "torch", dtype=str(DTYPE),
                      shape_x2=list(x2.shape), shape_tokens=list(x_t.shape), bytes_moved=bytes_moved,
                      macs=BATCH * tokens * C * D)
