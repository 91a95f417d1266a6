"""FusedFCUDown / fcu_down (the FCU squeeze) against the reference FCUDown in float64, both backends."""

import copy

import pytest
import torch
import torch.nn as nn

from fastconformer import dispatch
from fastconformer.modules.fcu_down import FusedFCUDown, fcu_down
from fastconformer.reference import FCUDown
from fastconformer.registry import VARIANTS
from fastconformer.testing import assert_matches, randomize_module, tf32, to_float64


def _squeeze_shapes(variant: str, height: int, width: int) -> list[tuple[int, int, int, int, int]]:
    """(C_in, dw_stride, D, H, W) of the squeeze in each of the variant's three stages at a
    height x width input: x2 has 16/32/64 x channel_ratio channels at 1/4, 1/8, 1/16 of the input
    and dw_stride patch/4, patch/8, patch/16 (as fastconformer.reference.Conformer builds them)."""
    kw = VARIANTS[variant].kwargs
    c1, patch = 16 * kw["channel_ratio"], kw["patch_size"]
    return [(c1 * 2**s, patch // 4 // 2**s, kw["embed_dim"], height // 4 // 2**s, width // 4 // 2**s)
            for s in range(3)]


_AT_224 = sorted({shape for v in VARIANTS for shape in _squeeze_shapes(v, 224, 224)})
_AT_256x320 = [shape for v in ("conformer_small_patch16", "conformer_small_patch32")
               for shape in _squeeze_shapes(v, 256, 320)]
# fp32 and fp16 at every 224 shape the four variants produce, fp32 at 256x320; add_x_t both ways.
_CASES = ([(shape, dtype, (i + j) % 2 == 1) for i, shape in enumerate(_AT_224)
           for j, dtype in enumerate((torch.float32, torch.float16))]
          + [(shape, torch.float32, i % 2 == 1) for i, shape in enumerate(_AT_256x320)])


def _ids(case):
    (C, s, D, H, W), dtype, add_x_t = case
    return f"C{C}-s{s}-D{D}-{H}x{W}-{str(dtype)[6:]}" + ("-add_x_t" if add_x_t else "")


def _modules(C, D, s, gen, device):
    ref = randomize_module(FCUDown(C, D, s), gen).to(device)
    return ref, FusedFCUDown.from_reference(copy.deepcopy(ref))


def _inputs(B, C, D, s, H, W, gen, device):
    x2 = torch.randn(B, C, H, W, generator=gen).to(device)
    x_t = (1.5 * torch.randn(B, 1 + (H // s) * (W // s), D, generator=gen) + 0.3).to(device)
    return x2, x_t


def _expected(ref, x2, x_t, add_x_t):
    out = copy.deepcopy(ref).double()(*to_float64((x2, x_t)))
    return out + to_float64(x_t) if add_x_t else out


def _baseline(ref, x2, x_t, dtype, add_x_t):
    """The plain-PyTorch module's output in ``dtype`` (the fp16/bf16 policy's yardstick)."""
    out = copy.deepcopy(ref).to(dtype)(x2.to(dtype), x_t.to(dtype))
    return out + x_t.to(dtype) if add_x_t else out


@pytest.mark.parametrize("case", _CASES, ids=[_ids(c) for c in _CASES])
def test_matches_reference_at_model_shapes(backend_name, device, gen, case):
    (C, s, D, H, W), dtype, add_x_t = case
    ref, fused = _modules(C, D, s, gen, device)
    x2, x_t = _inputs(1, C, D, s, H, W, gen, device)
    out = fused.to(dtype)(x2.to(dtype), x_t.to(dtype), add_x_t=add_x_t)
    assert out.dtype == dtype and out.shape == x_t.shape
    baseline = None if dtype == torch.float32 else _baseline(ref, x2, x_t, dtype, add_x_t)
    assert_matches(out, _expected(ref, x2, x_t, add_x_t), baseline=baseline)


@pytest.mark.parametrize("add_x_t", [False, True])
def test_layouts_and_views(backend_name, device, gen, add_x_t):
    """Odd batch; x2 channels_last, strided along its channels (NCHW-like: the ops read a channels_last
    copy) and a channels_last view that is not dense (unit channel stride: read in place); x_t as a
    slice, a transposed view and contiguous."""
    C, s, D, H, W = 32, 2, 384, 28, 28
    ref, fused = _modules(C, D, s, gen, device)
    x2, x_t = _inputs(3, C, D, s, H, W, gen, device)
    want = _expected(ref, x2, x_t, add_x_t)
    wide = torch.randn(3, 2 * C, H, W + 6, generator=gen).to(device)
    wide[:, 1::2, :, 3:3 + W] = x2
    padded = torch.randn(5, x_t.shape[1], D + 8, generator=gen).to(device)
    padded[1:4, :, 4:4 + D] = x_t
    wide_nhwc = torch.randn(3, 2 * C, H, W + 6, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    wide_nhwc[:, C:, :, 3:3 + W] = x2
    x2_views = {"channels_last": x2.to(memory_format=torch.channels_last), "strided": wide[:, 1::2, :, 3:3 + W],
                "channels_last view": wide_nhwc[:, C:, :, 3:3 + W]}
    x_t_views = {"slice": padded[1:4, :, 4:4 + D], "transposed": x_t.transpose(1, 2).contiguous().transpose(1, 2),
                 "contiguous": x_t}
    view = x2_views["channels_last view"]
    assert view.stride(1) == 1 and not view.is_contiguous(memory_format=torch.channels_last)
    for (x2_name, x2_view), (x_t_name, x_t_view) in zip(x2_views.items(), x_t_views.items()):
        assert not x2_view.is_contiguous() and (x_t_name == "contiguous" or not x_t_view.is_contiguous())
        out = fused(x2_view, x_t_view, add_x_t=add_x_t)
        assert_matches(out, want, name=f"{x2_name} x2, {x_t_name} x_t")


@pytest.mark.parametrize("C, s, D, H, W", [(40, 2, 1000, 6, 10), (24, 8, 130, 16, 24), (17, 1, 576, 3, 5),
                                           (24, 3, 256, 9, 12), (16, 2, 8, 4, 6)])
def test_odd_channels_and_embed_dims(backend_name, device, gen, C, s, D, H, W):
    """Masked K blocks (C_in not a multiple of 16), non-power-of-two D up to 1024, token tiles that
    span images, dw_stride 8, 3 and 1; D a power of two (no tail column block) and D below the
    narrowest block (16)."""
    ref, fused = _modules(C, D, s, gen, device)
    x2, x_t = _inputs(2, C, D, s, H, W, gen, device)
    for add_x_t in (False, True):
        assert_matches(fused(x2, x_t, add_x_t=add_x_t), _expected(ref, x2, x_t, add_x_t), name=f"add_x_t={add_x_t}")


# ((C_in, dw_stride, D, H, W), batch, layout, dtype, add_x_t): an odd small case, then Conformer-S's
# three stages at 224 (stage 3 with Conformer-B's D) in fp32 and fp16, NCHW and channels_last.
_GRAD_CASES = [
    ((24, 2, 384, 8, 12), 3, "channels_last", torch.float32, False),
    ((24, 2, 384, 8, 12), 3, "contiguous", torch.float32, True),
    ((64, 4, 384, 56, 56), 1, "contiguous", torch.float32, True),
    ((128, 2, 384, 28, 28), 2, "channels_last", torch.float16, False),
    ((256, 1, 576, 14, 14), 1, "contiguous", torch.float16, True),
]


@pytest.mark.parametrize("shape,B,layout,dtype,add_x_t", _GRAD_CASES,
                         ids=[f"C{c[0][0]}-s{c[0][1]}-D{c[0][2]}-{c[2]}-{str(c[3])[6:]}" + ("-add_x_t" if c[4] else "")
                              for c in _GRAD_CASES])
def test_gradients_match(backend_name, device, gen, shape, B, layout, dtype, add_x_t):
    C, s, D, H, W = shape
    ref, fused = _modules(C, D, s, gen, device)
    x2, x_t = _inputs(B, C, D, s, H, W, gen, device)
    grad = torch.randn(x_t.shape, generator=gen).to(device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def grads(module, dtype, fn):
        module = copy.deepcopy(module).to(dtype)
        leaves = [x2.to(dtype).contiguous(memory_format=fmt).requires_grad_(), x_t.to(dtype).requires_grad_()]
        fn(module, *leaves).backward(grad.to(dtype))
        params = [module.conv_project.weight, module.conv_project.bias, module.ln.weight, module.ln.bias]
        return [t.grad for t in leaves + params]

    def reference(m, a, b):
        return m(a, b) + b if add_x_t else m(a, b)

    want = grads(ref, torch.float64, reference)
    got = grads(fused, dtype, lambda m, a, b: m(a, b, add_x_t=add_x_t))
    baseline = grads(ref, dtype, reference) if dtype != torch.float32 else [None] * 6
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
    for name, g, w, base in zip(("x2", "x_t", "conv weight", "conv bias", "ln weight", "ln bias"), got, want,
                                baseline):
        assert_matches(g, w, baseline=base, name=f"grad {name}")


def test_gradcheck():
    """The torch path's backward, by finite differences in float64."""
    gen = torch.Generator().manual_seed(3)
    C, s, D, H, W = 3, 2, 5, 4, 4

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    args = [draw(1, C, H, W), draw(1, 1 + (H // s) * (W // s), D), draw(D, C), draw(D), draw(D), draw(D)]
    with dispatch.backend("torch"):
        for add_x_t in (False, True):
            assert torch.autograd.gradcheck(lambda *a, add=add_x_t: fcu_down(*a, s, 1e-6, add), args, fast_mode=True)


def test_autocast_cpu_bf16_matches_reference_dtype(gen):
    """Under CPU autocast the fused module returns the reference's dtype, within the bf16 policy."""
    C, s, D, H, W = 64, 4, 384, 56, 56
    ref, fused = _modules(C, D, s, gen, "cpu")
    x2, x_t = _inputs(1, C, D, s, H, W, gen, "cpu")
    with dispatch.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        baseline, out = ref(x2, x_t), fused(x2, x_t)
        out_sum, baseline_sum = fused(x2, x_t, add_x_t=True), ref(x2, x_t) + x_t
    assert out.dtype == baseline.dtype and out_sum.dtype == baseline_sum.dtype
    want = _expected(ref, x2, x_t, False)
    assert_matches(out.to(torch.bfloat16), want, baseline=baseline.to(torch.bfloat16))
    assert_matches(out_sum.to(torch.bfloat16), want + to_float64(x_t), baseline=baseline_sum.to(torch.bfloat16))


def test_bad_inputs_raise(backend_name, device, gen):
    _, fused = _modules(32, 384, 2, gen, device)
    x2, x_t = _inputs(2, 32, 384, 2, 8, 8, gen, device)
    bad = {
        "C_in=32": (x2[:, :16], x_t),
        "divisible by dw_stride=2": (torch.randn(2, 32, 8, 7).to(device), x_t),
        "positive": (torch.randn(2, 32, 0, 8).to(device), x_t),
        "x_t must be": (x2, x_t[:, 1:]),
    }
    for message, (a, b) in bad.items():
        with pytest.raises(ValueError, match=message):
            fused(a, b)
    with pytest.raises(ValueError, match="x_t must be"):
        fused(x2, x_t[..., :100])
    with pytest.raises(ValueError, match="x_t must be"):
        fused(x2, x_t[:1])
    with pytest.raises(TypeError, match="same dtype"):
        fused(x2.half(), x_t)
    with pytest.raises(ValueError, match="dw_stride"):
        fcu_down(x2, x_t, fused.conv_project.weight, fused.conv_project.bias, fused.ln.weight, fused.ln.bias, 0, 1e-6)


def test_construction_and_conversion_errors():
    with pytest.raises(ValueError, match="GELU"):
        FusedFCUDown(32, 384, 2, act_layer=nn.ReLU)
    with pytest.raises(ValueError, match="LayerNorm"):
        FusedFCUDown(32, 384, 2, norm_layer=nn.BatchNorm1d)
    with pytest.raises(TypeError, match="lacks"):
        FusedFCUDown.from_reference(nn.Linear(3, 3))
    ref = FCUDown(32, 384, 2)
    ref.act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="GELU"):
        FusedFCUDown.from_reference(ref)


class _OfficialFCUDown(nn.Module):
    """The official repository's FCUDown as written there (same attributes, another class)."""

    def __init__(self, inplanes, outplanes, dw_stride, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dw_stride = dw_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=1, padding=0)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = norm_layer(outplanes, eps=1e-6)
        self.act = act_layer()

    def forward(self, x, x_t):
        x = self.conv_project(x)
        x = self.sample_pooling(x).flatten(2).transpose(1, 2)
        x = self.act(self.ln(x))
        return torch.cat([x_t[:, 0][:, None, :], x], dim=1)


@pytest.mark.parametrize("cls", [FCUDown, _OfficialFCUDown])
def test_from_reference_shares_parameters(backend_name, device, gen, cls):
    ref = randomize_module(cls(64, 384, 4), gen).to(device)
    fused = FusedFCUDown.from_reference(ref)
    assert [(n, id(p)) for n, p in fused.named_parameters()] == [(n, id(p)) for n, p in ref.named_parameters()]
    assert fused.dw_stride == 4 and fused.ln.eps == 1e-6
    x2, x_t = _inputs(1, 64, 384, 4, 16, 20, gen, device)
    with torch.no_grad():
        assert_matches(fused(x2, x_t), _expected(ref, x2, x_t, False))


def test_state_dict_round_trip(backend_name, device, gen):
    torch.manual_seed(7)
    ref = FCUDown(96, 576, 2)
    torch.manual_seed(7)
    fused = FusedFCUDown(96, 576, 2)  # same construction order: a fixed seed draws the same weights
    assert fused.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), ref.state_dict().values()))
    randomize_module(ref, gen)
    fused.load_state_dict(ref.state_dict(), strict=True)
    back = FCUDown(96, 576, 2)
    back.load_state_dict(fused.state_dict(), strict=True)
    ref, fused = ref.to(device), fused.to(device)
    x2, x_t = _inputs(1, 96, 576, 2, 8, 8, gen, device)
    with torch.no_grad():
        assert_matches(fused(x2, x_t), _expected(back.to(device), x2, x_t, False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu(gen, dtype):
    """bf16 dots (garbage under the interpreter) and the model's 224 shapes, both backends."""
    for C, s, D, H, W in _AT_224:
        ref, fused = _modules(C, D, s, gen, "cuda")
        x2, x_t = _inputs(8, C, D, s, H, W, gen, "cuda")
        want = _expected(ref, x2, x_t, True)
        for name in ("torch", "triton"):
            with dispatch.backend(name):
                out = fused.to(dtype)(x2.to(dtype), x_t.to(dtype), add_x_t=True)
            assert_matches(out, want, baseline=_baseline(ref, x2, x_t, dtype, True), name=f"{name} C={C} s={s}")


@pytest.mark.gpu
def test_autocast_cuda_fp16_on_gpu(gen):
    """AMP: fp16 x2 and projection, fp32 x_t and LayerNorm: the kernel's fp16 -> fp32 variant."""
    C, s, D, H, W = 64, 4, 384, 56, 56
    ref, fused = _modules(C, D, s, gen, "cuda")
    x2, x_t = _inputs(8, C, D, s, H, W, gen, "cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        baseline = ref(x2.half(), x_t)
        with dispatch.backend("triton"):
            out = fused(x2.half(), x_t)
    assert out.dtype == baseline.dtype == torch.float32
    assert_matches(out.half(), _expected(ref, x2.half(), x_t, False), baseline=baseline.half())


@pytest.mark.gpu
def test_tf32_follows_torch_setting(gen):
    C, s, D, H, W = 256, 1, 384, 14, 14
    ref, fused = _modules(C, D, s, gen, "cuda")
    x2, x_t = _inputs(8, C, D, s, H, W, gen, "cuda")
    want = _expected(ref, x2, x_t, False)
    with dispatch.backend("triton"):
        with tf32(False):
            assert_matches(fused(x2, x_t), want)
        with tf32(True):
            assert_matches(fused(x2, x_t), want, fp32_tol=5e-3)


@pytest.mark.gpu
def test_compiled_training_step_nchw(triton_backend, device, gen):
    """torch.compile(fullgraph=True) traces the squeeze's triton_ops, forward and backward, with the
    channels_last copy of an NCHW x2 inside them, and gives eager's gradients (grad x2 in NCHW)."""
    C, s, D, H, W = 64, 4, 384, 56, 56
    _, fused = _modules(C, D, s, gen, device)
    x2, x_t = _inputs(2, C, D, s, H, W, gen, device)

    def grads(fn):
        leaves = x2.clone().requires_grad_(), x_t.clone().requires_grad_()
        fn(*leaves).square().sum().backward()
        return [t.grad for t in leaves]

    expected = grads(lambda a, b: fused(a, b, add_x_t=True))
    torch.compiler.reset()
    got = grads(torch.compile(lambda a, b: fused(a, b, add_x_t=True), fullgraph=True))
    assert got[0].is_contiguous()
    for name, g, e in zip(("x2", "x_t"), got, expected):
        assert_matches(g, e, name=f"grad {name}")
