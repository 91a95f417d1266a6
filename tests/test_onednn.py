"""CPU inference through oneDNN's fused linear primitive: when :func:`use_onednn` allows it, the
fused transformer Block and the FCU squeeze and expand equal the float64 reference (with the switch
on and off), and the whole model really takes the path under ``no_grad`` and leaves it when
autograd, autocast or another dtype needs the plain ops. Prepacked weights (:func:`prepack_weights`)
give the same results, are rebuilt after every change PyTorch tracks and never reach autograd. Also
the eval-mode CNN modules around it (FusedConvBlock with BN folding, the ConvTransBlock fusion path)
against float64, in both memory formats."""

import copy
import pickle
import sys
import threading

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer import dispatch
from fastconformer import reference as ref
from fastconformer.convert import convert_conv_trans_block
from fastconformer.dispatch import onednn, use_onednn
from fastconformer.modules.conv_block import FusedConvBlock
from fastconformer.modules.conv_trans_block import FusedConvTransBlock
from fastconformer.modules.fcu_down import FusedFCUDown
from fastconformer.modules.fcu_up import FusedFCUUp
from fastconformer.modules.onednn import onednn_linear, register_for_packing
from fastconformer.modules.onednn import CONV_SHAPES_MAX, PACKED_CONVS, register_conv_for_packing
from fastconformer.modules.prepack import _folded_convs, prepack_weights, prepacked_weights
from fastconformer.modules.transformer import FusedBlock
from fastconformer.testing import (HALF_FACTOR, HALF_SLACK, MODEL_TOL, assert_matches, onednn_calls, randomize_module,
                                   reference_and_fast, rel_error)

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


@SWITCH
@pytest.mark.parametrize("dw_stride, channels_last, add_x_t", [(4, True, True), (2, False, False), (1, True, False)])
def test_fused_fcu_down_eval(enabled, dw_stride, channels_last, add_x_t, gen):
    squeeze = ref.FCUDown(256, 384, dw_stride)
    expected_squeeze, fused = _eval_pair(squeeze, FusedFCUDown.from_reference, gen)
    H, W = 8 * dw_stride, 5 * dw_stride
    x2 = torch.randn(3, 256, H, W, generator=gen)
    if channels_last:
        x2 = x2.contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(3, 1 + 40, 384, generator=gen)
    with torch.no_grad(), onednn(enabled):
        calls = onednn_calls(lambda: fused(x2, x_t, add_x_t))
        expected = expected_squeeze(x2.double(), x_t.double()) + (x_t.double() if add_x_t else 0)
        assert_matches(fused(x2, x_t, add_x_t), expected, name=f"FCUDown dw_stride={dw_stride}")
    assert calls == (1 if enabled else 0)


@SWITCH
@pytest.mark.parametrize("up_stride", [4, 1])
def test_fused_fcu_up_eval(enabled, up_stride, gen):
    expand = ref.FCUUp(384, 64, up_stride)
    expected_expand, fused = _eval_pair(expand, FusedFCUUp.from_reference, gen)
    x_t = torch.randn(17, 3, 384, generator=gen).transpose(0, 1)  # (3, 1 + 4*4, 384), strided
    with torch.no_grad(), onednn(enabled):
        calls = onednn_calls(lambda: fused.forward_low_res(x_t, 4, 4))
        low = fused.forward_low_res(x_t, 4, 4)
        assert_matches(fused(x_t, 4, 4), expected_expand(x_t.double(), 4, 4), name=f"FCUUp up_stride={up_stride}")
    assert calls == (1 if enabled else 0)
    assert low.shape == (3, 64, 4, 4) and low.is_contiguous(memory_format=torch.channels_last)


def test_onednn_linear_checks_its_activation():
    with pytest.raises(ValueError, match="activation"):
        onednn_linear(torch.randn(2, 4), torch.randn(3, 4), None, activation="tanh")


needs_bf16 = pytest.mark.skipif(not dispatch.onednn_bf16_available(), reason="oneDNN has no native bfloat16 here")


