"""Checkpoint loading: every container layout, MMPretrain's names, unsafe pickles, unreadable files,
mismatch reports that agree with torch's own load_state_dict, create_model's argument checks."""

import argparse
import os
import pickle
from collections import OrderedDict

import pytest
import torch

import fastconformer
from fastconformer.checkpoint import CheckpointMismatchError, convert_mmpretrain, read_state_dict
from fastconformer.registry import guess_variant

NAME = "conformer_tiny_patch16"


@pytest.fixture(scope="module")
def source_state():
    torch.manual_seed(11)
    model = fastconformer.create_model(NAME)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def _blank_model():
    """The tiny variant with uninitialised weights (built on the meta device, then given CPU memory):
    cheap to build, and equal to a checkpoint only once every value has been loaded."""
    with torch.device("meta"):
        model = fastconformer.create_model(NAME)
    return model.to_empty(device="cpu")


def _mmpretrain_name(name):
    """Our key or module path -> MMPretrain's (the official model is MMPretrain's backbone + head)."""
    prefix = "head" if name.startswith(("conv_cls_head", "trans_cls_head")) else "backbone"
    name = ("." + name + ".").replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
    name = name.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
    return prefix + name[:-1] if name != ".." else prefix


def _to_mmpretrain(state):
    out = OrderedDict((_mmpretrain_name(k), v) for k, v in state.items())
    out["data_preprocessor.mean"] = torch.zeros(3)
    if hasattr(state, "_metadata"):
        out._metadata = OrderedDict((_mmpretrain_name(k), v) for k, v in state._metadata.items())
    return out


