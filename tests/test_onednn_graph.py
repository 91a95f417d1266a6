"""CPU inference through oneDNN Graph (:func:`fastconformer.onednn_graph`): the traced graphs equal
the float64 reference (float32; bfloat16 within twice the eager autocast model's error), one per input
signature, and really serve; every call they cannot serve (training, autograd, other dtypes, the
oneDNN switch off, a submodule in train mode) runs the model itself; any tracked change to the
parameters or buffers drops the graphs."""

import copy
import pickle
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer import dispatch
from fastconformer.onednn_graph import OneDNNGraph, onednn_graph, onednn_graph_available
from fastconformer.testing import HALF_FACTOR, HALF_SLACK, MODEL_TOL, reference_and_fast, rel_error

pytestmark = pytest.mark.skipif(not onednn_graph_available(), reason="this torch has no oneDNN Graph fuser")


@pytest.fixture(scope="module")
def models():
    """(float64 reference, fast model) with random weights and BatchNorm statistics, eval mode."""
    model, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    return model.double().eval(), fast.eval()


def _images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape, layout", [((3, 3, 224, 224), "contiguous"), ((3, 3, 256, 320), "channels_last"),
                                           ((2, 3, 224, 224), "strided")])
def test_graph_matches_float64_reference(models, shape, layout):
    model, fast = models
    x = _images(*shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = _images(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2]
    graph = onednn_graph(fast)
    with torch.no_grad():
        out = graph(x)
        expected = model(x.double())
    assert graph.graphs() == 1, "the graph served"
    assert isinstance(out, list) and len(out) == 2
    for o, e in zip(out, expected):
        assert o.dtype == torch.float32 and rel_error(o, e) <= MODEL_TOL


@pytest.mark.skipif(not dispatch.onednn_bf16_available(), reason="no native bfloat16 in oneDNN on this CPU")
def test_bf16_graph_within_twice_the_eager_error(models):
    model, fast = models
    x = _images(3, 3, 224, 224, seed=1)
    graph = onednn_graph(fast)
    with torch.no_grad():
        expected = model(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = graph(x)
            eager = fast(x)
    assert graph.graphs() == 1
    for o, b, e in zip(out, eager, expected):
        assert o.dtype == b.dtype == torch.bfloat16, "autocast's output dtype"
        assert rel_error(o, e) <= HALF_FACTOR * rel_error(b, e) + HALF_SLACK


def test_one_graph_per_signature_and_lru(models):
    _, fast = models
    graph = onednn_graph(fast, max_graphs=2)
    with torch.no_grad():
        for batch in (1, 2, 1, 3):
            graph(_images(batch, 3, 224, 224))
    assert graph.graphs() == 2 and list(graph._graphs) == [((1, 3, 224, 224), False, False),
                                                           ((3, 3, 224, 224), False, False)]


def test_eager_wherever_the_graph_cannot_serve(models):
    model, fast = models
    fast = copy.deepcopy(fast)
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224)
    out = graph(x)  # grad mode on, parameters require grad: eager, gradients flow
    assert all(o.requires_grad for o in out) and graph.graphs() == 0
    sum(o.sum() for o in out).backward()
    assert fast.trans_1.attn.qkv.weight.grad is not None
    with torch.no_grad():
        with dispatch.onednn(False):
            graph(x)
        assert not graph.serves(x.double()) and not graph.serves(x[0])
        fast.conv_trans_2.trans_block.train()  # one submodule in train mode (dropout would apply)
        assert not graph.serves(x)
        fast.eval()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not graph.serves(x)
        assert graph.serves(x) and graph.graphs() == 0
    graph.train()
    assert fast.training and not graph.serves(x)
    with torch.no_grad():
        out = graph(x)
    fast.eval()
    with torch.no_grad():
        assert rel_error(out, model(x.double())) > 0  # train mode ran (batch statistics), not a graph
    assert graph.graphs() == 0


def test_changed_parameters_drop_the_graphs(models):
    model, fast = models
    fast, model = copy.deepcopy(fast), copy.deepcopy(model)
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224)
    with torch.no_grad():
        graph(x)
        assert graph.graphs() == 1
        for m in (fast, model):
            m.trans_cls_head.bias.add_(1.0)
            m.conv_trans_2.cnn_block.bn1.running_mean.mul_(0.5)
        out = graph(x)
        assert graph.graphs() == 1, "traced again"
        assert rel_error(out, model(x.double())) <= MODEL_TOL
        fast.load_state_dict(copy.deepcopy(fast.state_dict()))
        graph(x)
        assert graph.graphs() == 1
    graph.clear()
    assert graph.graphs() == 0


def test_copies_start_without_graphs(models):
    _, fast = models
    graph = onednn_graph(fast)
    x = _images(1, 3, 224, 224)
    with torch.no_grad():
        graph(x)
        for clone in (copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))):
            assert clone.graphs() == 0
            assert rel_error(clone(x), graph(x)) <= MODEL_TOL and clone.graphs() == 1


def test_reference_model_and_feature_backbone(models):
    model, _ = models
    reference = copy.deepcopy(model).float()
    graph = onednn_graph(reference)
    features = fastconformer.create_model("conformer_tiny_patch16", features_only=True, depth=3).eval()
    x = _images(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_error(graph(x), model(x.double())) <= MODEL_TOL
        maps = onednn_graph(features)(x)
        assert rel_error(maps, features.double()(x.double())) <= MODEL_TOL


def test_rejects_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="Conformer"):
        onednn_graph(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_graphs"):
        onednn_graph(fastconformer.create_model("conformer_tiny_patch16", depth=3), max_graphs=0)
    assert isinstance(onednn_graph(fastconformer.create_model("conformer_tiny_patch16", depth=3)), OneDNNGraph)


def test_a_graph_that_does_not_match_stays_eager(models, monkeypatch):
    model, fast = models
    monkeypatch.setattr(sys.modules["fastconformer.onednn_graph"], "GRAPH_TOL", -1.0)
    graph = onednn_graph(fast)
    x = _images(1, 3, 224, 224)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="does not match the eager model"):
        out = graph(x)
    assert graph.graphs() == 0 and rel_error(out, model(x.double())) <= MODEL_TOL
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        graph(x)  # remembered: eager without tracing or warning again


def test_torch_jit_trace_of_the_fast_model(models):
    """A user's own torch.jit.trace records the plain-op branch (no oneDNN-internal ops)."""
    model, fast = models
    x = _images(2, 3, 224, 224)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast, x, check_trace=False, strict=False)
        assert "mkldnn" not in str(traced.inlined_graph)
        assert rel_error(traced(x), model(x.double())) <= MODEL_TOL
