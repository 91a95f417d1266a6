"""The detection backbone, forward (inference, eval mode): ``create_model(..., features_only=True)``
with the official taps (four CNN maps, strides 4 to 32), reference eager vs the fast model on the
same weights and inputs, side by side in one run.

Conformer-S/32, the backbone of the official repository's COCO detectors, at their 800x1344 input,
batch 2 (their images per GPU); fp32 on the CPU, bf16 autocast on a GPU.
"""

import contextlib
import copy

import pytest
import torch

import fastconformer
from benchmarks.conftest import HAS_CUDA, run_benchmark

MODEL = "conformer_small_patch32"
B = 2
H, W = 800, 1344
AUTOCAST = torch.bfloat16 if HAS_CUDA else None
IMPLS = ["reference", "fast"]


@pytest.fixture(scope="module")
def backbones(device):
    torch.manual_seed(0)
    reference = fastconformer.create_model(MODEL, features_only=True).eval()
    fast = fastconformer.convert(copy.deepcopy(reference)).to(device)
    return {"reference": reference.to(device), "fast": fast}


@pytest.mark.parametrize("impl", IMPLS)
def test_backbone_inference(benchmark, backbones, device, impl):
    backbone = backbones[impl]
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1)).to(device)
    autocast = (torch.autocast(device.type, dtype=AUTOCAST) if AUTOCAST is not None
                else contextlib.nullcontext())

    def run():
        with torch.inference_mode(), autocast:
            return backbone(x)

    dtype = "fp32" if AUTOCAST is None else "amp-bf16"
    run_benchmark(benchmark, run, group=f"{MODEL} features[B={B},{H}x{W},{dtype},eval]", impl=impl, rounds=3,
                  batch=B, images=B)
