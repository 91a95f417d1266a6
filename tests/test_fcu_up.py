"""FusedFCUUp (fused expand) and FusedConvTransBlock (fused fusion-block input) against the float64
reference: outputs, running statistics, gradients, layouts, autocast, both backends."""

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastconformer import backend
from fastconformer.dispatch import onednn, onednn_bf16_available
from fastconformer.modules import conv_trans_block as conv_trans_block_module
from fastconformer.modules.conv_block import FusedConvBlock
from fastconformer.modules.conv_trans_block import FusedConvTransBlock
from fastconformer.modules.fcu_up import (FusedFCUUp, batch_norm_scale_shift, bn_relu_add_upsampled,
                                          fcu_up_expand)
from fastconformer.reference import ConvTransBlock, FCUUp
from fastconformer.testing import (HALF_FACTOR, HALF_SLACK, MODULE_TOL, assert_matches, bn_buffers, randomize_module,
                                   rel_error, to_float64)

HALF = torch.float16


def _tokens(B, h, w, D, gen, device, noncontiguous=False):
    """(B, 1 + h*w, D) float32 tokens on ``device`` (drawn on the CPU with ``gen``); non-contiguous:
    a strided view of a larger (1 + h*w, B, D + 8) tensor."""
    if noncontiguous:
        return torch.randn(1 + h * w, B, D + 8, generator=gen).to(device)[..., :D].transpose(0, 1)
    return torch.randn(B, 1 + h * w, D, generator=gen).to(device)


def _assert_matches_baseline(out, ref, baseline, name="output"):
    """The reduced-precision policy (twice the plain-PyTorch error) also for float32 tensors that
    carry reduced-precision error (autocast outputs and BatchNorm buffers)."""
    bound = HALF_FACTOR * rel_error(baseline, ref) + HALF_SLACK
    assert_matches(out, ref, baseline=baseline, fp32_tol=max(bound, MODULE_TOL), name=name)


def _assert_buffers_match(fused, ref64, baseline=None):
    """BatchNorm buffers of ``fused`` against the float64 reference's after the same run. With a
    ``baseline`` (the reference run in reduced precision, or under autocast with float32 buffers)
    the bound is twice the baseline's error, as for outputs."""
    fused_bufs, ref_bufs = bn_buffers(fused), bn_buffers(ref64)
    base_bufs = None if baseline is None else bn_buffers(baseline)
    assert list(fused_bufs) == list(ref_bufs)
    for k, v in fused_bufs.items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == ref_bufs[k].item(), k
        elif base_bufs is None:
            assert_matches(v, ref_bufs[k], name=k)
        else:
            _assert_matches_baseline(v, ref_bufs[k], base_bufs[k], name=k)


# --------------------------------------------------------------------------------------------
# The expand alone

# (D, C, up_stride, token grid, batch, non-contiguous tokens, dtype): the variants' C (16..384) and odd ones.
FCU_CASES = [
    (384, 16, 4, (14, 14), 3, False, torch.float32),   # tiny/16, stage 2
    (384, 40, 8, (7, 7), 2, True, torch.float32),      # odd C, patch 32 stage 2
    (576, 100, 4, (16, 20), 1, True, torch.float32),   # odd C, base/16 stage 2 at 256x320
    (576, 384, 1, (8, 10), 1, False, torch.float32),   # base/16, stage 4 (256x320 at patch 32)
    (384, 16, 4, (14, 14), 3, False, HALF),
    (576, 192, 2, (7, 7), 2, False, HALF),             # base/32-like stage 3
]


def _capture_low(module, method):
    """Record what ``module.<method>`` returns (the pre-upsampling map) in a list."""
    captured = []
    if method == "act":  # the reference: its act's output
        module.act.register_forward_hook(lambda _m, _i, out: captured.append(out))
        return captured
    real = module.forward_low_res
    module.forward_low_res = lambda *args: captured.append(real(*args)) or captured[-1]
    return captured


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", FCU_CASES, ids=[f"D{c[0]}-C{c[1]}-s{c[2]}-{c[3][0]}x{c[3][1]}-{str(c[6])[6:]}"
                                                 for c in FCU_CASES])
