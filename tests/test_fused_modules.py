"""The one way every fused module is built (fastconformer.modules.base.FusedModule): from the
reference class's constructor arguments, or by adopting a reference module's own submodules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fastconformer import reference as ref
from fastconformer.modules import (FusedAttention, FusedBlock, FusedConvBlock, FusedConvTransBlock, FusedFCUDown,
                                   FusedFCUUp, NotFusableError)

CASES = [
    (FusedAttention, ref.Attention, (96, 6), dict(qkv_bias=True)),
    (FusedBlock, ref.Block, (96, 6), dict(qkv_bias=True, drop_path=0.1)),
    (FusedConvBlock, ref.ConvBlock, (64, 128), dict(stride=2, res_conv=True)),
    (FusedConvTransBlock, ref.ConvTransBlock, (64, 128, True, 2, 4, 96), dict(num_heads=6, num_med_block=1)),
    (FusedFCUDown, ref.FCUDown, (32, 96, 4), {}),
    (FusedFCUUp, ref.FCUUp, (96, 32, 4), {}),
]
IDS = [case[0].__name__ for case in CASES]


@pytest.mark.parametrize("fused_cls, ref_cls, args, kwargs", CASES, ids=IDS)
def test_built_from_the_reference_arguments(fused_cls, ref_cls, args, kwargs):
    torch.manual_seed(5)
    expected = ref_cls(*args, **kwargs).state_dict()
    torch.manual_seed(5)
    got = fused_cls(*args, **kwargs).state_dict()
    assert list(got) == list(expected)  # same keys in the same order
    assert all(torch.equal(got[k], v) for k, v in expected.items())  # a seed draws the same weights


@pytest.mark.parametrize("fused_cls, ref_cls, args, kwargs", CASES, ids=IDS)
def test_from_reference_adopts_without_copies(fused_cls, ref_cls, args, kwargs):
    module = ref_cls(*args, **kwargs).eval()
    rng = torch.random.get_rng_state()
    fused = fused_cls.from_reference(module)
    assert torch.equal(rng, torch.random.get_rng_state()), "adopting must not draw weights"
    assert not fused.training
    ref_params, fused_params = dict(module.named_parameters()), dict(fused.named_parameters())
    assert list(fused_params) == list(ref_params) and all(fused_params[k] is p for k, p in ref_params.items())
    assert fused_cls.from_reference(fused) is fused
    assert type(module) is ref_cls  # the module itself is left as it was


@pytest.mark.parametrize("fused_cls", [case[0] for case in CASES], ids=IDS)
def test_what_cannot_be_fused_raises_one_error(fused_cls):
    for wrong in (nn.Linear(3, 3), "a module"):
        with pytest.raises(NotFusableError, match=fused_cls.__name__ if isinstance(wrong, nn.Module) else "nn.Module"):
            fused_cls.from_reference(wrong)
    assert issubclass(NotFusableError, TypeError) and issubclass(NotFusableError, ValueError)
