"""Multi-head self-attention of the transformer branch, module level, forward (inference) and
forward + backward (a training step's share: the gradients of x and of every parameter):
the reference Attention (explicit (B, heads, N, N) scores) vs FusedAttention (backend ``auto``:
the flash-style Triton kernels on CUDA, forward and backward, F.scaled_dot_product_attention on
the CPU) vs FusedAttention forced onto its PyTorch path (F.scaled_dot_product_attention on
strided q, k, v, with its own backward).

Shapes: N = 197 tokens (patch16 at 224), dim 384 / 6 heads (tiny, small) and 576 / 9 heads (base);
batch 64 on a GPU, 8 on the CPU.
"""

import pytest
import torch

from benchmarks.conftest import HAS_CUDA, run_benchmark
from fastconformer import dispatch
from fastconformer.modules.attention import FusedAttention
from fastconformer.reference import Attention
from fastconformer.testing import randomize_module

B = 64 if HAS_CUDA else 8
N = 197
DTYPES = [torch.float16, torch.float32] if HAS_CUDA else [torch.float32]
IMPLS = {"reference": None, "fused": "auto", "sdpa": "torch"}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dim,heads", [(384, 6), (576, 9)], ids=["dim384-h6", "dim576-h9"])
def test_attention(benchmark, device, dim, heads, dtype, impl):
    gen = torch.Generator().manual_seed(0)
    ref = randomize_module(Attention(dim, heads, qkv_bias=True), gen).eval().to(device, dtype)
    module = ref if impl == "reference" else FusedAttention.from_reference(ref)
    x = torch.randn(B, N, dim, generator=gen).to(device, dtype)
    attention_flops = 4 * B * N * N * dim  # q kᵀ and p v
    linear_flops = 8 * B * N * dim * dim  # qkv (3 dim²) and proj (dim²), 2 flops per MAC
    backend = IMPLS[impl] or "torch"

    def run():
        with dispatch.backend(backend), torch.no_grad():
            return module(x)

    with dispatch.backend(backend):
        resolved = "triton" if dispatch.use_triton(x) else "torch"
    run_benchmark(benchmark, run, group=f"attention[B={B},N={N},dim={dim},heads={heads},{str(dtype)[6:]}]",
                  impl=impl, backend=resolved if impl != "reference" else "reference",
                  shape=[B, N, dim], heads=heads, dtype=str(dtype), flops=attention_flops + linear_flops,
                  attention_flops=attention_flops)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dim,heads", [(384, 6), (576, 9)], ids=["dim384-h6", "dim576-h9"])
def test_attention_forward_backward(benchmark, device, dim, heads, dtype, impl):
    gen = torch.Generator().manual_seed(0)
    ref = randomize_module(Attention(dim, heads, qkv_bias=True), gen).to(device, dtype)
    module = ref if impl == "reference" else FusedAttention.from_reference(ref)
    x = torch.randn(B, N, dim, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(B, N, dim, generator=gen).to(device, dtype)
    attention_flops = 3 * 4 * B * N * N * dim  # forward q kᵀ, p v; backward 2x that (dq, dk, dv, dp)
    linear_flops = 3 * 8 * B * N * dim * dim
    backend = IMPLS[impl] or "torch"

    def run():
        with dispatch.backend(backend):
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(grad)
        return x.grad

    with dispatch.backend(backend):
        resolved = "triton" if dispatch.use_triton(x) else "torch"
    run_benchmark(benchmark, run,
                  group=f"attention fwd+bwd[B={B},N={N},dim={dim},heads={heads},{str(dtype)[6:]}]",
                  impl=impl, backend=resolved if impl != "reference" else "reference",
                  shape=[B, N, dim], heads=heads, dtype=str(dtype), flops=attention_flops + linear_flops,
                  attention_flops=attention_flops)