def test_fcu_up_matches_reference(backend_name, device, gen, case, mode):
    D, C, up, (h, w), B, noncontiguous, dtype = case
    ref = randomize_module(FCUUp(D, C, up), gen).to(device).train(mode == "train")
    x_t = _tokens(B, h, w, D, gen, device, noncontiguous)
    ref64 = copy.deepcopy(ref).double()
    ref_low = _capture_low(ref64, "act")
    expected = ref64(to_float64(x_t), h, w)
    baseline_mod = baseline = base_low = None
    if dtype != torch.float32:
        baseline_mod = copy.deepcopy(ref).to(dtype)
        base_low = _capture_low(baseline_mod, "act")
        baseline = baseline_mod(x_t.to(dtype), h, w)

    fused = FusedFCUUp.from_reference(copy.deepcopy(ref).to(dtype))
    low = _capture_low(fused, "forward_low_res")
    out = fused(x_t.to(dtype), h, w)
    assert out.dtype == dtype and out.shape == (B, C, h * up, w * up)
    assert low[0].shape == (B, C, h, w)
    assert_matches(out, expected, baseline=baseline, name="output")
    assert_matches(low[0], ref_low[0], baseline=base_low and base_low[0], name="low-res output")
    _assert_buffers_match(fused, ref64, baseline_mod)


def test_fcu_up_keeps_nan_and_inf(gen):
    """Non-finite tokens give non-finite outputs where the reference's are (CPU inference takes the
    oneDNN inner product: its ReLU post-op would turn NaN into 0, so the ReLU is torch's)."""
    D, C, up, h, w = 384, 64, 4, 14, 14
    ref = randomize_module(FCUUp(D, C, up), gen).eval()
    x_t = _tokens(2, h, w, D, gen, "cpu")
    x_t[0, 5, 3], x_t[1, 20, 7] = float("nan"), float("inf")
    fused = FusedFCUUp.from_reference(copy.deepcopy(ref))
    with torch.no_grad():
        expected, out = ref.double()(x_t.double(), h, w), fused(x_t, h, w)
    assert not expected.isfinite().all()
    assert torch.equal(out.isfinite(), expected.isfinite()), "NaN/Inf where the reference has them"
    finite = expected.isfinite()
    assert rel_error(out[finite], expected[finite]) <= MODULE_TOL


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fcu_up_gradients(backend_name, device, gen, mode):
    D, C, up, (h, w), B = 384, 40, 2, (7, 7), 3
    ref = randomize_module(FCUUp(D, C, up), gen).to(device).train(mode == "train")
    x_t = _tokens(B, h, w, D, gen, device)
    grad_out = torch.randn(B, C, h * up, w * up, generator=gen).to(device)

    def grads(module, dtype):
        x = x_t.to(dtype).requires_grad_()
        module(x, h, w).backward(grad_out.to(dtype))
        return {"x_t": x.grad, **{n: p.grad for n, p in module.named_parameters()}}

    expected = grads(copy.deepcopy(ref).double(), torch.float64)
    got = grads(FusedFCUUp.from_reference(copy.deepcopy(ref)), torch.float32)
    assert list(got) == list(expected)
    for name, g in got.items():
        if mode == "train" and name == "conv_project.bias":
            # Batch statistics cancel the conv bias: its gradient is zero up to rounding.
            assert g.abs().max() <= 1e-5 * expected["conv_project.weight"].abs().max()
        else:
            assert_matches(g, expected[name], name=f"grad {name}")


# (D, C, token grid, batch, non-contiguous tokens, ReLU, dtype): Conformer-S's stage-1 and stage-3 expand, odd C.
EXPAND_GRAD_CASES = [
    (384, 64, (14, 14), 2, False, True, torch.float32),
    (384, 40, (7, 7), 3, True, False, torch.float32),
    (384, 16, (14, 14), 1, False, True, HALF),
    (576, 192, (7, 7), 2, True, True, HALF),
]


def _expand_reference(x_t, weight, scale, shift, h, w, apply_relu):
    B, C = x_t.shape[0], weight.shape[0]
    y = (x_t[:, 1:] @ weight.t()) * scale.to(x_t.dtype) + shift.to(x_t.dtype)
    y = torch.relu(y) if apply_relu else y
    return y.transpose(1, 2).reshape(B, C, h, w)


@pytest.mark.parametrize("D,C,hw,B,noncontiguous,apply_relu,dtype", EXPAND_GRAD_CASES,
                         ids=[f"D{c[0]}-C{c[1]}-{c[2][0]}x{c[2][1]}-{'relu' if c[5] else 'linear'}-{str(c[6])[6:]}"
                              for c in EXPAND_GRAD_CASES])
