"""The whole fast model: convert(), state_dict interchange, equality with the float64 reference in
eval and train mode, layouts, autocast, the official class, and top-1 agreement on photographs."""

import copy

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer import reference as ref
from fastconformer.convert import FastConformer, convert, is_converted
from fastconformer.modules.attention import FusedAttention
from fastconformer.modules.conv_block import FusedConvBlock
from fastconformer.modules.conv_trans_block import FusedConvTransBlock
from fastconformer.modules.fcu_down import FusedFCUDown
from fastconformer.modules.fcu_up import FusedFCUUp
from fastconformer.modules.transformer import FusedBlock
from fastconformer.testing import MODEL_TOL, assert_matches, bn_buffers, reference_and_fast, to_float64

VARIANTS = fastconformer.list_models()


def _pair(name, seed=0, **overrides):
    """(reference with random weights and BN stats, its converted deep copy)."""
    return reference_and_fast(name, seed, **overrides)


def test_convert_replaces_every_hot_module():
    model, fast = _pair("conformer_small_patch32")
    assert isinstance(fast, FastConformer) and isinstance(fast, ref.Conformer) and is_converted(fast)
    assert not is_converted(model)
    assert isinstance(fast.conv_1, FusedConvBlock) and isinstance(fast.trans_1, FusedBlock)
    for i in range(2, 13):
        block = getattr(fast, f"conv_trans_{i}")
        assert isinstance(block, FusedConvTransBlock)
        assert isinstance(block.squeeze_block, FusedFCUDown) and isinstance(block.expand_block, FusedFCUUp)
        assert isinstance(block.trans_block, FusedBlock) and isinstance(block.trans_block.attn, FusedAttention)
        assert isinstance(block.cnn_block, FusedConvBlock) and isinstance(block.fusion_block, FusedConvBlock)
    assert convert(fast) is fast  # idempotent


def test_convert_keeps_parameters_and_keys():
    torch.manual_seed(0)
    model = fastconformer.create_model("conformer_tiny_patch16")
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    convert(model)
    assert list(model.state_dict()) == keys_before
    assert all(p is params_before[n] for n, p in model.named_parameters())  # optimizer stays valid


def test_state_dicts_are_interchangeable():
    model, fast = _pair("conformer_tiny_patch16")
    fresh_fast = fastconformer.create_model("conformer_tiny_patch16", fast=True)
    fastconformer.load_checkpoint(fresh_fast, model.state_dict(), strict=True)
    fresh_ref = fastconformer.create_model("conformer_tiny_patch16")
    fresh_ref.load_state_dict(fast.state_dict(), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh_ref.state_dict()[k]) and torch.equal(v, fresh_fast.state_dict()[k])


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("mode, hw, batch", [("eval", (224, 224), 3), ("train", (256, 320), 1)])
def test_whole_model_fp32(name, mode, hw, batch):
    model, fast = _pair(name)
    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(1))
    expected_model = copy.deepcopy(model).double()
    getattr(expected_model, mode)()
    getattr(fast, mode)()
    with torch.no_grad(), fastconformer.backend("torch"):
        expected = expected_model(x.double())
        out = fast(x)
    assert_matches(out, expected, fp32_tol=MODEL_TOL, name=f"{name} {mode} logits")
    if mode == "train":  # the batch statistics went into the running stats exactly as in the reference
        ref_buffers, fast_buffers = bn_buffers(expected_model), bn_buffers(fast)
        for k, v in ref_buffers.items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(v, fast_buffers[k]), k
            else:
                assert_matches(fast_buffers[k], v, fp32_tol=MODEL_TOL, name=k)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conformer_tiny_patch16", "conformer_small_patch32"])
def test_whole_model_fp16(name):
    model, fast = _pair(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), fastconformer.backend("torch"):
        expected = copy.deepcopy(model).double().eval()(x.double())
        baseline = copy.deepcopy(model).half().eval()(x.half())
        out = fast.half().eval()(x.half())
    assert_matches(out, expected, baseline=baseline, name=f"{name} fp16 logits")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conformer_tiny_patch16", "conformer_small_patch32"])
