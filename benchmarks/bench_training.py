"""A full training step (forward, backward, AdamW step; train mode): reference vs the fast model,
same weights and inputs, side by side in one run.

Conformer-S/16 at 224x224; batch 8 fp32 on the CPU, batch 64 under bf16 autocast on a GPU.
extra_info: ``images_per_s`` (from the median), and the memory a step needs: on the CPU the bytes
of the activations autograd saves for backward (``saved_activation_bytes``, deterministic); on a
GPU ``peak_memory_bytes`` (torch.cuda.max_memory_allocated over one step) and
``step_memory_bytes`` (that peak minus what was allocated before the step: weights, gradients,
optimizer state).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastconformer
from benchmarks.conftest import HAS_CUDA, run_benchmark
from fastconformer.testing import saved_activation_bytes

MODEL = "conformer_small_patch16"
B = 64 if HAS_CUDA else 8
AUTOCAST = torch.bfloat16 if HAS_CUDA else None
IMPLS = ["reference", "fast"]


@pytest.fixture(scope="module")
def batch(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)
    return x.to(device), y.to(device)


def _autocast(device):
    return torch.autocast(device.type, dtype=AUTOCAST) if AUTOCAST is not None else contextlib.nullcontext()


def _loss(outputs, y):
    return sum(F.cross_entropy(o.float(), y) for o in outputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_training_step(benchmark, device, batch, impl):
    torch.manual_seed(0)
    model = fastconformer.create_model(MODEL).train()
    if impl == "fast":
        model = fastconformer.convert(model)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x, y = batch

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = _loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step()  # warm up (and create the optimizer state) outside the timing
    if HAS_CUDA:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        memory = dict(peak_memory_bytes=peak, step_memory_bytes=peak - before)
    else:
        memory = dict(saved_activation_bytes=saved_activation_bytes(model, x, autocast_dtype=AUTOCAST))
    precision = "fp32" if AUTOCAST is None else "amp-bf16"
    run_benchmark(benchmark, step, group=f"{MODEL}[B={B},224,{precision},train step]", impl=impl, rounds=3,
                  batch=B, images=B, **memory)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = B / benchmark.stats.stats.median