def test_fcu_up_expand_gradients(backend_name, device, gen, D, C, hw, B, noncontiguous, apply_relu, dtype):
    h, w = hw
    x_t = _tokens(B, h, w, D, gen, device, noncontiguous)
    leaves = [t.to(device) for t in (torch.randn(C, D, generator=gen) / D**0.5, 1 + 0.5 * torch.randn(C, generator=gen),
                                     0.5 * torch.randn(C, generator=gen))]
    grad_out = torch.randn(B, C, h, w, generator=gen).to(device)

    def grads(dtype, fn):
        x = x_t.detach().to(dtype).requires_grad_()
        weight = leaves[0].detach().to(dtype).requires_grad_()
        affine = [t.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
                  for t in leaves[1:]]
        fn(x, weight, *affine, h, w, apply_relu).backward(grad_out.to(dtype))
        return [x.grad, weight.grad] + [t.grad for t in affine]

    expected = grads(torch.float64, _expand_reference)
    got = grads(dtype, fcu_up_expand)
    assert got[0].dtype == dtype and got[0].shape == x_t.shape
    assert (got[0][:, 0] == 0).all()
    baseline = grads(dtype, _expand_reference) if dtype == HALF else [None] * 4
    for name, g, e, base in zip(("x_t", "weight", "scale", "shift"), got, expected, baseline):
        if base is None:
            assert_matches(g, e, name=f"grad {name}")
        else:
            _assert_matches_baseline(g, e, base, name=f"grad {name}")


def test_fcu_up_expand_gradcheck(gen):
    """The torch path's backward, by finite differences in float64."""
    B, D, C, h, w = 1, 5, 3, 2, 3

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    args = [draw(B, 1 + h * w, D), draw(C, D), draw(C), draw(C)]
    with backend("torch"):
        for apply_relu in (False, True):
            assert torch.autograd.gradcheck(lambda *a, relu=apply_relu: fcu_up_expand(*a, h, w, relu), args)


def test_fcu_up_bf16_inference_runs_a_bf16_gemm(gen, monkeypatch):
    """The eval-mode expand in bf16 CPU inference computes its GEMM on bf16 operands (oneDNN), not
    on fp32 copies; with autograd, or the oneDNN switch off, on fp32 copies."""
    fused = FusedFCUUp.from_reference(randomize_module(FCUUp(384, 64, 4), gen)).eval()
    x_t = _tokens(2, 14, 14, 384, gen, "cpu")
    seen = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w, *rest: seen.append(w.dtype) or linear(a, w, *rest))
    with backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fused.forward_low_res(x_t, 14, 14)
            with onednn(False):
                fused.forward_low_res(x_t, 14, 14)
        fused.forward_low_res(x_t, 14, 14)
    expected = torch.bfloat16 if onednn_bf16_available() else torch.float32
    assert seen == [expected, torch.float32, torch.float32]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_fcu_up_autocast_bf16(grad, gen):
    """With autograd the expand's GEMM runs in fp32 on bf16-rounded inputs; without (inference) as
    a bf16 GEMM rounded once, as the reference's convolution; both within the bf16 policy."""
    ref = randomize_module(FCUUp(384, 64, 4), gen)
    x_t = _tokens(2, 14, 14, 384, gen, "cpu")
    for mode in (False, True):
        ref64 = copy.deepcopy(ref).double().train(mode)
        expected = ref64(to_float64(x_t), 14, 14)
        baseline_mod, fused = copy.deepcopy(ref).train(mode), FusedFCUUp.from_reference(copy.deepcopy(ref)).train(mode)
        with backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            baseline = baseline_mod(x_t, 14, 14)
            out = fused(x_t, 14, 14)
        assert out.dtype == baseline.dtype == torch.bfloat16
        _assert_matches_baseline(out, expected, baseline)
        _assert_buffers_match(fused, ref64, baseline_mod)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fcu_up_autocast_reads_fp32_tokens(backend_name, device, gen, mode):
    """Under autocast (fp16: the interpreter's bf16 dots are garbage) the expand's kernel gets the
    fp32 tokens themselves, not an fp16 copy, rounds them in registers, and matches the reference
    within the fp16 policy (its own autocast run as the baseline), gradients included."""
    D, C, up, (h, w), B = 384, 40, 2, (7, 7), 3
    ref = randomize_module(FCUUp(D, C, up), gen).to(device).train(mode == "train")
    x_t = _tokens(B, h, w, D, gen, device)
    grad = torch.randn(B, C, h * up, w * up, generator=gen).to(device)
    ref64 = copy.deepcopy(ref).double()
    x64 = to_float64(x_t).requires_grad_()
    expected = ref64(x64, h, w)
    expected.backward(to_float64(grad))
    baseline_mod, fused = copy.deepcopy(ref), FusedFCUUp.from_reference(copy.deepcopy(ref))
    leaves = [x_t.clone().requires_grad_(), x_t.clone().requires_grad_()]
    with torch.autocast(device.type, dtype=HALF):
        baseline = baseline_mod(leaves[0], h, w)
        out = fused(leaves[1], h, w)
    assert out.dtype == baseline.dtype == HALF
    for o in (baseline, out):
        o.backward(grad.to(HALF))
    _assert_matches_baseline(out, expected, baseline)
    _assert_matches_baseline(leaves[1].grad, x64.grad, leaves[0].grad, name="grad x_t")
    _assert_matches_baseline(fused.conv_project.weight.grad, ref64.conv_project.weight.grad,
                             baseline_mod.conv_project.weight.grad, name="grad conv weight")
    _assert_buffers_match(fused, ref64, baseline_mod)
    if backend_name == "triton":
        from fastconformer.kernels import record_launches

        with torch.no_grad(), record_launches() as launches, torch.autocast(device.type, dtype=HALF):
            fused.eval()(x_t, h, w)
        (expand,) = [launch for launch in launches if launch.kernel.fn.__name__ == "fcu_up_expand_kernel"]
        assert expand.args[0].dtype == torch.float32 and expand.args[0].data_ptr() == x_t.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fcu_up_bf16_on_gpu(backend_name, device, gen, mode):
    ref = randomize_module(FCUUp(576, 96, 4), gen).train(mode == "train")
    x_t = _tokens(5, 14, 14, 576, gen, device)
    expected = copy.deepcopy(ref).double().to(device)(to_float64(x_t), 14, 14)
    baseline = copy.deepcopy(ref).to(device, torch.bfloat16)(x_t.to(torch.bfloat16), 14, 14)
    fused = FusedFCUUp.from_reference(copy.deepcopy(ref).to(device, torch.bfloat16))
    assert_matches(fused(x_t.to(torch.bfloat16), 14, 14), expected, baseline=baseline)


