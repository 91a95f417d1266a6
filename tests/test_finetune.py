"""Fine-tuning a model in eval mode (frozen BatchNorm statistics, the usual way to fine-tune) with
grad enabled and only some parameters trainable: every trainable parameter gets the float64
reference's gradient, every frozen one none. On the CPU the fast model may run its transformer
blocks through oneDNN's fused primitives, which have no backward; they must step aside wherever a
gradient has to flow, and only there."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastconformer import dispatch
from fastconformer.testing import MODEL_TOL, assert_matches, onednn_calls, reference_and_fast

NUM_CLASSES = 10
DEPTH = 3  # Conformer-Ti widths, two ConvTransBlocks: conv_trans_2 and the last one, conv_trans_3


def _attention(name, module):
    return ".attn." in name


def _norms(name, module):
    return isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))


def _heads_and_last_block(name, module):
    return name.startswith(("conv_cls_head", "trans_cls_head", "trans_norm", f"conv_trans_{DEPTH}."))


def _mlp(name, module):
    return ".mlp." in name


PATTERNS = {"attention": _attention, "norms": _norms, "heads+last block": _heads_and_last_block, "mlp": _mlp}


def _freeze_all_but(model: nn.Module, trainable) -> list[str]:
    """requires_grad only for the parameters of the modules ``trainable(name, module)`` selects;
    returns their names."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if trainable(name + ".", module):
            module.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _grads(model, x, y) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss = sum(F.cross_entropy(o, y) for o in model(x))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_eval_mode_finetuning_keeps_every_gradient(pattern):
    reference, fast = reference_and_fast("conformer_tiny_patch16", seed=3, num_classes=NUM_CLASSES, depth=DEPTH)
    exact = copy.deepcopy(reference).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 3, 96, 96, generator=g), torch.randint(0, NUM_CLASSES, (3,), generator=g)

    expected_names = None
    for model in (exact, fast):
        names = _freeze_all_but(model.eval(), PATTERNS[pattern])
        assert names and (expected_names is None or names == expected_names)
        expected_names = names
    expected = _grads(exact, x.double(), y)
    got = _grads(fast, x, y)

    missing = [n for n in expected_names if got[n] is None]
    assert not missing, f"trainable parameters without a gradient: {missing[:5]}"
    assert all(got[n] is None for n in got if n not in expected_names)
    assert_matches([got[n] for n in expected_names], [expected[n] for n in expected_names], fp32_tol=MODEL_TOL,
                   name=f"gradients of the {pattern} parameters")


@pytest.mark.skipif(not dispatch.onednn_available(), reason="this torch has no working oneDNN fused linear")
def test_onednn_still_serves_the_blocks_no_gradient_passes_through():
    """Fine-tuning only the heads and the last block: the transformer blocks before it see no
    parameter and no input that requires grad, so they keep the oneDNN path (4 fused calls each:
    trans_1 and conv_trans_2's block; 1 each for conv_trans_2's squeeze and expand; 3 convolutions
    summed into their residual: conv_1's, conv_trans_2's cnn_block's and its fusion block's); the
    last block runs the plain ops."""
    _, fast = reference_and_fast("conformer_tiny_patch16", seed=3, num_classes=NUM_CLASSES, depth=DEPTH)
    _freeze_all_but(fast.eval(), _heads_and_last_block)
    x = torch.randn(2, 3, 64, 64)
    assert onednn_calls(lambda: fast(x)) == 4 * (DEPTH - 1) + 2 * (DEPTH - 2) + 3
    fast.requires_grad_(False)  # conv_trans_3 too: its 6 calls and its 2 sums (cnn_block's, last fusion block's)
    assert onednn_calls(lambda: fast(x)) == 4 * DEPTH + 2 * (DEPTH - 1) + 5