def test_onednn_autocast_bf16_gates():
    x, w = torch.randn(3, 4), torch.randn(4, 4, requires_grad=True)
    with torch.no_grad():
        assert not dispatch.onednn_autocast_bf16(x, w), "only under autocast"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dispatch.onednn_autocast_bf16(x, w) == dispatch.onednn_bf16_available()
            assert dispatch.onednn_autocast_bf16(x.bfloat16(), w) == dispatch.onednn_bf16_available()
            assert not dispatch.onednn_autocast_bf16(x.half(), w) and not dispatch.onednn_autocast_bf16(x.double())
            with onednn(False):
                assert not dispatch.onednn_autocast_bf16(x, w)
        with torch.autocast("cpu", dtype=torch.float16):
            assert not dispatch.onednn_autocast_bf16(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dispatch.onednn_autocast_bf16(x, w), "autograd needs the plain ops"


@needs_bf16
@SWITCH
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32-stream", "bf16-stream"])
def test_fused_block_eval_under_bf16_autocast(enabled, x_dtype, gen):
    """Within 2x the reference Block's own error under the same autocast (+1e-6), in the dtype
    autocast gives the output; one bfloat16 oneDNN call per linear layer."""
    block = ref.Block(384, 6, qkv_bias=True)
    expected_block, fused = _eval_pair(block, FusedBlock.from_reference, gen)
    plain = copy.deepcopy(block).eval()
    x = torch.randn(3, 197, 384, generator=gen).to(x_dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), onednn(enabled):
        calls = onednn_calls(lambda: fused(x))
        out, baseline = fused(x), plain(x)
    expected = expected_block(x.double())
    assert out.dtype == baseline.dtype
    error, bound = rel_error(out, expected), HALF_FACTOR * rel_error(baseline, expected) + HALF_SLACK
    assert error <= bound, (error, bound)
    assert calls == (4 if enabled else 0)


@needs_bf16
def test_whole_model_under_bf16_autocast_with_prepacked_weights():
    model, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    fast.eval()
    plain = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    expected = copy.deepcopy(model).double().eval()(x.double())
    prepack_weights(fast)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _reorders(lambda: fast(x)) == 3 * 4, "the Blocks' weights packed in bfloat16 on first use"
        calls = onednn_calls(lambda: fast(x))
        out, baseline = fast(x), plain(x)
    assert calls == 3 * 4
    for o, b, e in zip(out, baseline, expected):
        assert rel_error(o, e) <= HALF_FACTOR * rel_error(b, e) + HALF_SLACK
    with torch.inference_mode():  # float32 next to the bfloat16 copies: packed on first use too
        assert _reorders(lambda: fast(x)) == 3 * 4 + 2 + FOLDED_CONV_CALLS
        assert_matches(fast(x), expected, fp32_tol=MODEL_TOL, name="fp32 after bf16")


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


def _conv_sums(fn) -> int:
    """How many convolutions ``fn()`` sums into their residual's buffer (oneDNN's sum post-op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_convolution_pointwise_")


@pytest.mark.parametrize("res_conv", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_block_sums_only_into_its_own_scratch(res_conv, channels_last, gen):
    """conv3 is summed into the residual branch's output (res_conv), never into the block's input."""
    block = ref.ConvBlock(64, 256 if res_conv else 64, res_conv=res_conv)
    expected_block, fused = _eval_pair(block, FusedConvBlock.from_reference, gen)
    x = torch.randn(3, 64, 14, 10, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    before = x.clone()
    with torch.no_grad():
        sums = _conv_sums(lambda: fused(x))
        out, _ = fused(x)
        with onednn(False):
            assert _conv_sums(lambda: fused(x)) == 0
    assert sums == int(res_conv) and torch.equal(x, before), "the block's input must stay as it was"
    assert_matches(out, expected_block(x.double())[0], name="ConvBlock output")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def _hook_cases(block):
    """(name, register(keep) -> handle) for each hook that sees the map cnn_block returns: on
    cnn_block or inside it (its output), on the fusion block's conv1 (its input), global ones (kept
    from those two modules only: the ReLUs' in-place writes into their inputs are the reference's
    own); and one that removes itself once it has seen the map."""
    conv1 = block.fusion_block.conv1
    module_hooks = nn.modules.module

    def once(keep):
        def hook(module, args, output):
            keep(module, args, output)
            handle.remove()
        handle = block.cnn_block.register_forward_hook(hook)
        return handle

    return [
        ("cnn_block", lambda keep: block.cnn_block.register_forward_hook(keep)),
        ("cnn_block.act3", lambda keep: block.cnn_block.act3.register_forward_hook(keep)),
        ("cnn_block, removes itself", once),
        ("fusion conv1 pre-hook", lambda keep: conv1.register_forward_pre_hook(lambda m, args: keep(m, args, None))),
        ("fusion conv1 hook", lambda keep: conv1.register_forward_hook(keep)),
        ("global", lambda keep: module_hooks.register_module_forward_hook(
            lambda m, args, out: keep(m, args, out) if m is block.cnn_block else None)),
        ("global pre-hook", lambda keep: module_hooks.register_module_forward_pre_hook(
            lambda m, args: keep(m, args, None) if m is conv1 else None)),
    ]


@pytest.mark.parametrize("last_fusion", [False, True])
def test_fusion_block_sums_into_the_cnn_output_unless_a_hook_saw_it(last_fusion, gen):
    """The fusion block's conv3 is summed into the map cnn_block returned (the block's own scratch),
    except when a hook could have kept that map (see _hook_cases): what any hook kept stays as it
    was. The block's input is never written."""
    block = ref.ConvTransBlock(64, 64, res_conv=last_fusion, stride=1, dw_stride=4, embed_dim=96, num_heads=2,
                               last_fusion=last_fusion)
    expected_block, fused = _eval_pair(block, convert_conv_trans_block, gen)
    x = torch.randn(2, 64, 16, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(2, 13, 96, generator=gen)
    before = x.clone()
    expected = expected_block(x.double(), x_t.double())
    with torch.no_grad():
        assert _conv_sums(lambda: fused(x, x_t)) == 1 + last_fusion  # cnn_block's sum only with its res_conv: none
        assert_matches(fused(x, x_t)[0], expected[0], name="ConvTransBlock x")
        assert torch.equal(x, before)
        for name, register in _hook_cases(fused):
            seen = []

            def keep(module, args, output):
                for t in (*args, *(output if isinstance(output, tuple) else (output,))):
                    if isinstance(t, torch.Tensor):
                        seen.append((t, t.clone()))

            handle, outs = register(keep), []
            try:
                # only into the residual convolutions' outputs (cnn_block's and the last fusion block's)
                assert _conv_sums(lambda: outs.append(fused(x, x_t))) == 2 * last_fusion, name
            finally:
                handle.remove()
            assert_matches(outs[0][0], expected[0], name=f"ConvTransBlock x, {name}")
            assert seen and all(torch.equal(kept, copy_) for kept, copy_ in seen), f"{name}: a kept map changed"
            assert torch.equal(x, before)


def test_residual_branch_seen_by_its_modules_is_not_summed_into(gen):
    """A residual BatchNorm in train mode runs as modules (its hooks see its output): conv3 is not
    summed into that output."""
    expected_block, fused = _eval_pair(ref.ConvBlock(64, 256, res_conv=True), FusedConvBlock.from_reference, gen)
    fused.residual_bn.train()
    kept = []
    fused.residual_bn.register_forward_hook(lambda m, args, out: kept.append((out, out.clone())))
    x = torch.randn(2, 64, 8, 8, generator=gen)
    with torch.no_grad():
        assert _conv_sums(lambda: fused(x)) == 0
    assert kept and all(torch.equal(a, b) for a, b in kept)


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
    # 12 Blocks x (qkv, proj + residual, fc1 + GELU, fc2 + residual), the 11 FCU squeezes and expands,
    # conv3 summed into the residual in the 11 fusion blocks and the 3 blocks with a residual convolution
    assert calls == 12 * 4 + 11 * 2 + 11 + 3
    graphs = sys.modules["fastconformer.modules.attention"]._GRAPHS  # the op's name shadows its module
    assert graphs.get(((1, 197, 3 * 384), 6, 64 ** -0.5)) is not None, "attention ran as a oneDNN Graph partition"
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


def _reorders(fn) -> int:
    """How many weight reorders into oneDNN's packed layouts ``fn()`` makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages()
               if e.key in ("mkldnn::_reorder_linear_weight", "mkldnn::_reorder_convolution_weight"))


# convolutions the tiny depth-3 model runs as folded conv_bn calls in float32 CPU inference (the stem's,
# conv1/conv2/conv3/residual_conv of the bottlenecks, but not the conv3s summed into a scratch residual nor the
# fusion blocks' conv1, which runs with bn1 + ReLU + the upsampled add): counted on this model
FOLDED_CONV_CALLS = 13


def test_prepacked_weights_give_the_same_model_and_follow_every_tracked_change():
    model, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    fast.eval()
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    linear, convs = 3 * 4 + 2, len(_folded_convs(fast))  # 3 Blocks, 2 squeezes; the stem's and bottlenecks' convs
    assert prepack_weights(fast) is fast and prepacked_weights(fast) == linear + convs
    with torch.inference_mode():
        first = _reorders(lambda: fast(x))
        assert first == linear + FOLDED_CONV_CALLS, "each registered weight is packed on first use"
        assert _reorders(lambda: fast(x)) == 0, "and then read packed"
        expected = copy.deepcopy(model).double().eval()(x.double())
        assert_matches(fast(x), expected, fp32_tol=MODEL_TOL, name="prepacked logits")
        with onednn(False):
            assert _reorders(lambda: fast(x)) == 0

    # load_state_dict (copy_ into the parameters) and an in-place update under no_grad are both seen
    other, _ = reference_and_fast("conformer_tiny_patch16", seed=5, depth=3)
    fast.load_state_dict(other.state_dict())
    with torch.no_grad():
        fast.trans_1.mlp.fc1.weight.mul_(1.5)
        other.trans_1.mlp.fc1.weight.mul_(1.5)
    with torch.inference_mode():
        assert _reorders(lambda: fast(x)) == first
        assert_matches(fast(x), copy.deepcopy(other).double().eval()(x.double()), fp32_tol=MODEL_TOL,
                       name="after load_state_dict")

    # a replaced Parameter is not registered: read as it is; prepack_weights again registers it
    block = fast.conv_trans_2.trans_block.attn.qkv
    block.weight = nn.Parameter(block.weight.detach() * 0.5)
    assert prepacked_weights(fast) == linear + convs - 1
    prepack_weights(fast)
    assert prepacked_weights(fast) == linear + convs

    # copies start unpacked (packed copies cannot be pickled or deep-copied) and compute the same
    with torch.inference_mode():
        expected = fast(x)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert prepacked_weights(clone) == 0
        with torch.inference_mode():
            assert _reorders(lambda: clone(x)) == 0
            assert all(torch.equal(o, e) for o, e in zip(clone(x), expected))
    assert prepack_weights(fast, enabled=False) is fast and prepacked_weights(fast) == 0


@pytest.mark.parametrize("make_optimizer", [lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
                                            lambda ps: torch.optim.SGD(ps, lr=1e-1, fused=True),
                                            lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)],
                         ids=["adam-fused", "sgd-fused", "adamw-foreach"])
def test_prepacked_weights_follow_fused_optimizer_steps(make_optimizer):
    """The fused optimizer kernels write parameters without moving their version counters (torch
    2.13); the packed copies must still be rebuilt after such a step, never served stale: after
    step() returns, and in the optimizer's own step post-hook (an EMA or per-step evaluation), which
    torch runs before the global hooks."""
    _, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    fast = prepack_weights(fast.eval())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(list(fast.parameters()))
    errors = []

    def compare_with_unpacked(*_):
        with torch.inference_mode():
            out, unpacked = fast(x), copy.deepcopy(fast)(x)  # a copy starts unpacked
        errors.append(max(rel_error(o, u) for o, u in zip(out, unpacked)))

    optimizer.register_step_post_hook(compare_with_unpacked)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        with torch.inference_mode():
            fast(x)  # packs (first round) or rebuilds from the last step's weights
        for p in fast.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        compare_with_unpacked()
    assert len(errors) == 4 and max(errors) <= 1e-5, errors


def test_prepacked_convolutions_are_exact_per_shape_and_follow_their_batch_norm():
    """Folded convolution weights packed for each input shape and layout (the first CONV_SHAPES_MAX
    a convolution meets; later ones run unpacked): the float64 reference's logits within the
    model's tolerance and the unpacked model's within 1e-6 (oneDNN may pick another kernel for a
    packed layout: bitwise equal at most shapes, 1.4e-7 at 256x320 here), NCHW and channels_last,
    odd batches; a BatchNorm statistic or a weight changed in place is seen; in train mode nothing
    is packed."""
    model, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    model = model.double().eval()
    fast = prepack_weights(fast.eval())
    packed = prepack_weights(copy.deepcopy(fast))
    for conv, _ in _folded_convs(fast):  # linear layers packed in both: the convolutions' packing compared alone
        register_conv_for_packing(conv, (), False)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3, 3, 64, 96, generator=gen), torch.randn(1, 3, 256, 320, generator=gen),
              torch.randn(3, 3, 64, 96, generator=gen).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3, 64, 64, generator=gen), torch.randn(5, 3, 32, 48, generator=gen)]
    stem = packed.conv1

    def check(what):
        with torch.no_grad():
            for x in inputs:
                out = packed(x)
                assert_matches(out, model(x.double()), fp32_tol=MODEL_TOL, name=what)
                assert all(rel_error(a, b) <= 1e-6 for a, b in zip(out, fast(x))), what

    check("first use")
    assert len(PACKED_CONVS._entries[stem][1]) == CONV_SHAPES_MAX, "four shapes packed, the fifth runs unpacked"
    for m in (fast, packed, model):
        with torch.no_grad():
            m.conv_trans_2.cnn_block.bn2.running_var.mul_(1.7)
            m.conv1.weight.add_(0.01)
        m.conv_1.bn1.eps = 0.5  # a plain number: in the key, not in the stamp
    check("after BatchNorm statistics, a weight and an eps changed in place")
    for m in (fast, packed, model):
        m.conv_trans_2.cnn_block.train()
    with torch.no_grad():
        assert _reorders(lambda: packed(inputs[0])) == 0  # the other blocks' packs are kept; train mode packs none
        fast(inputs[0])
        model(inputs[0].double())
    for m in (fast, packed, model):
        m.eval()
    check("back in eval mode, after train mode updated the running statistics")


def test_prepacked_convolutions_keep_their_bound_under_threads():
    """Threads calling one prepacked model with more shapes than CONV_SHAPES_MAX at once: every
    result right, at most CONV_SHAPES_MAX packed copies per convolution."""
    _, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    fast = fast.eval()
    packed = prepack_weights(copy.deepcopy(fast))
    inputs = [torch.randn(b, 3, 32, 32 + 16 * b, generator=torch.Generator().manual_seed(b)) for b in range(1, 7)]
    with torch.no_grad():
        expected = [fast(x) for x in inputs]
    errors = []

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                if not all(rel_error(a, b) <= 1e-6 for a, b in zip(packed(inputs[i]), expected[i])):
                    errors.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(PACKED_CONVS._entries[packed.conv1][1]) == CONV_SHAPES_MAX


def test_prepacked_model_compiles_in_one_graph():
    """torch.compile traces around the packed path (its registry lookup is not traceable): one graph."""
    _, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    packed = prepack_weights(fast.eval())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.compiler.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(packed)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_prepacked_weights_follow_new_storage():
    """A parameter given other storage (dtype round trips, ``param.data = ...``) or other strides
    on the same storage (``param.data = param.data.t()``) is repacked, even where the new storage
    could take the old one's address."""
    linear = nn.Linear(384, 1152)
    register_for_packing(linear.weight)
    x = torch.randn(5, 384)

    def check(what):
        with torch.no_grad():
            out = onednn_linear(x, linear.weight, linear.bias)
            assert torch.allclose(out, torch.nn.functional.linear(x, linear.weight, linear.bias), atol=1e-5), what

    check("first use")
    linear.bfloat16().float()  # rounds the weights; same version counter, new storage
    check("after bfloat16().float()")
    for step in range(3):
        linear.weight.data = linear.weight.data * 2  # new storage each time, the old one freed
        check(f"after param.data = ... ({step})")
    square = nn.Linear(384, 384)
    register_for_packing(square.weight)
    linear, x = square, torch.randn(5, 384)
    check("square, first use")
    square.weight.data = square.weight.data.t()  # same storage, version, dtype and shape: other strides
    check("after param.data = param.data.t()")


def test_parameters_made_in_inference_mode_cannot_be_prepacked():
    with torch.inference_mode():
        model = fastconformer.create_model("conformer_tiny_patch16", depth=3, fast=True)
    with pytest.raises(ValueError, match="inference_mode"):
        prepack_weights(model)


def test_prepacked_weights_never_reach_autograd():
    _, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    prepack_weights(fast.eval())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast(x)  # packs
    out = fast(x)
    sum(o.sum() for o in out).backward()
    for name, p in fast.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert fast.trans_1.attn.qkv.weight.grad.norm() > 0


def test_prepack_weights_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        prepack_weights("model")
    with pytest.raises(TypeError, match="bool"):
        prepack_weights(nn.Linear(2, 2), enabled="yes")
    reference = fastconformer.create_model("conformer_tiny_patch16", depth=3)
    with pytest.raises(ValueError, match="convert"):
        prepack_weights(reference)
    assert prepack_weights(reference, enabled=False) is reference
