"""add_layer_norm (residual add + LayerNorm) against the float64 reference, both backends."""

import pytest
import torch
import torch.nn.functional as F

from fastconformer import backend
from fastconformer.modules import add_layer_norm
from fastconformer.testing import assert_matches, to_float64


def _reference(x, y, w, b, eps):
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), w, b, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 197, 384), (1, 50, 576), (5, 17, 1000)])
def test_matches_reference(backend_name, device, gen, shape, dtype):
    D = shape[-1]
    x = torch.randn(shape, generator=gen).to(device)
    y = torch.randn(shape, generator=gen).to(device) * 2 + 0.5
    w = (1 + 0.3 * torch.randn(D, generator=gen)).to(device)
    b = (0.2 * torch.randn(D, generator=gen)).to(device)
    ref = _reference(*to_float64((x, y, w, b)), 1e-6)
    args = [t.to(dtype) for t in (x, y, w, b)]
    out = add_layer_norm(*args, 1e-6)
    baseline = _reference(*args, 1e-6) if dtype != torch.float32 else None
    for i, name in enumerate(("sum", "normed")):
        assert out[i].dtype == dtype and out[i].shape == shape
        assert_matches(out[i], ref[i], baseline=None if baseline is None else baseline[i], name=name)


# (shape, dtype, which outputs get a gradient): a FusedBlock's rows (Conformer-S: D 384, 197 tokens),
# an odd D, only the normed rows' gradient (the sum unused downstream).
GRAD_CASES = [
    ((3, 17, 384), torch.float32, "both"),
    ((2, 197, 384), torch.float16, "both"),  # 394 rows: programs loop over 2 rows each
    ((2, 5, 1000), torch.float32, "normed"),
    ((2, 9, 576), torch.float16, "normed"),
]


@pytest.mark.parametrize("shape,dtype,outputs", GRAD_CASES,
                         ids=[f"{c[0][-1]}-{str(c[1])[6:]}-{c[2]}" for c in GRAD_CASES])
def test_gradients_match(backend_name, device, gen, shape, dtype, outputs):
    D = shape[-1]
    leaves = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
              1 + 0.3 * torch.randn(D, generator=gen), 0.2 * torch.randn(D, generator=gen)]
    g_s, g_n = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    def grads(dtype, fn):
        ts = [t.detach().to(device, dtype).requires_grad_() for t in leaves]
        s, n = fn(*ts, 1e-6)
        if outputs == "both":
            torch.autograd.backward((s, n), (g_s.to(device, dtype), g_n.to(device, dtype)))
        else:
            n.backward(g_n.to(device, dtype))
        return [t.grad for t in ts]

    ref = grads(torch.float64, _reference)
    out = grads(dtype, add_layer_norm)
    baseline = grads(dtype, _reference) if dtype != torch.float32 else [None] * 4
    for name, o, r, base in zip(("x", "y", "weight", "bias"), out, ref, baseline):
        assert o.dtype == dtype
        assert_matches(o, r, baseline=base, name=f"grad {name}")


def test_gradcheck():
    """The torch path's backward, by finite differences in float64."""
    gen = torch.Generator().manual_seed(7)
    args = [torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    args += [1 + 0.3 * torch.randn(8, generator=gen, dtype=torch.float64),
             0.2 * torch.randn(8, generator=gen, dtype=torch.float64)]
    with backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: add_layer_norm(*a, 1e-6), [a.requires_grad_() for a in args],
                                        fast_mode=True)


@pytest.mark.parametrize("y_dtype", [torch.float16, torch.bfloat16])
def test_mixed_dtypes_under_autocast(backend_name, device, gen, y_dtype):
    """The autocast case of a transformer block: x the fp32 residual stream, y a linear layer's
    fp16/bf16 output. The kernel gets y itself (no fp32 copy first) and matches ``x + y`` then
    LayerNorm in float64 within fp32's bound (the inputs are exact in fp32); the sum and the grads
    come back in each input's dtype."""
    shape, D = (3, 197, 384), 384
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    y = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, y_dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(D, generator=gen)).to(device)
    b = (0.2 * torch.randn(D, generator=gen)).to(device)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    ref = _reference(x64, y64, w.double(), b.double(), 1e-6)
    with torch.autocast(device.type, dtype=y_dtype):
        s, n = add_layer_norm(x, y, w, b, 1e-6)
    assert s.dtype == n.dtype == torch.float32
    assert_matches(s, ref[0], name="sum")
    assert_matches(n, ref[1], name="normed")
    g = torch.randn(shape, generator=gen).to(device)
    (n * g).sum().backward()
    (ref[1] * g.double()).sum().backward()
    assert x.grad.dtype == torch.float32 and y.grad.dtype == y_dtype
    assert_matches(x.grad, x64.grad, name="grad x")
    if backend_name == "triton":
        from fastconformer.kernels import record_launches

        with torch.no_grad(), record_launches() as launches, torch.autocast(device.type, dtype=y_dtype):
            add_layer_norm(x, y, w, b, 1e-6)
        (launch,) = launches
        assert launch.args[1].dtype == y_dtype and launch.args[1].data_ptr() == y.data_ptr()
