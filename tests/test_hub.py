"""Weights people can share: save_checkpoint (.safetensors / .pth), save_pretrained, the
pretrained_cfg travelling with the weights, and pretrained="hf-hub:ORG/REPO" read offline from a
Hugging Face cache folder each test lays out itself (no network here)."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastconformer
from fastconformer import cli
from fastconformer.hub import read_pretrained_cfg, unwrap_model
from fastconformer.testing import randomize_module

NAME = "conformer_tiny_patch16"
CONFIG = dict(depth=3, patch_size=32, channel_ratio=0.25, embed_dim=96, num_heads=2)  # cheap to write and read
REVISION = "0123456789abcdef0123456789abcdef01234567"
HUB_MISSING = "hf-hub: weights need the optional extra huggingface_hub (pip install 'fastconformer[hub]')"


@pytest.fixture(scope="module")
def model():
    """A small Conformer with random weights and BN statistics, and its own pretrained_cfg."""
    torch.manual_seed(0)
    model = fastconformer.create_model(NAME, **CONFIG)
    randomize_module(model, torch.Generator().manual_seed(0))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 256, 256), "crop_pct": 1.0}
    return model


def _assert_same_weights(loaded, model):
    state = model.state_dict()
    assert list(loaded.state_dict()) == list(state)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_save_checkpoint_round_trip(tmp_path, model, suffix):
    path = fastconformer.save_checkpoint(model, tmp_path / f"reference{suffix}")
    fast_path = fastconformer.save_checkpoint(fastconformer.convert(copy.deepcopy(model)), tmp_path / f"fast{suffix}")
    if suffix == ".safetensors":  # the reference and the fast model write the same tensors and metadata
        from safetensors.torch import load_file

        written, fast_written = load_file(path), load_file(fast_path)
        assert written.keys() == fast_written.keys() and all(torch.equal(written[k], fast_written[k]) for k in written)
        assert read_pretrained_cfg(path) == read_pretrained_cfg(fast_path) == model.pretrained_cfg
    else:  # what the official checkpoints hold: the bare state_dict
        assert list(torch.load(path, weights_only=True)) == list(model.state_dict())
    loaded = fastconformer.create_model(NAME, pretrained=path, **CONFIG)
    _assert_same_weights(loaded, model)
    assert loaded.pretrained_cfg == (model.pretrained_cfg if suffix == ".safetensors" else
                                     fastconformer.create_model(NAME, **CONFIG).pretrained_cfg)
    fastconformer.load_checkpoint(fastconformer.create_model(NAME, **CONFIG), fast_path, strict=True)


def test_save_checkpoint_refuses_unknown_suffix(tmp_path, model):
    with pytest.raises(ValueError, match=r"cannot tell the format of '.*model.bin' from its suffix; use .safetensors, "
                                         r".pth or .pt"):
        fastconformer.save_checkpoint(model, tmp_path / "model.bin")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastconformer.save_checkpoint(model.state_dict(), tmp_path / "model.pth")


def test_save_pretrained_writes_a_hub_repository(tmp_path, model):
    folder = fastconformer.save_pretrained(model, tmp_path / "repo")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 1000
    assert config["pretrained_cfg"] == json.loads(json.dumps(model.pretrained_cfg))


def _lay_out_cache(cache, repo_id: str, model, config: bool = True):
    """A Hugging Face cache holding ``repo_id`` at REVISION, as huggingface_hub lays it out:
    models--ORG--REPO/refs/main naming the commit, the files under snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = fastconformer.save_pretrained(model, repo / "snapshots" / REVISION)
    if not config:
        (snapshot / "config.json").unlink()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline, its cache in tmp_path/cache: through the environment for new processes and
    through its constants, which it reads once at import, for this one."""
    pytest.importorskip("huggingface_hub", reason=HUB_MISSING)
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_hub_round_trip_in_a_fresh_process(tmp_path, model, offline_hub):
    """As a user runs it: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before anything is imported."""
    _lay_out_cache(offline_hub, "org/conformer-micro", model)
    expected = fastconformer.save_checkpoint(model, tmp_path / "expected.safetensors")
    script = textwrap.dedent(f"""
        import torch, fastconformer
        from safetensors.torch import load_file
        expected = load_file({str(expected)!r})
        for spec in ("hf-hub:org/conformer-micro", "hf-hub:org/conformer-micro@{REVISION}"):
            model = fastconformer.create_model({NAME!r}, pretrained=spec, **{CONFIG!r})
            state = model.state_dict()
            assert sorted(state) == sorted(expected)
            assert all(torch.equal(state[k], expected[k]) for k in expected)
            assert model.pretrained_cfg["input_size"] == (3, 256, 256) and model.pretrained_cfg["crop_pct"] == 1.0
        features = fastconformer.create_model({NAME!r}, pretrained=spec, features_only=True, fast=True, **{CONFIG!r})
        assert all(torch.equal(v, expected[k]) for k, v in features.state_dict().items())
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy(),
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_hf_hub_without_config_json_takes_the_cfg_from_the_weights(model, offline_hub):
    _lay_out_cache(offline_hub, "org/weights-only", model, config=False)
    loaded = fastconformer.create_model(NAME, pretrained="hf-hub:org/weights-only", **CONFIG)
    _assert_same_weights(loaded, model)
    assert loaded.pretrained_cfg == model.pretrained_cfg