def _to_data_parallel(state):
    """Keys and module versions as DataParallel/DDP's state_dict() names them."""
    out = OrderedDict(("module." + k, v) for k, v in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = OrderedDict((f"module.{k}" if k else "module", v) for k, v in state._metadata.items())
    return out


LAYOUTS = {
    "raw": lambda s: s,
    "model": lambda s: {"model": s, "epoch": 299, "args": argparse.Namespace(lr=5e-4)},
    "state_dict": lambda s: {"state_dict": s, "meta": {"epoch": 3}},
    "module_prefix": lambda s: {"model": _to_data_parallel(s)},
    "mmpretrain": lambda s: {"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": _to_mmpretrain(s)},
    "nested": lambda s: {"state_dict": {"module": s}},
    "data_parallel_in_ddp": lambda s: _to_data_parallel(_to_data_parallel(s)),
    "first_with_tensors": lambda s: {"model": {"epoch": 3}, "state_dict": s},
    "model_is_a_tensor": lambda s: {"model": torch.zeros(1), "state_dict": s},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("via_file", [True, False])
def test_round_trip(tmp_path, source_state, layout, via_file):
    blob = LAYOUTS[layout](source_state)
    if via_file:
        path = tmp_path / "ckpt.pth"
        torch.save(blob, path)
        blob = path
    target = _blank_model()
    fastconformer.load_checkpoint(target, blob, strict=True)
    for k, v in target.state_dict().items():
        assert torch.equal(v, source_state[k]), k


@pytest.mark.parametrize("layout", ["raw", "module_prefix", "mmpretrain"])
def test_safetensors_round_trip_with_the_same_key_conversions(tmp_path, source_state, layout):
    from safetensors.torch import save_file

    blob = dict({"raw": source_state, "module_prefix": _to_data_parallel(source_state),
                 "mmpretrain": _to_mmpretrain(source_state)}[layout])
    path = tmp_path / "ckpt.safetensors"
    save_file(blob, path)
    target = _blank_model()
    fastconformer.load_checkpoint(target, path, strict=True)
    for k, v in target.state_dict().items():
        assert torch.equal(v, source_state[k]), k
    del blob[next(k for k in blob if k.endswith("conv_cls_head.bias"))]
    save_file(blob, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): conv_cls_head.bias"):
        fastconformer.load_checkpoint(_blank_model(), path, strict=True)


def test_unreadable_safetensors_says_so(tmp_path, source_state):
    from safetensors.torch import save_file

    path = tmp_path / "ckpt.safetensors"
    save_file(dict(source_state), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"'.*ckpt.safetensors' is not a readable safetensors file \(.*\); expected a "
                                         r"file written by safetensors .* truncated or damaged\?$"):
        read_state_dict(path)
    path.write_text("hello")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file '.*missing.safetensors' \(expected a file written "
                                                r"by safetensors"):
        read_state_dict(tmp_path / "missing.safetensors")


def _without_counters(state, versions):
    """state without BatchNorm's num_batches_tracked; module versions: 'absent' (no _metadata),
    'old' (every module version 1, as before torch 0.4.1) or 'current' (as state_dict() writes them)."""
    out = OrderedDict((k, v) for k, v in state.items() if not k.endswith(".num_batches_tracked"))
    if versions != "absent":
        out._metadata = OrderedDict((k, {**v, "version": 1} if versions == "old" else v)
                                    for k, v in state._metadata.items())
    return out


def test_torch_fills_missing_bn_counters_only_without_version_2_metadata(source_state):
    """The rule load_checkpoint follows, as torch's BatchNorm applies it."""
    model = fastconformer.create_model(NAME)
    model.load_state_dict(_without_counters(source_state, "absent"), strict=True)
    model.load_state_dict(_without_counters(source_state, "old"), strict=True)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        model.load_state_dict(_without_counters(source_state, "current"), strict=True)


@pytest.mark.parametrize("versions", ["absent", "old", "current"])
@pytest.mark.parametrize("layout", ["raw", "file", "module_prefix", "mmpretrain"])
def test_missing_bn_counters_accepted_exactly_when_torch_accepts_them(tmp_path, source_state, versions, layout):
    state = _without_counters(source_state, versions)
    if layout == "file":
        torch.save(state, tmp_path / "ckpt.pth")
        blob = tmp_path / "ckpt.pth"
    else:
        blob = {"raw": state, "module_prefix": _to_data_parallel(state), "mmpretrain": _to_mmpretrain(state)}[layout]
    model = _blank_model()
    counters = [k for k in source_state if k.endswith(".num_batches_tracked")]
    before = {k: v.clone() for k, v in model.state_dict().items() if k in counters}
    if versions == "current":
        with pytest.raises(CheckpointMismatchError) as err:
            fastconformer.load_checkpoint(model, blob, strict=True)
        msg = str(err.value)
        assert f"missing keys ({len(counters)}): {', '.join(counters[:20])} ..." in msg
        assert "unexpected" not in msg and "size mismatch" not in msg
        fastconformer.load_checkpoint(model, blob, strict=False)
    else:
        fastconformer.load_checkpoint(model, blob, strict=True)
    for k, v in model.state_dict().items():  # counters missing from the checkpoint keep the model's own
        assert torch.equal(v, before[k] if k in before else source_state[k]), k


def test_one_element_counters_load_as_torch_loads_them(source_state):
    """torch reads a 1-element tensor into a 0-dim buffer (checkpoints from before torch 0.4)."""
    state = {k: v.reshape(1) if v.dim() == 0 else v for k, v in source_state.items()}
    model = _blank_model()
    fastconformer.load_checkpoint(model, state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source_state[k]), k


def test_create_model_pretrained(tmp_path, source_state):
    path = tmp_path / "Conformer_tiny_patch16.pth"
    torch.save({"model": source_state}, path)
    model = fastconformer.create_model("Conformer_tiny_patch16", pretrained=path)
    assert torch.equal(model.cls_token, source_state["cls_token"])
    model = fastconformer.create_model(NAME, pretrained=source_state)
    assert torch.equal(model.cls_token, source_state["cls_token"])


def test_mmpretrain_conversion_names(source_state):
    converted = convert_mmpretrain(_to_mmpretrain(source_state))
    assert set(converted) == set(source_state)
    assert "trans_1.norm1.weight" in converted and "conv_trans_5.trans_block.mlp.fc2.bias" in converted
    fc2 = "conv_trans_5.trans_block.mlp.fc2"
    assert converted._metadata[fc2] == source_state._metadata[fc2]  # module versions renamed with the keys
    with pytest.raises(ValueError, match=r"no MMPretrain keys \(backbone\.\*, head\.\*\)"):
        convert_mmpretrain(source_state)
    with pytest.raises(TypeError, match="state_dict"):
        convert_mmpretrain([1, 2])


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer, match", [
    (torch.save, "refusing to load .*weights_only=True"),
    (lambda obj, path: path.write_bytes(pickle.dumps(obj)), "is not a PyTorch checkpoint \\(a pickle that torch.save"),
], ids=["torch.save", "pickle.dump"])
def test_unsafe_pickle_is_refused_never_executed(tmp_path, writer, match):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    writer({"model": Exploit(marker)}, path)
    with pytest.raises(ValueError, match=match) as err:
        fastconformer.load_checkpoint(fastconformer.create_model(NAME), path)
    assert not marker.exists()
    message = str(err.value)  # one line, naming what was refused, never advising weights_only=False
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message
    if writer is torch.save:
        assert "posix.system" in message.rsplit("(torch.save(model.state_dict(), path)). ", 1)[1]


@pytest.mark.parametrize("content, what", [
    (b"", "(empty file)"),
    (b"hello world\n", "(not a torch.save zip archive or pickle: starts with b'hello world\\n')"),
    (pickle.dumps({"model": {}}, protocol=2), "(a pickle that torch.save did not write"),
], ids=["empty", "text", "plain_pickle"])
def test_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, what):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert msg.startswith(f"{str(path)!r} is not a PyTorch checkpoint {what}")
    assert "expected a file written by torch.save" in msg and "\n" not in msg


