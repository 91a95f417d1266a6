"""The backbone API: features_only models equal to the official detection backbone's taps (an
independent reimplementation: forward hooks on the reference classifier), forward_intermediates and
prune_intermediate_layers with timm's semantics, fine-tuning helpers (reset_classifier,
forward_head(pre_logits=True), no_weight_decay, norm_eval, frozen_stem) and loading classification
checkpoints into these models."""

import copy
import functools
import logging

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer.checkpoint import CheckpointMismatchError
from fastconformer.convert import FastConformerFeatures, convert
from fastconformer.reference import ConformerFeatures
from fastconformer.testing import MODULE_TOL, assert_matches, randomize_module, to_float64

NAME = "conformer_tiny_patch16"
# Conformer-Ti's structure, narrower and with 32x32 patches: cheap at 800x1344 and in the Triton interpreter.
MICRO = dict(patch_size=32, channel_ratio=0.25, embed_dim=96, num_heads=2)
# The official detection backbone taps conv_trans_4, 8, 11 and 12, written out for its depth-12
# variants: the last blocks of the second and third stages and the last two blocks. Depth 6 by that rule:
OFFICIAL_TAPS = {12: (4, 8, 11, 12), 6: (2, 4, 5, 6)}
HEAD_KEYS = sorted(f"{m}.{p}" for m in ("trans_norm", "trans_cls_head", "conv_cls_head") for p in ("weight", "bias"))


@functools.cache
def _classifier(depth: int) -> nn.Module:
    """The reference classifier (MICRO, ``depth`` blocks) with random weights and BN statistics, in
    eval mode. Shared: copy it before changing it."""
    torch.manual_seed(0)
    model = fastconformer.create_model(NAME, depth=depth, **MICRO)
    return randomize_module(model, torch.Generator().manual_seed(0)).eval()