def test_hf_hub_errors_are_one_line(model, offline_hub):
    _lay_out_cache(offline_hub, "org/conformer-micro", model)
    with pytest.raises(OSError, match=r"^hf-hub:org/absent: cannot get model.safetensors from the Hugging Face Hub or "
                                      r"its cache \(LocalEntryNotFoundError: ") as err:
        fastconformer.create_model(NAME, pretrained="hf-hub:org/absent", **CONFIG)
    assert "\n" not in str(err.value)
    with pytest.raises(OSError, match="hf-hub:org/conformer-micro@main2: cannot get model.safetensors"):
        fastconformer.create_model(NAME, pretrained="hf-hub:org/conformer-micro@main2", **CONFIG)
    for spec in ("hf-hub:conformer", "hf-hub:org/", "hf-hub:a/b/c"):
        with pytest.raises(ValueError, match="expected 'hf-hub:ORG/REPO' or 'hf-hub:ORG/REPO@REVISION'"):
            fastconformer.create_model(NAME, pretrained=spec, **CONFIG)


def test_hf_hub_without_huggingface_hub_says_which_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # an import of it now fails
    with pytest.raises(ImportError, match=r"^pretrained='hf-hub:org/repo' needs huggingface_hub: "
                                          r"pip install 'fastconformer\[hub\]'$"):
        fastconformer.create_model(NAME, pretrained="hf-hub:org/repo", **CONFIG)
    assert cli.main(["predict", "photo.png", "--model", NAME, "--pretrained", "hf-hub:org/repo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: pretrained='hf-hub:org/repo' needs huggingface_hub: pip install 'fastconformer[hub]'"
    assert not any("Traceback" in line for line in err)


@pytest.fixture(scope="module")
def ten_class_model():
    """The small Conformer fine-tuned to 10 classes (random weights), with its own pretrained_cfg."""
    torch.manual_seed(1)
    model = fastconformer.create_model(NAME, num_classes=10, **CONFIG)
    randomize_module(model, torch.Generator().manual_seed(1))
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_pct": 1.0}
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_checkpoint_for_other_classes_builds_a_model_with_its_classes(tmp_path, ten_class_model, suffix):
    """Without num_classes, create_model(pretrained=) builds heads for the checkpoint's classes; with
    it, heads of another shape keep their fresh initialisation (one log line) and the rest loads."""
    path = fastconformer.save_checkpoint(ten_class_model, tmp_path / f"ten{suffix}")
    loaded = fastconformer.create_model(NAME, pretrained=path, **CONFIG)
    assert loaded.num_classes == 10 and loaded.pretrained_cfg["num_classes"] == 10
    _assert_same_weights(loaded, ten_class_model)
    fast = fastconformer.create_model(NAME, pretrained=path, fast=True, **CONFIG).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ten_class_model.eval()(x)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(fast(x), expected))
    refitted = fastconformer.create_model(NAME, pretrained=path, num_classes=1000, **CONFIG)
    assert refitted.conv_cls_head.out_features == 1000
    assert torch.equal(refitted.cls_token, ten_class_model.cls_token)
    features = fastconformer.create_model(NAME, pretrained=path, features_only=True, **CONFIG)
    assert torch.equal(features.conv1.weight, ten_class_model.conv1.weight)


def test_loading_other_classes_into_a_model_says_how(ten_class_model):
    """load_checkpoint into a 1000-class model: the error says the heads are for 10 classes (not that
    every key matches) and what to build instead."""
    with pytest.raises(fastconformer.registry.CheckpointMismatchError) as info:
        fastconformer.load_checkpoint(fastconformer.create_model(NAME, **CONFIG), ten_class_model.state_dict())
    message = str(info.value)
    assert "size mismatch for conv_cls_head.weight" in message
    assert ("its heads are for 10 classes, the model's are for 1000: create_model(name, pretrained=...) builds the "
            "model for the checkpoint's 10 classes") in message
    with pytest.raises(fastconformer.registry.CheckpointMismatchError,
                       match=r"its heads are for 10 classes and the model none: create_model\(name, pretrained=..., "
                             r"num_classes=0\) or features_only=True"):
        fastconformer.load_checkpoint(fastconformer.create_model(NAME, features_only=True, **CONFIG),
                                      ten_class_model.state_dict())


def test_a_save_pretrained_folder_is_a_pretrained_source(tmp_path, ten_class_model):
    folder = fastconformer.save_pretrained(ten_class_model, tmp_path / "repo")
    loaded = fastconformer.create_model(NAME, pretrained=folder, **CONFIG)
    _assert_same_weights(loaded, ten_class_model)
    assert loaded.pretrained_cfg == ten_class_model.pretrained_cfg
    (tmp_path / "empty").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder without model.safetensors: pretrained= takes a "
                                                "checkpoint file, or a folder written by save_pretrained"):
        fastconformer.create_model(NAME, pretrained=tmp_path / "empty", **CONFIG)


