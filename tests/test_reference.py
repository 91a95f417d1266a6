"""The reference model: official module tree, keys, shapes, parameter counts, input checks, modes."""

import json
import pathlib

import pytest
import torch

import fastconformer
from fastconformer.reference import Conformer

MANIFEST = json.loads((pathlib.Path(__file__).parent / "data" / "state_dict_manifest.json").read_text())


def _meta_model(name, **overrides):
    with torch.device("meta"):
        return fastconformer.create_model(name, **overrides)


@pytest.mark.parametrize("name", list(MANIFEST))
def test_state_dict_matches_official_manifest(name):
    model = _meta_model(name)
    expected = MANIFEST[name]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected["state_dict"])  # same keys in the same order
    assert got == expected["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]
    assert fastconformer.VARIANTS[name].num_params == expected["num_params"]
    assert fastconformer.VARIANTS[name].kwargs == expected["constructor_kwargs"]


def test_registry_names():
    assert fastconformer.list_models() == list(MANIFEST)
    assert fastconformer.list_models("*tiny*") == ["conformer_tiny_patch16"]  # timm's wildcard filter
    assert fastconformer.list_models(["*patch32", "*base*"]) == ["conformer_small_patch32", "conformer_base_patch16"]
    assert fastconformer.list_models("Conformer_S*") == ["conformer_small_patch16", "conformer_small_patch32"]
    assert fastconformer.list_models("resnet*") == []
    with pytest.raises(TypeError, match="filter must be a pattern"):
        fastconformer.list_models(3)
    official = _meta_model("Conformer_small_patch16")
    assert official.patch_size == 16 and official.embed_dim == 384
    with pytest.raises(ValueError, match="unknown model 'conformer_huge'.*conformer_tiny_patch16"):
        fastconformer.create_model("conformer_huge")
    with pytest.raises(TypeError, match="model name must be a string"):
        fastconformer.create_model(16)


def test_overrides_reach_the_constructor():
    model = _meta_model("conformer_tiny_patch16", num_classes=10, drop_path_rate=0.1, num_med_block=1, qk_scale=0.5)
    assert model.conv_cls_head.out_features == 10 and model.trans_cls_head.out_features == 10
    assert model.trans_dpr == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert model.conv_trans_12.trans_block.drop_path.drop_prob == pytest.approx(0.1)
    assert len(model.conv_trans_2.med_block) == 1
    assert model.trans_1.attn.scale == 0.5


@pytest.mark.parametrize("hw", [(224, 224), (256, 320)])
def test_forward_shapes(hw):
    torch.manual_seed(0)
    model = fastconformer.create_model("conformer_tiny_patch16").eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        conv_logits, trans_logits = model(x)
        feat, tokens = model.forward_features(x)
    assert conv_logits.shape == trans_logits.shape == (2, 1000)
    assert feat.shape == (2, 256, hw[0] // 32, hw[1] // 32)
    assert tokens.shape == (2, 1 + (hw[0] // 16) * (hw[1] // 16), 384)
    assert torch.isfinite(conv_logits).all() and torch.isfinite(trans_logits).all()


def test_patch32_at_256x320():
    model = fastconformer.create_model("conformer_small_patch32", num_classes=7).eval()
    with torch.no_grad():
        feat, tokens = model.forward_features(torch.randn(1, 3, 256, 320))
    assert tokens.shape == (1, 1 + 8 * 10, 384) and feat.shape == (1, 1024, 8, 10)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(3, 224, 224), ValueError, r"4-D \(B, 3, H, W\)"),
        (torch.randn(1, 1, 224, 224), ValueError, "3 channels"),
        (torch.randn(1, 3, 224, 200), ValueError, "multiples of the patch size 16, got 224x200"),
        (torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8), TypeError, "floating-point"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, error, match):
    model = fastconformer.create_model("conformer_tiny_patch16")
    with pytest.raises(error, match=match):
        model(x)


def test_constructor_rejects_bad_configuration():
    with pytest.raises(ValueError, match="depth must be a multiple of 3"):
        Conformer(depth=10)
    with pytest.raises(ValueError, match="patch_size must be a multiple of 16"):
        Conformer(patch_size=8)


def test_same_seed_same_weights_and_outputs():
    def build():
        torch.manual_seed(7)
        return fastconformer.create_model("conformer_tiny_patch16").eval()

    a, b = build(), build()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(a(x), b(x)))


def test_initialisation_follows_the_official_rules():
    torch.manual_seed(0)
    model = fastconformer.create_model("conformer_tiny_patch16")
    assert model.trans_norm.eps == 1e-5 and model.bn1.eps == 1e-5
    assert model.trans_1.norm1.eps == 1e-6 and model.conv_trans_2.expand_block.bn.eps == 1e-6
    assert model.conv_trans_2.squeeze_block.ln.eps == 1e-6 and model.conv_1.bn1.eps == 1e-6
    assert torch.all(model.trans_1.attn.qkv.bias == 0) and torch.all(model.conv_1.bn3.weight == 1)
    assert model.trans_cls_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    fan_out = model.conv1.weight[0].numel() // 3 * 64  # 7*7*64
    assert model.conv1.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


def test_train_and_eval_modes():
    torch.manual_seed(0)
    model = fastconformer.create_model("conformer_tiny_patch16", drop_rate=0.2, drop_path_rate=0.2)
    x = torch.randn(3, 3, 224, 224)
    before = model.conv_trans_2.cnn_block.bn1.running_mean.clone()
    model.train()
    with torch.no_grad():
        t1, t2 = model(x), model(x)
    assert not torch.allclose(t1[1], t2[1])  # dropout and stochastic depth are live
    assert not torch.equal(before, model.conv_trans_2.cnn_block.bn1.running_mean)  # batch stats update
    assert int(model.conv_trans_2.cnn_block.bn1.num_batches_tracked) == 2
    model.eval()
    frozen = model.conv_trans_2.cnn_block.bn1.running_mean.clone()
    with torch.no_grad():
        e1, e2 = model(x), model(x)
    assert all(torch.equal(p, q) for p, q in zip(e1, e2))
    assert torch.equal(frozen, model.conv_trans_2.cnn_block.bn1.running_mean)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = fastconformer.create_model("conformer_tiny_patch16", num_classes=5)
    conv_logits, trans_logits = model(torch.randn(2, 3, 224, 224))
    target = torch.tensor([1, 3])
    loss = torch.nn.functional.cross_entropy(conv_logits, target) + torch.nn.functional.cross_entropy(
        trans_logits, target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_path_follows_the_pinned_timm(dtype):
    """The official repository pins timm 0.3.2: per-sample uniform draws r of shape (B, 1, 1), mask
    floor(keep + r) (a sample survives when r >= drop_prob), output x.div(keep) * mask, bit for bit."""
    from fastconformer.reference import DropPath

    x = torch.randn(16, 5, 7, dtype=dtype)
    module = DropPath(0.3).train()
    torch.manual_seed(11)
    out = module(x)
    torch.manual_seed(11)
    r = torch.rand(16, 1, 1, dtype=dtype)
    survives = (r >= 0.3).to(dtype)
    assert 0 < survives.sum() < 16
    assert torch.equal(out, x.div(0.7) * survives)
    assert module.eval()(x) is x


def test_drop_path_of_one_drops_every_sample():
    from fastconformer.reference import drop_path

    x = torch.randn(4, 3, 5, requires_grad=True)
    out = drop_path(x, 1.0, training=True)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