@functools.cache
def _official_maps(depth: int, hw: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(input (1, 3, H, W), the maps the official backbone returns for it, float64): the CNN
    output of each tapped block, caught by hooks on a float64 copy of the reference classifier."""
    model = copy.deepcopy(_classifier(depth)).double()
    caught = {}
    for i in OFFICIAL_TAPS[depth]:
        getattr(model, f"conv_trans_{i}").register_forward_hook(lambda m, args, out, i=i: caught.__setitem__(i, out[0]))
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x.double())
    return x, [caught[i] for i in OFFICIAL_TAPS[depth]]


def _in_backend(request, backend: str):
    if backend == "triton":
        request.getfixturevalue("triton_backend")  # skips where triton cannot run
        return fastconformer.backend("triton")
    return fastconformer.backend(backend)


# Two sizes; 800x1344 (a detector's input) not in the Triton interpreter, whose time grows with the image.
CASES = [(12, (256, 320), "reference", "torch"), (12, (256, 320), "fast", "torch"), (6, (256, 320), "fast", "triton"),
         (6, (800, 1344), "reference", "torch"), (6, (800, 1344), "fast", "torch")]


@pytest.mark.parametrize("depth, hw, impl, backend", CASES,
                         ids=[f"depth{d}-{h}x{w}-{impl}-{b}" for d, (h, w), impl, b in CASES])
def test_features_equal_the_official_backbone(request, device, depth, hw, impl, backend):
    x, expected = _official_maps(depth, hw)
    model = fastconformer.create_model(NAME, depth=depth, features_only=True, fast=impl == "fast",
                                       pretrained=_classifier(depth).state_dict(), **MICRO)
    model = model.eval().to(device)
    with torch.no_grad(), _in_backend(request, backend):
        maps = model(x.to(device))
    assert isinstance(maps, list) and len(maps) == len(expected)
    for i, (out, ref) in enumerate(zip(maps, expected)):
        assert out.is_contiguous(), "maps come in the input's memory format"
        assert_matches(out, ref, fp32_tol=MODULE_TOL, name=f"{impl} map {i} at {hw}")
    info = model.feature_info
    assert info.module_name() == [f"conv_trans_{i}" for i in OFFICIAL_TAPS[depth]]
    assert info.channels() == [m.shape[1] for m in maps]
    assert info.reduction() == [hw[0] // m.shape[2] for m in maps] == [hw[1] // m.shape[3] for m in maps]
    assert info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("name, channels", [("conformer_small_patch16", [256, 512, 1024, 1024]),
                                            ("conformer_small_patch32", [256, 512, 1024, 1024]),
                                            ("conformer_tiny_patch16", [64, 128, 256, 256]),
                                            ("conformer_base_patch16", [384, 768, 1536, 1536])])
def test_feature_info_of_the_published_variants(name, channels):
    with torch.device("meta"):
        model = fastconformer.create_model(name, features_only=True)
    info = model.feature_info
    assert info.channels() == channels and info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["conv_trans_4", "conv_trans_8", "conv_trans_11", "conv_trans_12"]
    assert info.out_indices == model.out_indices == (3, 7, 10, 11)
    assert info.channels(0) == channels[0] and info.reduction([1, 3]) == [8, 32] and len(info) == 4
    assert info[2] == {"num_chs": channels[2], "reduction": 16, "module": "conv_trans_11"}
    assert [d["num_chs"] for d in model.feature_info.get_dicts()] == channels


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_maps_keep_a_channels_last_input_layout(impl):
    x, expected = _official_maps(6, (64, 96))
    model = fastconformer.create_model(NAME, depth=6, features_only=True, fast=impl == "fast",
                                       pretrained=_classifier(6).state_dict(), **MICRO).eval()
    with torch.no_grad(), fastconformer.backend("torch"):
        maps = model(x.contiguous(memory_format=torch.channels_last))
    for i, (out, ref) in enumerate(zip(maps, expected)):
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert_matches(out, ref, fp32_tol=MODULE_TOL, name=f"{impl} channels_last map {i}")


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_forward_intermediates_tokens(impl):
    """output_fmt='NLC': each block's tokens (cls first), through trans_norm with norm=True."""
    exact = copy.deepcopy(_classifier(6)).double()
    caught = {}
    exact.trans_1.register_forward_hook(lambda m, args, out: caught.__setitem__(0, out))
    for i in range(2, 7):
        getattr(exact, f"conv_trans_{i}").register_forward_hook(
            lambda m, args, out, i=i: caught.__setitem__(i - 1, out[1]))
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    model = copy.deepcopy(_classifier(6))
    model = convert(model) if impl == "fast" else model
    with torch.no_grad(), fastconformer.backend("torch"):
        exact(x.double())
        tokens = model.forward_intermediates(x, indices=[0, 2, 5], output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[0, 2, 5], output_fmt="NLC", norm=True,
                                             intermediates_only=True)
        expected_normed = [exact.trans_norm(caught[i]) for i in (0, 2, 5)]
    assert [tuple(t.shape) for t in tokens] == [(1, 1 + 2 * 3, 96)] * 3
    assert_matches(tokens, [caught[i] for i in (0, 2, 5)], fp32_tol=MODULE_TOL, name=f"{impl} tokens")
    assert_matches(normed, expected_normed, fp32_tol=MODULE_TOL, name=f"{impl} normed tokens")


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_forward_intermediates_semantics(impl):
    model = copy.deepcopy(_classifier(6))
    model = convert(model) if impl == "fast" else model
    runs = []
    model.conv_trans_6.register_forward_hook(lambda *args: runs.append("conv_trans_6"))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fastconformer.backend("torch"):
        final, every = model.forward_intermediates(x)
        assert len(every) == 6 and len(runs) == 1
        assert [m.shape[1] for m in every] == [d["num_chs"] for d in model.feature_info]
        for indices, expected in [(2, every[4:]), ([0, -1], [every[0], every[5]]), ([5, 1], [every[1], every[5]])]:
            got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected)), indices
        features = model.forward_features(x)
        assert all(torch.equal(a, b) for a, b in zip(final, features))
        assert all(torch.equal(a, b) for a, b in zip(model.forward_head(final), model(x)))
        runs.clear()
        final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert not runs and torch.equal(early[0], every[1]) and torch.equal(final[0], every[1])
        with pytest.raises(ValueError, match="output_fmt must be 'NCHW' .* or 'NLC'"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers():
    model = copy.deepcopy(_classifier(6))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert model.prune_intermediate_layers([3, 1], prune_norm=True) == [1, 3]
        assert not any(hasattr(model, f"conv_trans_{i}") for i in (5, 6)) and model.fin_stage == 5
        assert all(isinstance(m, nn.Identity) for m in (model.trans_norm, model.conv_cls_head, model.trans_cls_head))
        assert not any(k.startswith(("conv_trans_5.", "conv_trans_6.", "trans_norm.", "conv_cls_head.",
                                     "trans_cls_head.")) for k in model.state_dict())
        got = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        fast = convert(copy.deepcopy(model))
        with fastconformer.backend("torch"):
            assert_matches(fast.forward_intermediates(x, indices=[1, 3], intermediates_only=True), to_float64(got),
                           fp32_tol=MODULE_TOL, name="pruned fast model")
        pooled, cls = model(x)  # heads pruned: the pre-logits features
        assert pooled.shape == (1, 32) and cls.shape == (1, 96)


@pytest.mark.parametrize("out_indices, error, match", [
    ((12,), ValueError, r"block index 12 is out of range: the model has 12 blocks, indices 0..11 \(or -12..-1\)"),
    ((-13, 1), ValueError, "block index -13 is out of range"),
    (13, ValueError, "asks for the last 13 blocks; the model has 12"),
    (0, ValueError, "asks for the last 0 blocks"),
    ((3, 3), ValueError, r"name a block more than once \(block indices \[3, 3\]\)"),
    ([11, -1], ValueError, r"name a block more than once \(block indices \[11, 11\]\)"),
    ((), ValueError, "indices is empty"),
    ("3", TypeError, "indices must be None, an int .* or a sequence of block indices, got '3'"),
    (3.0, TypeError, "got 3.0"),
    (True, TypeError, "got True"),
    ((1, 2.5), TypeError, r"block indices must be ints, got 2.5 in \[1, 2.5\]"),
    ([1, None], TypeError, "block indices must be ints, got None"),
])
def test_bad_out_indices_say_what_is_wrong(out_indices, error, match):
    with torch.device("meta"), pytest.raises(error, match=match):
        fastconformer.create_model("conformer_small_patch16", features_only=True, out_indices=out_indices)


def test_out_indices_last_n_and_only_with_features_only():
    with torch.device("meta"):
        model = fastconformer.create_model("conformer_small_patch16", features_only=True, out_indices=2)
        assert model.out_indices == (10, 11) and model.feature_info.channels() == [1024, 1024]
        with pytest.raises(ValueError, match="out_indices selects the maps of a features_only=True model"):
            fastconformer.create_model("conformer_small_patch16", out_indices=(3, 7))


def test_features_model_classes_and_fast_path():
    model = fastconformer.create_model(NAME, depth=3, features_only=True, fast=True, out_indices=(0, 1), **MICRO)
    assert isinstance(model, FastConformerFeatures) and isinstance(model, ConformerFeatures)
    assert not hasattr(model, "conv_trans_3"), "no block after the last tap is built"
    assert fastconformer.convert(model) is model


def test_classification_checkpoint_into_a_features_model(caplog):
    state = _classifier(6).state_dict()
    model = fastconformer.create_model(NAME, depth=6, features_only=True, **MICRO)
    result = model.load_state_dict(state, strict=False)  # torch's own report: the heads, nothing missing
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == HEAD_KEYS
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(6\)"):
        fastconformer.load_checkpoint(model, state, strict=True)
    with caplog.at_level(logging.WARNING, logger="fastconformer"):
        pruned = fastconformer.create_model(NAME, depth=6, features_only=True, out_indices=(1,), pretrained=state,
                                            **MICRO)
    dropped = [k for k in state if k.startswith(("conv_trans_3.", "conv_trans_4.", "conv_trans_5.", "conv_trans_6."))]
    assert [r.getMessage() for r in caplog.records] == [
        f"the state_dict: {len(dropped) + 6} keys not loaded, of modules this model is built without (features_only, "
        "pruned or num_classes=0): trans_norm, trans_cls_head, conv_cls_head, conv_trans_3, conv_trans_4, "
        "conv_trans_5, conv_trans_6"]
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_finetuning_load_skips_heads_of_another_shape(tmp_path, caplog):
    path = tmp_path / "imagenet.pth"
    torch.save(_classifier(3).state_dict(), path)
    torch.manual_seed(5)
    fresh = fastconformer.create_model(NAME, depth=3, num_classes=10, **MICRO)
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="fastconformer"):
        model = fastconformer.create_model(NAME, depth=3, num_classes=10, pretrained=path, **MICRO)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: conv_cls_head and trans_cls_head not loaded: the checkpoint's are for 1000 classes, the model's "
        "for 10; they keep their fresh initialisation"]
    for k, v in model.state_dict().items():
        expected = fresh.state_dict()[k] if k.startswith(("conv_cls_head.", "trans_cls_head.")) else \
            _classifier(3).state_dict()[k]
        assert torch.equal(v, expected), k
    conv_logits, trans_logits = model(torch.randn(3, 3, 64, 64))
    assert conv_logits.shape == trans_logits.shape == (3, 10)
    with pytest.raises(CheckpointMismatchError, match="size mismatch for conv_cls_head.weight"):
        fastconformer.load_checkpoint(fastconformer.create_model(NAME, depth=3, **MICRO), model.state_dict())
    # without num_classes, create_model builds the heads the checkpoint has
    again = fastconformer.create_model(NAME, depth=3, pretrained=model.state_dict(), **MICRO)
    assert again.num_classes == 10 and all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_reset_classifier_forward_head_and_no_weight_decay(impl):
    model = copy.deepcopy(_classifier(3)).double()
    model = convert(model) if impl == "fast" else model
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    assert model.no_weight_decay() == {"cls_token"}
    with torch.no_grad(), fastconformer.backend("torch"):
        features = model.forward_features(x)
        pooled, cls = model.forward_head(features, pre_logits=True)
        assert torch.equal(pooled, features[0].mean((2, 3)))
        assert torch.equal(cls, model.trans_norm(features[1])[:, 0])
        model.reset_classifier(7)
        assert model.num_classes == 7
        assert model.conv_cls_head.weight.shape == (7, 64) and model.trans_cls_head.weight.shape == (7, 96)
        assert model.conv_cls_head.weight.dtype == torch.float64 and not model.conv_cls_head.bias.any()
        conv_logits, trans_logits = model(x)
        assert torch.allclose(conv_logits, model.conv_cls_head(pooled)) and trans_logits.shape == (3, 7)
        model.reset_classifier(0)
        assert all(torch.equal(a, b) for a, b in zip(model(x), (pooled, cls)))
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            model.reset_classifier(bad)
    with pytest.raises(TypeError, match="forward_head takes the .* pair that forward_features returns"):
        model.forward_head(features[0])


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_num_classes_0_and_new_heads_follow_the_model(impl):
    """num_classes=0 at construction gives the pooled features, as reset_classifier(0) does; new heads
    take the model's train/eval mode (an eval model stays all eval: onednn_graph keeps serving)."""
    model = fastconformer.create_model(NAME, depth=3, num_classes=0, fast=impl == "fast", **MICRO).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, cls = model.forward_head(model.forward_features(x), pre_logits=True)
        assert all(torch.equal(a, b) for a, b in zip(model(x), (pooled, cls)))
    assert [o.shape for o in model(x)] == [(2, 64), (2, 96)]
    model.reset_classifier(5)
    assert not any(m.training for m in model.modules()) and model.conv_cls_head.out_features == 5
    model.train().reset_classifier(0)
    assert all(m.training for m in model.modules())
    official = model.state_dict()  # the official code's num_classes=0 head: a zero-width Linear, whose keys load
    official.update({"conv_cls_head.weight": torch.zeros(0, 64), "conv_cls_head.bias": torch.zeros(0)})
    assert not model.load_state_dict(official).missing_keys
    fastconformer.load_checkpoint(model, official)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_norm_eval_and_frozen_stem(impl):
    model = fastconformer.create_model(NAME, depth=3, norm_eval=True, frozen_stem=True, **MICRO)
    model.load_state_dict(_classifier(3).state_dict())
    model = convert(model) if impl == "fast" else model  # in train mode: the options hold through convert

    def norms_in_eval():
        return not any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    assert model.training and norms_in_eval()
    model.requires_grad_(True).train()  # train() freezes the stem again, as the official backbone's does
    assert model.training and model.trans_1.training and norms_in_eval()
    assert not any(p.requires_grad for p in (*model.conv1.parameters(), *model.bn1.parameters()))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with fastconformer.backend("torch"):
        out = model(x)
        sum(o.sum() for o in out).backward()
    with torch.no_grad():
        expected = copy.deepcopy(_classifier(3)).double()(x.double())
    assert_matches(out, expected, fp32_tol=MODULE_TOL, name=f"{impl} norm_eval train-mode logits")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items()), "running statistics unchanged"
    assert model.conv1.weight.grad is None and model.conv_1.conv1.weight.grad is not None

    stem_only = fastconformer.create_model(NAME, depth=3, frozen_stem=True, **MICRO).train()
    assert not stem_only.bn1.training and stem_only.conv_1.bn1.training
    assert not stem_only.conv1.weight.requires_grad and stem_only.conv_1.conv1.weight.requires_grad