def _written_keys(path):
    """The keys of a saved file, sorted (safetensors stores them sorted)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return sorted(load_file(path))
    return sorted(torch.load(path, weights_only=True))


def test_wrapped_models_save_and_load_as_the_model_they_wrap(tmp_path, model):
    """save_checkpoint of onednn_graph(m), torch.compile(m) or DataParallel(m) writes m's own keys
    (the official layout); the wrappers' own state_dicts (keys prefixed model. / _orig_mod. /
    module.) load with pretrained=; load_checkpoint into a wrapper loads the model it wraps."""
    wrappers = {"graph": fastconformer.onednn_graph(copy.deepcopy(model).eval()),
                "compiled": torch.compile(copy.deepcopy(model)),
                "parallel": torch.nn.DataParallel(copy.deepcopy(model)),
                "compiled graph": torch.compile(fastconformer.onednn_graph(copy.deepcopy(model).eval()))}
    for label, wrapped in wrappers.items():
        for suffix in (".safetensors", ".pth"):
            path = fastconformer.save_checkpoint(wrapped, tmp_path / f"{label}{suffix}")
            assert _written_keys(path) == sorted(model.state_dict()), label
            _assert_same_weights(fastconformer.create_model(NAME, pretrained=path, **CONFIG), model)
        assert read_pretrained_cfg(tmp_path / f"{label}.safetensors") == model.pretrained_cfg
        torch.save(wrapped.state_dict(), tmp_path / f"{label}-own.pth")
        assert all(k.startswith(("model.", "_orig_mod.", "module.")) for k in wrapped.state_dict())
        _assert_same_weights(fastconformer.create_model(NAME, pretrained=tmp_path / f"{label}-own.pth", **CONFIG),
                             model)
        for path in (tmp_path / f"{label}.pth", tmp_path / f"{label}-own.pth"):
            with torch.no_grad():
                for p in unwrap_model(wrapped).parameters():
                    p.zero_()
            fastconformer.load_checkpoint(wrapped, path)
            _assert_same_weights(unwrap_model(wrapped), model)
    folder = fastconformer.save_pretrained(wrappers["compiled"], tmp_path / "repo")
    assert _written_keys(folder / "model.safetensors") == sorted(model.state_dict())


def test_modules_holding_a_conformer_are_saved_whole(tmp_path, model):
    """A user's module whose Conformer sits in an attribute named model (not a wrapper) keeps all
    its keys, as does any other module; save_pretrained takes Conformers only."""

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(model)
            self.head = torch.nn.Linear(4, 2)

    classifier = Classifier()
    for suffix in (".safetensors", ".pth"):
        path = fastconformer.save_checkpoint(classifier, tmp_path / f"classifier{suffix}")
        assert _written_keys(path) == sorted(classifier.state_dict())
    linear = torch.nn.Linear(2, 2)
    assert _written_keys(fastconformer.save_checkpoint(linear, tmp_path / "linear.pth")) == ["bias", "weight"]
    assert _written_keys(fastconformer.save_checkpoint(linear, tmp_path / "linear.safetensors")) == ["bias", "weight"]
    with pytest.raises(TypeError, match="save_pretrained writes a Conformer's repository .* got a Linear"):
        fastconformer.save_pretrained(linear, tmp_path / "repo")


def test_a_headless_checkpoint_builds_a_headless_model_or_fresh_heads(tmp_path, model, caplog):
    """A checkpoint without heads (num_classes=0) loads back as a model without heads; with
    num_classes the heads keep their fresh initialisation (one log line)."""
    headless = copy.deepcopy(model)
    headless.reset_classifier(0)
    folder = fastconformer.save_pretrained(headless, tmp_path / "headless")
    loaded = fastconformer.create_model(NAME, pretrained=folder, **CONFIG)
    assert loaded.num_classes == 0 and loaded.pretrained_cfg["num_classes"] == 0
    _assert_same_weights(loaded, headless)
    with caplog.at_level("WARNING", logger="fastconformer"):
        classifier = fastconformer.create_model(NAME, pretrained=folder, num_classes=7, **CONFIG)
    assert classifier.num_classes == 7 and torch.equal(classifier.cls_token, model.cls_token)
    assert "conv_cls_head and trans_cls_head not loaded: the checkpoint has none, the model's for 7" in caplog.text
    with pytest.raises(fastconformer.registry.CheckpointMismatchError,
                       match="it has no classifier heads, the model's are for 1000"):
        fastconformer.load_checkpoint(fastconformer.create_model(NAME, **CONFIG), headless.state_dict())
