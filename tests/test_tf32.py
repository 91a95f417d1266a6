"""TF32, the policy: every test compares float32 with TF32 off (the autouse ``ieee_fp32`` fixture in
tests/conftest.py switches off cuBLAS and cuDNN TF32, and with cuBLAS the Triton kernels' dots), and
the tests here hold TF32 to its own bound: 2x the reference's own TF32 error against float64
(+ 1e-6), as for half precision.

No TF32 Triton dot has been checked numerically yet: the Triton interpreter ignores
``input_precision``, so a machine without a GPU can only test the switch itself. The bounds need a
CUDA GPU of compute capability 8.0 (Ampere) or later.
"""

import copy

import pytest
import torch

import fastconformer
from fastconformer.modules.attention import FusedAttention
from fastconformer.modules.fcu_down import FusedFCUDown
from fastconformer.modules.fcu_up import FusedFCUUp
from fastconformer.reference import Attention, FCUDown, FCUUp
from fastconformer.testing import assert_matches, randomize_module, reference_and_fast, rel_error, tf32, to_float64

BACKENDS = torch.backends
NEW_API = hasattr(BACKENDS.cuda.matmul, "fp32_precision")
HAS_TF32 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_tf32 = pytest.mark.skipif(not HAS_TF32, reason="TF32 runs on CUDA GPUs of compute capability 8.0 or later only "
                                                     "(and the Triton interpreter ignores input_precision)")


def _tf32_state() -> tuple:
    """(cuBLAS matmul, cuDNN conv) TF32 on?, read through the API that cannot raise."""
    if NEW_API:
        return BACKENDS.cuda.matmul.fp32_precision == "tf32", BACKENDS.cudnn.conv.fp32_precision == "tf32"
    return BACKENDS.cuda.matmul.allow_tf32, BACKENDS.cudnn.allow_tf32


def test_every_test_runs_without_tf32():
    assert _tf32_state() == (False, False)


@pytest.mark.parametrize("style", ["fp32_precision", "allow_tf32"])
@pytest.mark.parametrize("user", [True, False], ids=["user-tf32", "user-ieee"])
@pytest.mark.parametrize("enabled", [True, False], ids=["tf32", "ieee"])
def test_switch_sets_and_restores_either_api(style, user, enabled):
    """tf32() sets both switches whichever API the user set them with, and restores the user's
    choice, leaving the legacy flags readable when the user set them through the legacy API."""
    if style == "fp32_precision" and not NEW_API:
        pytest.skip("this torch has no fp32_precision settings")
    if style == "allow_tf32":
        BACKENDS.cuda.matmul.allow_tf32 = BACKENDS.cudnn.allow_tf32 = user
    else:
        BACKENDS.cuda.matmul.fp32_precision = BACKENDS.cudnn.conv.fp32_precision = "tf32" if user else "ieee"
    with tf32(enabled):
        assert _tf32_state() == (enabled, enabled)
    assert _tf32_state() == (user, user)
    if style == "allow_tf32":
        assert (BACKENDS.cuda.matmul.allow_tf32, BACKENDS.cudnn.allow_tf32) == (user, user)


def _assert_within_tf32_bound(out, expected, baseline, name):
    """out within 2x the reference's own TF32 error (baseline: the reference module in fp32 under
    TF32), which must show that TF32 was on."""
    baseline_error = rel_error(baseline, expected)
    assert baseline_error > 1e-5, f"{name}: the reference's TF32 error {baseline_error:.3g} looks like IEEE fp32"
    assert_matches(out, expected, fp32_tol=2 * baseline_error + 1e-6, name=f"{name} under TF32")


def _module_case(kind, gen):
    """(reference module, fused twin, inputs) at a Conformer-S shape, on CUDA."""
    if kind == "fcu_down":
        ref = FCUDown(64, 384, 4)
        inputs = (torch.randn(4, 64, 56, 56, generator=gen), torch.randn(4, 197, 384, generator=gen))
        fused_type = FusedFCUDown
    elif kind == "fcu_up":
        ref = FCUUp(384, 64, 4)
        inputs = (torch.randn(4, 197, 384, generator=gen), 14, 14)
        fused_type = FusedFCUUp
    else:
        ref = Attention(384, 6, qkv_bias=True)
        inputs = (torch.randn(4, 197, 384, generator=gen),)
        fused_type = FusedAttention
    ref = randomize_module(ref, gen).eval().cuda()
    inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)
    return ref, fused_type.from_reference(copy.deepcopy(ref)), inputs


@pytest.mark.gpu
@needs_tf32
@pytest.mark.parametrize("kind", ["fcu_down", "fcu_up", "attention"])
def test_fused_modules_under_tf32(backend_name, device, gen, kind):
    ref, fused, inputs = _module_case(kind, gen)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(*to_float64(inputs))
        with tf32(True):
            baseline = ref(*inputs)
            out = fused(*inputs)
    _assert_within_tf32_bound(out, expected, baseline, f"{kind} ({backend_name})")


@pytest.mark.gpu
@needs_tf32
def test_whole_model_under_tf32():
    """Conformer-Ti, 224x224, eval: cuDNN convolutions, cuBLAS linears and the Triton kernels in TF32."""
    model, fast = reference_and_fast("conformer_tiny_patch16")
    model, fast = model.cuda().eval(), fast.cuda().eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        with tf32(True):
            baseline = model(x)
            with fastconformer.backend("triton"):
                out = fast(x)
    _assert_within_tf32_bound(out, expected, baseline, "conformer_tiny_patch16 logits")