def test_damaged_checkpoint_missing_path_and_directory(tmp_path, source_state):
    path = tmp_path / "ckpt.pth"
    torch.save(source_state, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable PyTorch checkpoint \(RuntimeError: .*truncated or damaged"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file '.*missing.pth' \(expected a file written by"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"ckpt.pth' holds a list; expected a state_dict"):
        read_state_dict(path)
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a checkpoint file \(expected a file written by"):
        read_state_dict(tmp_path)


def test_patch32_weights_into_patch16_model_says_so():
    with torch.device("meta"):
        state = fastconformer.create_model("conformer_small_patch32").state_dict()
        model = fastconformer.create_model("conformer_small_patch16")
    with pytest.raises(CheckpointMismatchError) as err:
        fastconformer.load_checkpoint(model, state)
    msg = str(err.value)
    assert ("size mismatch for trans_patch_conv.weight: copying a param with shape torch.Size([384, 64, 8, 8]) from "
            "checkpoint, the shape in current model is torch.Size([384, 64, 4, 4])") in msg
    assert "looks like conformer_small_patch32" in msg and "the model is conformer_small_patch16" in msg


def test_missing_and_unexpected_keys_are_listed_and_the_model_is_untouched(source_state):
    state = dict(source_state)
    del state["trans_norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["trans_norm.bias"] = torch.ones_like(state["trans_norm.bias"])
    model = fastconformer.create_model(NAME)
    before = model.trans_norm.bias.clone()
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): trans_norm.weight") as err:
        fastconformer.load_checkpoint(model, state)
    assert "unexpected keys (1): extra.weight" in str(err.value)
    assert torch.equal(model.trans_norm.bias, before)
    result = fastconformer.load_checkpoint(model, state, strict=False)
    assert result.missing_keys == ["trans_norm.weight"] and result.unexpected_keys == ["extra.weight"]
    assert torch.equal(model.trans_norm.bias, state["trans_norm.bias"])


def test_guess_variant_ignores_classifier_size_and_bn_counters(source_state):
    state = _without_counters(source_state, "absent")
    state["trans_cls_head.weight"] = torch.zeros(10, 384)
    assert guess_variant(state)[0] == NAME
    with pytest.raises(TypeError, match=r"state_dict .* read_state_dict\(path\)"):
        guess_variant("Conformer_tiny_patch16.pth")


def _cyclic():
    blob = {}
    blob["model"] = blob
    return blob


@pytest.mark.parametrize("blob, error, match", [
    ([1, 2, 3], TypeError, "a checkpoint must be a file path or a state_dict"),
    ({"epoch": 3}, ValueError, r"no state_dict in the checkpoint: checkpoint holds no tensors under parameter names "
                               r"\(keys: 'epoch'\)"),
    ({}, ValueError, r"checkpoint holds no tensors under parameter names \(empty\)"),
    ({0: torch.zeros(1), "lr": 0.1}, ValueError,
     r"checkpoint holds no tensors under parameter names \(keys: 0, 'lr'\)"),
    ({"model": torch.zeros(3)}, ValueError, r"checkpoint\['model'\] holds a Tensor, not a state_dict"),
    ({"model": {"epoch": 3}, "state_dict": [torch.zeros(1)]}, ValueError,
     r"checkpoint\['model'\] holds no tensors under parameter names \(keys: 'epoch'\); "
     r"checkpoint\['state_dict'\] holds a list, not a state_dict; expected"),
    (_cyclic(), ValueError, r"checkpoint\['model'\] refers back to a dict that holds it"),
])
def test_bad_checkpoint_objects(blob, error, match):
    with pytest.raises(error, match=match):
        read_state_dict(blob)


def test_load_checkpoint_argument_types(source_state):
    with pytest.raises(TypeError, match="nn.Module"):
        fastconformer.load_checkpoint("not a model", {})
    with pytest.raises(TypeError, match="strict must be True or False, got 'no'"):
        fastconformer.load_checkpoint(fastconformer.create_model(NAME), source_state, strict="no")


@pytest.mark.parametrize("kwargs, match", [
    (dict(fast="no"), "fast must be True or False, got 'no'"),
    (dict(fast=None), "fast must be True or False, got None"),
    (dict(pretrained=True), "pretrained must be a checkpoint path, a state_dict, 'hf-hub:ORG/REPO' or None .* got "
                            "True: fastconformer has no default weights"),
    (dict(pretrained=["a.pth"]), "pretrained must be a checkpoint path, a state_dict, 'hf-hub:ORG/REPO' or None .* got "
                                 "list"),
])
def test_create_model_argument_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        fastconformer.create_model(NAME, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=-1), "num_classes must be an int >= 0 .*got -1"),
    (dict(num_classes=2.5), "num_classes must be an int >= 0 .*got 2.5"),
    (dict(drop_path_rate=2.0), "drop_path_rate is a probability, from 0 to 1; got 2.0"),
    (dict(drop_rate=-0.1), "drop_rate is a probability, from 0 to 1; got -0.1"),
    (dict(attn_drop_rate="0.1"), "attn_drop_rate is a probability, from 0 to 1; got '0.1'"),
])
def test_create_model_argument_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastconformer.create_model(NAME, **kwargs)


def test_create_model_takes_numpy_numbers():
    np = pytest.importorskip("numpy")
    model = fastconformer.create_model(NAME, depth=3, num_classes=np.int64(10), drop_path_rate=np.float32(0.1))
    assert model.num_classes == 10 and type(model.num_classes) is int
