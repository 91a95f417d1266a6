"""The whole model, forward (inference, eval mode): reference eager vs the fast model vs
``torch.compile(reference)``, same weights and inputs, side by side in one run.

Conformer-S/16 at 224x224; batch 8 fp32 on the CPU, batch 64 under bf16 autocast on a GPU. On
the CPU the fast model also runs with oneDNN's fused linear epilogues switched off
(``fast (no oneDNN)``), to show what they add.
"""

import contextlib
import copy

import pytest
import torch

import fastconformer
from benchmarks.conftest import HAS_CUDA, run_benchmark
from fastconformer.dispatch import onednn

MODEL = "conformer_small_patch16"
B = 64 if HAS_CUDA else 8
AUTOCAST = torch.bfloat16 if HAS_CUDA else None
IMPLS = ["reference", "fast", "compile(reference)"] + ([] if HAS_CUDA else ["fast (no oneDNN)"])


@pytest.fixture(scope="module")
def models(device):
    torch.manual_seed(0)
    reference = fastconformer.create_model(MODEL).eval()
    fast = fastconformer.convert(copy.deepcopy(reference)).to(device)
    reference = reference.to(device)
    return {"reference": reference, "fast": fast, "compile(reference)": torch.compile(reference),
            "fast (no oneDNN)": fast}


@pytest.mark.parametrize("impl", IMPLS)
def test_model_inference(benchmark, models, device, impl):
    model = models[impl]
    x = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    autocast = (torch.autocast(device.type, dtype=AUTOCAST) if AUTOCAST is not None
                else contextlib.nullcontext())

    def run():
        with torch.inference_mode(), autocast, onednn(impl != "fast (no oneDNN)"):
            return model(x)

    run()  # compile / warm up outside the timing
    run_benchmark(benchmark, run, group=f"{MODEL}[B={B},224,{'fp32' if AUTOCAST is None else 'amp-bf16'},eval]",
                  impl=impl, rounds=8, batch=B, images=B)
