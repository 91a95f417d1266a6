"""CPU inference through oneDNN's fused linear primitive: when :func:`use_onednn` allows it, the
fused transformer Block equals the float64 reference (with the switch on and off), and the whole
model really takes the path under ``no_grad`` and leaves it when autograd, autocast or another
dtype needs the plain ops. Also the eval-mode CNN modules around it (FusedConvBlock with BN
folding, the ConvTransBlock fusion path) against float64, in both memory formats."""

import copy

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer import dispatch
from fastconformer import reference as ref
from fastconformer.dispatch import onednn, use_onednn
from fastconformer.modules.conv_block import FusedConvBlock
from fastconformer.modules.conv_trans_block import FusedConvTransBlock
from fastconformer.modules.transformer import FusedBlock
from fastconformer.testing import MODEL_TOL, assert_matches, onednn_calls, randomize_module, reference_and_fast

pytestmark = pytest.mark.skipif(not dispatch.onednn_available(), reason="this torch has no working oneDNN fused linear")
SWITCH = pytest.mark.parametrize("enabled", [True, False], ids=["onednn", "plain"])


def _eval_pair(module: nn.Module, make_fused, gen: torch.Generator):
    """(float64 copy of ``module`` with random weights and BN statistics, ``make_fused(module)``), eval mode."""
    randomize_module(module, gen)
    return copy.deepcopy(module).double().eval(), make_fused(module).eval()


def test_use_onednn_gates():
    x = torch.randn(3, 4)
    w = torch.randn(4, 4, requires_grad=True)
    with torch.no_grad():
        assert use_onednn(x, w)
        assert not use_onednn(x.double(), w.double()) and not use_onednn(x.half())
        with onednn(False):
            assert not use_onednn(x, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not use_onednn(x, w)
        with fastconformer.backend("torch"):
            assert use_onednn(x, w)
    assert not use_onednn(x, w), "autograd needs the plain ops"
    assert use_onednn(x, w.detach())
    with pytest.raises(TypeError, match="bool"):
        with onednn("yes"):
            pass


def test_onednn_env_switch_is_validated(monkeypatch):
    monkeypatch.setenv("FASTCONFORMER_ONEDNN", "0")
    assert dispatch._onednn_default() is False
    monkeypatch.setenv("FASTCONFORMER_ONEDNN", "off")
    with pytest.raises(ValueError, match="FASTCONFORMER_ONEDNN"):
        dispatch._onednn_default()


@SWITCH
@pytest.mark.parametrize("B, N, strided", [(3, 197, False), (1, 321, False), (3, 197, True)])
def test_fused_block_eval(enabled, B, N, strided, gen):
    block = ref.Block(384, 6, qkv_bias=True)
    expected_block, fused = _eval_pair(block, FusedBlock.from_reference, gen)
    x = torch.randn(N, B, 384, generator=gen).transpose(0, 1) if strided else torch.randn(B, N, 384, generator=gen)
    with torch.no_grad(), onednn(enabled):
        calls = onednn_calls(lambda: fused(x))
        assert_matches(fused(x), expected_block(x.double()), name=f"FusedBlock B={B} N={N}")
    assert calls == (4 if enabled else 0)


CONV_BLOCKS = [  # inplanes, outplanes, stride, res_conv, with x_t, input (B, H, W)
    (64, 256, 1, True, False, (3, 56, 56)),
    (256, 256, 1, False, True, (1, 28, 40)),
    (256, 512, 2, True, False, (3, 28, 28)),
    (1024, 1024, 1, False, False, (2, 7, 9)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CONV_BLOCKS, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}{'-res' if c[3] else ''}"
                         f"{'-xt' if c[4] else ''}")
def test_fused_conv_block_eval(channels_last, case, gen):
    inplanes, outplanes, stride, res_conv, with_x_t, (B, H, W) = case
    block = ref.ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv)
    expected_block, fused = _eval_pair(block, FusedConvBlock.from_reference, gen)
    x = torch.randn(B, inplanes, H, W, generator=gen)
    x_t = torch.randn(B, outplanes // 4, H, W, generator=gen) if with_x_t else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, x2 = fused(x, x_t)
        expected, expected_x2 = expected_block(x.double(), None if x_t is None else x_t.double())
    assert_matches(out, expected, name="ConvBlock output")
    assert_matches(x2, expected_x2, name="ConvBlock x2")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and x2.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("last_fusion", [False, True])
def test_fused_conv_trans_block_eval(last_fusion, gen):
    block = ref.ConvTransBlock(256, 256, res_conv=last_fusion, stride=1, dw_stride=4, embed_dim=384, num_heads=6,
                               last_fusion=last_fusion)
    expected_block, fused = _eval_pair(block, FusedConvTransBlock.from_reference, gen)
    x = torch.randn(3, 256, 56, 56, generator=gen).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(3, 197, 384, generator=gen)
    with torch.no_grad():
        out = fused(x, x_t)
        expected = expected_block(x.double(), x_t.double())
    assert_matches(out[0], expected[0], name="ConvTransBlock x")
    assert_matches(out[1], expected[1], name="ConvTransBlock x_t")


def test_whole_model_takes_the_path_only_without_autograd():
    model, fast = reference_and_fast("conformer_tiny_patch16")
    fast.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = copy.deepcopy(model).double().eval()(x.double())
    with torch.no_grad():
        calls = onednn_calls(lambda: fast(x))
        assert_matches(fast(x), expected, fp32_tol=MODEL_TOL, name="no_grad logits")
    assert calls == 12 * 4  # 12 Blocks x (qkv, proj + residual, fc1 + GELU, fc2 + residual)
    assert onednn_calls(lambda: fast(x)) == 0, "with autograd on, the plain ops must run"
    with torch.inference_mode():
        assert onednn_calls(lambda: fast(x)) == calls


def test_torch_compile_traces_around_it():
    """Under torch.compile the plain ops are traced (inductor chooses its own CPU fusions): a
    fullgraph compile of the eval model in inference mode equals eager."""
    torch.manual_seed(0)
    fast = fastconformer.create_model("conformer_tiny_patch16", depth=3, fast=True).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = fast(x)
        torch.compiler.reset()
        out = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
    assert_matches(out, [e.double() for e in expected], name="compiled eval logits")