def test_whole_model_triton_backend(name, triton_backend, device):
    model, fast = _pair(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = copy.deepcopy(model).double().eval()(x.double())
        out = fast.to(device).eval()(x.to(device))
    assert_matches(out, expected, fp32_tol=MODEL_TOL, name=f"{name} triton logits")


def test_channels_last_and_strided_inputs():
    model, fast = _pair("conformer_tiny_patch16")
    x = torch.randn(2, 3, 224, 448, generator=torch.Generator().manual_seed(4))[..., ::2]  # non-contiguous
    with torch.no_grad(), fastconformer.backend("torch"):
        expected = copy.deepcopy(model).double().eval()(x.double())
        fast.eval()
        assert_matches(fast(x), expected, fp32_tol=MODEL_TOL, name="strided input")
        assert_matches(fast(x.contiguous(memory_format=torch.channels_last)), expected, fp32_tol=MODEL_TOL,
                       name="channels_last input")


def test_non_finite_images_give_non_finite_logits():
    """A NaN or Inf pixel gives the reference's non-finite logits (eval on the CPU: the oneDNN paths)
    and leaves the other images' logits as they are."""
    model, fast = _pair("conformer_tiny_patch16")
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    x[0, 0, 5, 5], x[1, 1, 100, 7] = float("nan"), float("inf")
    with torch.no_grad():
        expected = copy.deepcopy(model).double().eval()(x.double())
        out = fast.eval()(x)
    for o, e in zip(out, expected):
        assert not e[:2].isfinite().any() and torch.equal(o.isfinite(), e.isfinite())
    assert_matches([o[2:] for o in out], [e[2:] for e in expected], fp32_tol=MODEL_TOL, name="finite image")


def test_empty_batch_gives_empty_logits():
    model, fast = _pair("conformer_tiny_patch16")
    x = torch.randn(0, 3, 224, 224)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            expected, out = model.eval()(x), fast.eval()(x)
        assert [o.shape for o in out] == [e.shape for e in expected] == [(0, 1000)] * 2


def test_input_of_another_dtype_than_the_weights_is_one_clear_error():
    model, fast = _pair("conformer_tiny_patch16")
    x = torch.randn(1, 3, 224, 224, dtype=torch.float16)
    for m in (model.eval(), fast.eval()):
        with pytest.raises(TypeError, match="x is torch.float16 but the model's weights are torch.float32"):
            m(x)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts as it computes
            assert [o.dtype for o in m(x.bfloat16())] == [torch.bfloat16] * 2


def test_autocast_bf16_on_cpu():
    model, fast = _pair("conformer_tiny_patch16")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    model.eval(), fast.eval()
    with torch.no_grad(), fastconformer.backend("torch"):
        expected = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            baseline = model(x)
            out = fast(x)
    assert [o.dtype for o in out] == [b.dtype for b in baseline] == [torch.bfloat16] * 2
    assert_matches(out, expected, baseline=baseline, name="autocast bf16 logits")


def test_eval_folding_never_goes_stale():
    """BN folding is recomputed from live weights: weight loads, optimizer steps and mode switches
    are all seen by the next forward."""
    model, fast = _pair("conformer_tiny_patch16")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    fast.eval(), model.eval()
    with torch.no_grad():
        fast(x)
        other, _ = _pair("conformer_tiny_patch16", seed=9)
        fast.load_state_dict(other.state_dict())
        expected = copy.deepcopy(other).double().eval()(x.double())
        assert_matches(fast(x), expected, fp32_tol=MODEL_TOL, name="after load_state_dict")
        fast.conv_trans_3.fusion_block.bn2.running_var.mul_(3.0)
        other.conv_trans_3.fusion_block.bn2.running_var.mul_(3.0)
        expected = copy.deepcopy(other).double().eval()(x.double())
        assert_matches(fast(x), expected, fp32_tol=MODEL_TOL, name="after an in-place buffer change")


def test_training_step_matches_reference():
    """Loss gradients of every parameter (both heads' cross-entropy), train mode, float64 on both
    sides: the fused path's backward must be the reference's algebra. (In fp32 a whole-model
    gradient flips ReLU masks wherever a pre-activation rounds across zero, so its error measures
    luck rather than correctness; each fused op's fp32 gradients are checked module by module.)"""
    model, fast = _pair("conformer_tiny_patch16", num_classes=10)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    target = torch.tensor([3, 7])

    def step(m):
        m = m.double().train()
        out = m(x)
        sum(nn.functional.cross_entropy(o, target) for o in out).backward()
        return {n: p.grad for n, p in m.named_parameters()}, bn_buffers(m)

    with fastconformer.backend("torch"):
        expected, expected_stats = step(copy.deepcopy(model))
        got, got_stats = step(fast)
    assert got.keys() == expected.keys() and all(g is not None for g in got.values())
    assert_matches(list(got.values()), list(expected.values()), fp32_tol=1e-10, name="all parameter grads")
    assert_matches(list(got_stats.values()), list(expected_stats.values()), fp32_tol=1e-12, name="BN stats")


class _Foreign(nn.Module):
    """Stands in for the official repository's classes: same attributes, unrelated class."""


def _as_foreign(model):
    """Swap every module's class for an unrelated one with the same name and forward, as a model
    built by the official code would look to convert()."""
    foreign = {}
    for m in model.modules():
        cls = type(m)
        if cls.__module__ == ref.__name__:
            if cls not in foreign:
                # not train(): the official classifier has none (its detection backbone's is the model of ours)
                methods = {k: v for k, v in vars(cls).items() if callable(v) and k not in ("__init__", "train")}
                foreign[cls] = type(cls.__name__, (_Foreign,), {**methods, "__module__": "conformer"})
            m.__class__ = foreign[cls]
    return model


def test_convert_accepts_official_style_modules():
    model, _ = _pair("conformer_tiny_patch16")
    official = _as_foreign(copy.deepcopy(model))
    assert not isinstance(official, ref.Conformer)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = official.eval()(x)
        fast = convert(official)
        assert type(fast).__name__ == "FastConformer" and not isinstance(fast, ref.Conformer)
        assert_matches(fast(x), to_float64(expected), fp32_tol=MODEL_TOL, name="official-style model")


def test_convert_rejects_other_models():
    with pytest.raises(TypeError, match="expects a Conformer"):
        convert(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        convert("conformer")


def test_top1_agrees_on_photographs():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from fastconformer.data import eval_transform

    images = torch.stack([eval_transform(Image.fromarray(getattr(skimage_data, n)()))
                          for n in ("astronaut", "coffee", "chelsea")])
    torch.manual_seed(0)
    model = fastconformer.create_model("conformer_tiny_patch16").eval()
    fast = convert(copy.deepcopy(model))
    with torch.no_grad():
        ref_scores = sum(model(images))
        fast_scores = sum(fast(images))
    assert torch.equal(ref_scores.argmax(-1), fast_scores.argmax(-1))
    assert_matches(fast_scores, to_float64(ref_scores), fp32_tol=MODEL_TOL, name="summed logits")