# --------------------------------------------------------------------------------------------
# The fusion block's input: relu(bn1(conv1_out)) + upsample(low)

# (C, up, (H, W), batch, layout, dtype); "strided": neither contiguous nor channels_last, low transposed.
UPSAMPLE_ADD_CASES = [
    (16, 4, (56, 56), 3, "contiguous", torch.float32),
    (40, 8, (56, 56), 1, "channels_last", torch.float32),
    (100, 2, (28, 40), 2, "strided", torch.float32),
    (384, 1, (14, 14), 1, "channels_last", HALF),
    (64, 2, (16, 20), 3, "contiguous", HALF),
    (24, 4, (32, 40), 1, "strided", HALF),
]


@pytest.mark.parametrize("C,up,hw,B,layout,dtype", UPSAMPLE_ADD_CASES,
                         ids=[f"C{c[0]}-s{c[1]}-{c[4]}-{str(c[5])[6:]}" for c in UPSAMPLE_ADD_CASES])
def test_bn_relu_add_upsampled(backend_name, device, gen, C, up, hw, B, layout, dtype):
    H, W = hw
    x = torch.randn(B, C, H, W, generator=gen).to(device) * 2
    low = torch.randn(B, C, H // up, W // up, generator=gen).to(device)
    scale = (1 + 0.5 * torch.randn(C, generator=gen)).to(device)
    shift = (0.5 * torch.randn(C, generator=gen)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither contiguous nor channels_last, and a transposed low
        x = torch.randn(B, C, W, H, generator=gen).to(device).transpose(2, 3)
        low = torch.randn(B, C, W // up, H // up, generator=gen).to(device).transpose(2, 3)

    def reference(x, low):
        bn = x * scale.to(x.dtype).view(1, C, 1, 1) + shift.to(x.dtype).view(1, C, 1, 1)
        return torch.relu(bn) + F.interpolate(low, size=(H, W))

    expected = reference(to_float64(x), to_float64(low))
    baseline = reference(x.to(dtype), low.to(dtype)) if dtype != torch.float32 else None
    out = bn_relu_add_upsampled(x.to(dtype), scale, shift, low.to(dtype), up)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(out, expected, baseline=baseline)


# (B, C, H, W, up, layout, dtype): FusedConvTransBlock's shapes (stage 1 and 3 of Conformer-S) and an odd one.
UPSAMPLE_ADD_GRAD_CASES = [
    (2, 24, 16, 20, 4, "contiguous", torch.float32),
    (1, 64, 56, 56, 4, "channels_last", torch.float32),
    (3, 16, 28, 28, 2, "channels_last", HALF),
    (1, 256, 14, 14, 1, "contiguous", HALF),
]


def _upsample_add_reference(x, s, t, low, up):
    C, H, W = x.shape[1:]
    return torch.relu(x * s.view(1, C, 1, 1) + t.view(1, C, 1, 1)) + F.interpolate(low, size=(H, W))


@pytest.mark.parametrize("B,C,H,W,up,layout,dtype", UPSAMPLE_ADD_GRAD_CASES,
                         ids=[f"C{c[1]}-s{c[4]}-{c[5]}-{str(c[6])[6:]}" for c in UPSAMPLE_ADD_GRAD_CASES])
def test_bn_relu_add_upsampled_gradients(backend_name, device, gen, B, C, H, W, up, layout, dtype):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    leaves = [t.to(device) for t in (torch.randn(B, C, H, W, generator=gen), 1 + 0.5 * torch.randn(C, generator=gen),
                                     0.5 * torch.randn(C, generator=gen),
                                     torch.randn(B, C, H // up, W // up, generator=gen))]
    leaves[0] = leaves[0].contiguous(memory_format=fmt)
    grad_out = torch.randn(B, C, H, W, generator=gen).to(device)

    def grads(dtype, fn):
        ts = [t.detach().to(dtype).requires_grad_() for t in leaves]
        ts[1:3] = [t.detach().float().requires_grad_() if dtype == HALF else t for t in ts[1:3]]
        fn(*ts, up).backward(grad_out.to(dtype))
        return [t.grad for t in ts]

    expected = grads(torch.float64, _upsample_add_reference)
    got = grads(dtype, bn_relu_add_upsampled)
    baseline = grads(dtype, lambda x, s, t, low, up: _upsample_add_reference(x, s.to(dtype), t.to(dtype), low, up)
                     ) if dtype == HALF else [None] * 4
    assert got[0].shape == leaves[0].shape and got[0].dtype == dtype
    for name, g, e, base in zip(("x", "scale", "shift", "low"), got, expected, baseline):
        if base is None:
            assert_matches(g, e, name=f"grad {name}")
        else:  # grads of the fp32 scale and shift carry the fp16 grad's rounding: the half policy for all
            _assert_matches_baseline(g, e, base, name=f"grad {name}")


def test_bn_relu_add_upsampled_gradcheck(gen):
    """The torch path's backward, by finite differences in float64."""
    B, C, H, W, up = 1, 3, 4, 6, 2
    args = [torch.randn(B, C, H, W, generator=gen, dtype=torch.float64), 1 + torch.rand(C, dtype=torch.float64),
            0.3 * torch.randn(C, generator=gen, dtype=torch.float64),
            torch.randn(B, C, H // up, W // up, generator=gen, dtype=torch.float64)]
    with backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: bn_relu_add_upsampled(*a, up),
                                        [a.requires_grad_() for a in args],
                                        fast_mode=True)


# --------------------------------------------------------------------------------------------
# Whole ConvTransBlocks, every kind of block shape in the four variants

S16, B16 = dict(embed_dim=384, num_heads=6, qkv_bias=True), dict(embed_dim=576, num_heads=9, qkv_bias=True)
# id -> (ConvTransBlock args, kwargs, x's (H, W), batch, channels_last)
BLOCKS = {
    "tiny16-stage2": ((64, 64, False, 1, 4), S16, (56, 56), 3, False),
    "tiny16-last-fusion-256x320": ((256, 256, False, 1, 1), dict(S16, last_fusion=True), (16, 20), 2, True),
    "small16-stage3-first": ((256, 512, True, 2, 2), S16, (56, 56), 1, False),
    "small16-stage4": ((1024, 1024, False, 1, 1), S16, (14, 14), 1, True),
    "small32-stage2-256x320": ((256, 256, False, 1, 8), S16, (64, 80), 1, False),
    "small32-stage4-first": ((512, 1024, True, 2, 2), S16, (28, 28), 1, True),
    "base16-stage3": ((768, 768, False, 1, 2), B16, (28, 28), 1, False),
    "base16-last-fusion": ((1536, 1536, False, 1, 1), dict(B16, last_fusion=True), (14, 14), 1, True),
}
# (block, dtype, mode): every block shape once, both modes and half precision on the cheapest.
BLOCK_RUNS = [
    ("tiny16-stage2", torch.float32, "train"),
    ("tiny16-stage2", HALF, "eval"),
    ("tiny16-stage2", HALF, "train"),
    ("tiny16-last-fusion-256x320", torch.float32, "eval"),
    ("small16-stage3-first", torch.float32, "train"),
    ("small16-stage4", torch.float32, "eval"),
    ("small32-stage2-256x320", torch.float32, "train"),
    ("small32-stage4-first", torch.float32, "eval"),
    ("base16-stage3", torch.float32, "eval"),
    ("base16-last-fusion", torch.float32, "train"),
]


@functools.cache
def _block_case(name, dtype, mode, device):
    """(reference block, x, x_t, float64 module after the run, float64 outputs, baseline module
    after the run, baseline outputs) for one block, all on ``device``; the baseline (the reference
    run in dtype) only for half precision. Cached: each reference runs once for both backends."""
    args, kwargs, (H, W), B, channels_last = BLOCKS[name]  # args: inplanes, outplanes, res_conv, stride, dw_stride
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    block = randomize_module(ConvTransBlock(*args, **kwargs), gen).to(device).train(mode == "train")
    inplanes, _, _, stride, dw_stride = args
    grid = (H // stride // dw_stride, W // stride // dw_stride)
    x = torch.randn(B, inplanes, H, W, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(B, 1 + grid[0] * grid[1], kwargs["embed_dim"], generator=gen).to(device)
    with torch.no_grad():
        ref64 = copy.deepcopy(block).double()
        expected = ref64(to_float64(x), to_float64(x_t))
        baseline_mod = baseline = None
        if dtype != torch.float32:
            baseline_mod = copy.deepcopy(block).to(dtype)
            baseline = baseline_mod(x.to(dtype), x_t.to(dtype))
    return block, x, x_t, ref64, expected, baseline_mod, baseline


@pytest.mark.parametrize("name,dtype,mode", BLOCK_RUNS, ids=[f"{n}-{str(d)[6:]}-{m}" for n, d, m in BLOCK_RUNS])
def test_conv_trans_block_matches_reference(backend_name, device, name, dtype, mode):
    block, x, x_t, ref64, expected, baseline_mod, baseline = _block_case(name, dtype, mode, device)
    fused = FusedConvTransBlock.from_reference(copy.deepcopy(block).to(dtype))
    assert isinstance(fused.expand_block, FusedFCUUp)
    with torch.no_grad():
        out = fused(x.to(dtype), x_t.to(dtype))
    assert out[0].dtype == out[1].dtype == dtype
    assert out[0].shape == expected[0].shape and out[1].shape == expected[1].shape
    assert_matches(out[0], expected[0], baseline=None if baseline is None else baseline[0], name="x")
    assert_matches(out[1], expected[1], baseline=None if baseline is None else baseline[1], name="x_t")
    _assert_buffers_match(fused, ref64, baseline_mod)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_conv_trans_block_gradients(backend_name, device, gen, mode):
    # tiny/16's first stage-3 block: stride 2, res_conv, dw_stride 2.
    block = randomize_module(ConvTransBlock(64, 128, True, 2, 2, 384, num_heads=6, qkv_bias=True), gen).to(device)
    block.train(mode == "train")
    x = torch.randn(1, 64, 56, 56, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(1, 197, 384, generator=gen).to(device)
    g_x, g_t = (torch.randn(1, 128, 28, 28, generator=gen).to(device),
                torch.randn(1, 197, 384, generator=gen).to(device))

    def grads(module, dtype):
        inputs = [x.to(dtype).requires_grad_(), x_t.to(dtype).requires_grad_()]
        out = module(*inputs)
        torch.autograd.backward(out, (g_x.to(dtype), g_t.to(dtype)))
        return {"x": inputs[0].grad, "x_t": inputs[1].grad, **{n: p.grad for n, p in module.named_parameters()}}

    expected = grads(copy.deepcopy(block).double(), torch.float64)
    got = grads(FusedConvTransBlock.from_reference(copy.deepcopy(block)), torch.float32)
    assert list(got) == list(expected)
    for name, g in got.items():
        if mode == "train" and name == "expand_block.conv_project.bias":
            assert g.abs().max() <= 1e-5 * expected["expand_block.conv_project.weight"].abs().max()
        else:
            assert_matches(g, expected[name], name=f"grad {name}")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_conv_trans_block_autocast_bf16(grad, gen):
    block = randomize_module(ConvTransBlock(64, 64, False, 1, 4, 384, num_heads=6, qkv_bias=True), gen).eval()
    x, x_t = torch.randn(2, 64, 56, 56, generator=gen), torch.randn(2, 197, 384, generator=gen)
    expected = copy.deepcopy(block).double()(to_float64(x), to_float64(x_t))
    fused = FusedConvTransBlock.from_reference(copy.deepcopy(block))
    with backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        baseline = block(x, x_t)
        out = fused(x, x_t)
    for o, b, e, name in zip(out, baseline, expected, ("x", "x_t")):
        assert o.dtype == b.dtype
        _assert_matches_baseline(o, e, b, name=name)


@pytest.mark.gpu
def test_conv_trans_block_bf16_on_gpu(backend_name, device, gen):
    block = randomize_module(ConvTransBlock(256, 512, True, 2, 2, 384, num_heads=6, qkv_bias=True), gen).train()
    x, x_t = torch.randn(3, 256, 56, 56, generator=gen), torch.randn(3, 197, 384, generator=gen)
    expected = copy.deepcopy(block).double().to(device)(to_float64(x).to(device), to_float64(x_t).to(device))
    half = copy.deepcopy(block).to(device, torch.bfloat16)
    baseline = half(x.to(device, torch.bfloat16), x_t.to(device, torch.bfloat16))
    fused = FusedConvTransBlock.from_reference(copy.deepcopy(block).to(device, torch.bfloat16))
    out = fused(x.to(device, torch.bfloat16), x_t.to(device, torch.bfloat16))
    for o, b, e in zip(out, baseline, expected):
        assert_matches(o, e, baseline=b)


# --------------------------------------------------------------------------------------------
# BatchNorm semantics, module structure, state, errors

@pytest.mark.parametrize("config", [dict(), dict(momentum=None), dict(momentum=0.3), dict(affine=False),
                                    dict(track_running_stats=False)], ids=lambda c: str(c) or "default")
def test_batch_norm_scale_shift_matches_batchnorm2d(gen, config):
    bn = randomize_module(nn.BatchNorm2d(12, eps=1e-6, **config), gen)
    ours = copy.deepcopy(bn)
    conv_bias = torch.randn(12, generator=gen)
    for training in (True, True, True, False):
        bn.train(training)
        ours.train(training)
        y = torch.randn(3, 12, 5, 7, generator=gen) * 3 + 1
        biased = y + conv_bias.view(1, -1, 1, 1)
        scale, shift = batch_norm_scale_shift(ours, biased, conv_bias=conv_bias)
        assert_matches(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(biased))
        assert bn_buffers(ours).keys() == bn_buffers(bn).keys()
        for k, v in bn_buffers(ours).items():
            torch.testing.assert_close(v, bn_buffers(bn)[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_scale_shift(ours.train(), torch.randn(1, 12, 1, 1))


def test_state_dict_construction_and_sharing(gen):
    torch.manual_seed(3)
    ref = ConvTransBlock(256, 512, True, 2, 2, 384, num_heads=6, qkv_bias=True)
    torch.manual_seed(3)
    built = FusedConvTransBlock(256, 512, True, 2, 2, 384, num_heads=6, qkv_bias=True)
    assert list(built.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    torch.manual_seed(3)
    up_ref, up_built = FCUUp(384, 100, 4), None
    torch.manual_seed(3)
    up_built = FusedFCUUp(384, 100, 4)
    assert list(up_built.state_dict()) == list(up_ref.state_dict())
    assert all(torch.equal(up_built.state_dict()[k], v) for k, v in up_ref.state_dict().items())

    fused = FusedConvTransBlock.from_reference(ref)
    ref_params, fused_params = dict(ref.named_parameters()), dict(fused.named_parameters())
    assert list(ref_params) == list(fused_params)
    assert all(fused_params[k] is p for k, p in ref_params.items())
    assert isinstance(fused.fusion_block, FusedConvBlock) and fused.fusion_block.conv1 is ref.fusion_block.conv1
    assert fused.trans_block is ref.trans_block
    assert fused.expand_block.bn.running_mean is ref.expand_block.bn.running_mean
    fused.load_state_dict(randomize_module(copy.deepcopy(ref), gen).state_dict(), strict=True)
    assert FusedConvTransBlock.from_reference(fused).expand_block is fused.expand_block  # converting twice


def test_no_state_goes_stale(backend_name, device, gen):
    ref = randomize_module(FCUUp(384, 64, 2), gen).to(device)
    fused = FusedFCUUp.from_reference(copy.deepcopy(ref))
    x_t = _tokens(2, 7, 7, 384, gen, device)
    for step in range(3):
        for training in (True, False):
            ref.train(training)
            fused.train(training)
            with torch.no_grad():
                assert_matches(fused(x_t, 7, 7), ref(x_t, 7, 7), name=f"step {step} training={training}")
        new_state = randomize_module(copy.deepcopy(ref), gen).state_dict()
        ref.load_state_dict(new_state)
        fused.load_state_dict(new_state)


def test_sync_batchnorm(backend_name, device, gen, monkeypatch):
    block = randomize_module(ConvTransBlock(64, 64, False, 1, 4, 384, num_heads=6, qkv_bias=True), gen).to(device)
    ref = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block))
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(FusedConvTransBlock.from_reference(copy.deepcopy(block)))
    assert isinstance(fused.expand_block, FusedFCUUp) and isinstance(fused.expand_block.bn, nn.SyncBatchNorm)
    assert isinstance(fused.fusion_block.bn1, nn.SyncBatchNorm)
    assert list(fused.state_dict()) == list(block.state_dict())
    x, x_t = torch.randn(1, 64, 56, 56, generator=gen).to(device), torch.randn(1, 197, 384, generator=gen).to(device)
    # Outside a process group SyncBatchNorm normalises locally: the fused statistics path applies.
    # Inside one it must run as the module: exercise that path by declaring the BNs synchronising
    # (a real group would need GPUs).
    bn1_calls = []
    fused.fusion_block.bn1.register_forward_hook(lambda m, _i, _o: bn1_calls.append(m))
    runs = [(False, False), (False, True), (True, True)]  # (synchronising, training); eval never syncs
    for synced, training in runs:
        if synced:
            monkeypatch.setattr(conv_trans_block_module, "syncs_across_processes",
                                lambda bn: isinstance(bn, nn.SyncBatchNorm) and bn.training)
        ref.train(training)
        fused.train(training)
        with torch.no_grad():
            expected, out = ref(x, x_t), fused(x, x_t)
        assert_matches(out[0], expected[0], name=f"synced={synced} training={training}")
        assert len(bn1_calls) == (1 if synced else 0)  # the fused path does not call bn1 itself
        for k, v in bn_buffers(ref).items():
            torch.testing.assert_close(bn_buffers(fused)[k], v, rtol=1e-5, atol=1e-6)


def test_float64_on_the_torch_backend(gen):

    block = randomize_module(ConvTransBlock(64, 128, True, 2, 2, 384, num_heads=6, qkv_bias=True), gen).double()
    x, x_t = torch.randn(1, 64, 56, 56, generator=gen).double(), torch.randn(1, 197, 384, generator=gen).double()
    for training in (False, True):
        ref = copy.deepcopy(block).train(training)
        fused = FusedConvTransBlock.from_reference(copy.deepcopy(block)).train(training)
        with backend("torch"), torch.no_grad():
            out, expected = fused(x, x_t), ref(x, x_t)
        assert out[0].dtype == torch.float64
        assert_matches(out[0], expected[0], fp32_tol=1e-12)
        assert_matches(list(bn_buffers(fused).values()), list(bn_buffers(ref).values()), fp32_tol=1e-12)


def test_triton_twins_reject_float64(triton_backend, device):
    x_t, w = torch.randn(1, 50, 32, device=device).double(), torch.randn(16, 32, device=device).double()
    s = torch.ones(16, device=device)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fcu_up_expand(x_t, w, s, s, 7, 7, True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        bn_relu_add_upsampled(torch.randn(1, 16, 14, 14, device=device).double(), s, s,
                              torch.randn(1, 16, 7, 7, device=device).double(), 2)


def test_bad_inputs(gen):
    fused = FusedFCUUp(384, 64, 4).eval()
    with pytest.raises(ValueError, match=r"1 \+ H\*W = 197 tokens"):
        fused(torch.randn(2, 196, 384), 14, 14)
    with pytest.raises(ValueError, match="384 input channels"):
        fused(torch.randn(2, 197, 576), 14, 14)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ H\*W, D\) tokens"):
        fused(torch.randn(197, 384), 14, 14)
    with pytest.raises(ValueError, match="positive ints"):
        fused(torch.randn(2, 197, 384), 14.0, 14)
    with pytest.raises(TypeError, match="share one floating dtype"):
        fused(torch.randn(2, 197, 384).half(), 14, 14)
    with pytest.raises(TypeError, match="x_t must be a"):
        fused([[0.0]], 14, 14)
    x, low, s = torch.randn(2, 64, 56, 56), torch.randn(2, 64, 14, 14), torch.ones(64)
    with pytest.raises(ValueError, match=r"downsampled by up=2"):
        bn_relu_add_upsampled(x, s, s, low, 2)
    with pytest.raises(ValueError, match=r"scale must be a \(64,\) tensor"):
        bn_relu_add_upsampled(x, torch.ones(32), s, low, 4)
    with pytest.raises(TypeError, match="share one floating dtype"):
        bn_relu_add_upsampled(x, s, s, low.half(), 4)
    with pytest.raises(ValueError, match=r"shift must be a \(64,\) tensor"):
        fcu_up_expand(torch.randn(1, 197, 384), fused.conv_project.weight, s, torch.ones(63), 14, 14, True)
    with pytest.raises(TypeError, match="act must be nn.ReLU"):
        FusedFCUUp(384, 64, 4, act_layer=nn.GELU)
    gelu_up = FCUUp(384, 64, 4, act_layer=nn.GELU)
    with pytest.raises(TypeError, match="act must be nn.ReLU"):
        FusedFCUUp.from_reference(gelu_up)
    block = ConvTransBlock(64, 64, False, 1, 4, 384, num_heads=6)
    block.fusion_block.act1 = nn.GELU()
    with pytest.raises(TypeError, match="bn1 and act1 must be a BatchNorm and a ReLU"):
        FusedConvTransBlock.from_reference(block)
    block.fusion_block.drop_block = nn.Dropout()
    with pytest.raises(ValueError, match="drop_block is not supported"):
        FusedConvTransBlock.from_reference(block)
