"""add_layer_norm (residual add + LayerNorm) against the float64 reference, both backends."""

import pytest
import torch
import torch.nn.functional as F

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


def test_gradients_match(backend_name, device, gen):
    shape, D = (3, 17, 384), 384
    leaves = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen),
              1 + 0.3 * torch.randn(D, generator=gen), 0.2 * torch.randn(D, generator=gen)]
    g_s, g_n = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    def grads(dtype, fn):
        ts = [t.to(device, dtype).requires_grad_() for t in leaves]
        s, n = fn(*ts, 1e-6)
        torch.autograd.backward((s, n), (g_s.to(device, dtype), g_n.to(device, dtype)))
        return [t.grad for t in ts]

    ref = grads(torch.float64, _reference)
    out = grads(torch.float32, add_layer_norm)
    for name, o, r in zip(("x", "y", "weight", "bias"), out, ref):
        assert_matches(o, r, name=f"grad {name}")
