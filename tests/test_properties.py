"""Property-based checks (hypothesis): the fused modules' PyTorch paths equal the float64 reference
over random shapes, strides and layouts, not only the shapes the published variants produce."""

import copy

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastconformer
from fastconformer import reference as ref
from fastconformer.modules import FusedFCUDown, FusedFCUUp
from fastconformer.testing import assert_matches, randomize_module, to_float64

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@SETTINGS
@given(batch=st.integers(1, 3), c_in=st.integers(1, 40), d=st.integers(1, 80), stride=st.sampled_from([1, 2, 4, 8]),
       h=st.integers(1, 3), w=st.integers(1, 3), channels_last=st.booleans(), add=st.booleans(),
       seed=st.integers(0, 2**16))
def test_squeeze_any_shape(batch, c_in, d, stride, h, w, channels_last, add, seed):
    gen = torch.Generator().manual_seed(seed)
    module = randomize_module(ref.FCUDown(c_in, d, stride), gen)
    x2 = torch.randn(batch, c_in, h * stride, w * stride, generator=gen)
    x_t = torch.randn(batch, 1 + h * w, d, generator=gen)
    expected = copy.deepcopy(module).double()(*to_float64((x2, x_t)))
    if add:
        expected = expected + x_t.double()
    if channels_last:
        x2 = x2.contiguous(memory_format=torch.channels_last)
    with fastconformer.backend("torch"):
        out = FusedFCUDown.from_reference(module)(x2, x_t, add_x_t=add)
    assert_matches(out, expected)


@SETTINGS
@given(batch=st.integers(1, 3), d=st.integers(1, 80), c=st.integers(1, 40), stride=st.sampled_from([1, 2, 4, 8]),
       h=st.integers(1, 4), w=st.integers(1, 4), train=st.booleans(), seed=st.integers(0, 2**16))
def test_expand_any_shape(batch, d, c, stride, h, w, train, seed):
    gen = torch.Generator().manual_seed(seed)
    module = randomize_module(ref.FCUUp(d, c, stride), gen).train(train)
    assume(not (train and batch * h * w == 1))  # BatchNorm needs more than one value per channel in training
    x_t = torch.randn(batch, 1 + h * w, d, generator=gen)
    expected_module = copy.deepcopy(module).double()
    expected = expected_module(x_t.double(), h, w)
    with fastconformer.backend("torch"):
        fused = FusedFCUUp.from_reference(module)
        out = fused(x_t, h, w)
    assert_matches(out, expected)
    assert_matches(module.bn.running_var, expected_module.bn.running_var, name="running_var")
