"""CPU inference through oneDNN Graph (:func:`fastconformer.onednn_graph`): the traced graphs equal
the float64 reference (float32; bfloat16 within twice the eager autocast model's error), one per input
signature, and really serve; every call they cannot serve (training, autograd, other dtypes, the
oneDNN switch off, a submodule in train mode) runs the model itself; any tracked change to the
parameters or buffers drops the graphs."""

import copy
import pickle
import re
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import fastconformer
from fastconformer import dispatch
from fastconformer.onednn_graph import INPUT_LIMIT, OneDNNGraph, onednn_graph, onednn_graph_available
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
    assert list(graph.graphs().values())[0] > 0 and len(graph.graphs()) == 1, "a fused graph served"
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
    assert list(graph.graphs()) == [((3, 3, 224, 224), False, True)]
    for o, b, e in zip(out, eager, expected):
        assert o.dtype == b.dtype == torch.bfloat16, "autocast's output dtype"
        assert rel_error(o, e) <= HALF_FACTOR * rel_error(b, e) + HALF_SLACK


def test_one_graph_per_signature_and_no_eviction(models):
    """Signatures beyond max_graphs run the eager model (one warning), never evicting a graph: a
    dropped trace's memory never comes back, so rotating shapes would grow the process without end."""
    _, fast = models
    graph = onednn_graph(fast, max_graphs=2)
    with torch.no_grad():
        for batch in (1, 2):
            graph(_images(batch, 3, 224, 224))
        with pytest.warns(RuntimeWarning, match=r"max_graphs.*\(3, 3, 224, 224\).*eager") as record:
            out = graph(_images(3, 3, 224, 224))
            graph(_images(4, 3, 224, 224))  # warned once
            graph(_images(1, 3, 224, 224))  # still served by its graph
        expected = fast(_images(3, 3, 224, 224))
    assert len([w for w in record if "max_graphs" in str(w.message)]) == 1
    assert record[0].filename == __file__, "the warning points at the caller's line"
    assert list(graph.graphs()) == [((1, 3, 224, 224), False, False), ((2, 3, 224, 224), False, False)]
    assert all(torch.equal(o, e) for o, e in zip(out, expected)), "the eager model's own result"
    graph.clear()
    with torch.no_grad():
        graph(_images(3, 3, 224, 224))
    assert list(graph.graphs()) == [((3, 3, 224, 224), False, False)]


def test_eager_wherever_the_graph_cannot_serve(models, monkeypatch):
    model, fast = models
    fast, model = copy.deepcopy(fast), copy.deepcopy(model)
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224)
    out = graph(x)  # grad mode on, parameters require grad: eager, gradients flow
    assert all(o.requires_grad for o in out) and not graph.graphs()
    sum(o.sum() for o in out).backward()
    assert fast.trans_1.attn.qkv.weight.grad is not None
    fast.requires_grad_(False)
    xg = x.clone().requires_grad_()
    sum(o.sum() for o in graph(xg)).backward()  # frozen parameters, a gradient to the input (saliency)
    assert xg.grad is not None and not graph.graphs()
    with torch.no_grad():
        with dispatch.onednn(False):
            graph(x)
        assert not graph.serves(x.double()) and not graph.serves(x[0])
        fast.conv_trans_2.trans_block.train()  # one submodule in train mode (dropout would apply)
        assert not graph.serves(x)
        fast.eval()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not graph.serves(x)
        with monkeypatch.context() as patch, torch.autocast("cpu", dtype=torch.bfloat16):
            patch.setattr(sys.modules["fastconformer.onednn_graph"], "onednn_bf16_available", lambda: False)
            assert not graph.serves(x)
        with monkeypatch.context() as patch:  # a torch without the fuser (TorchScript removed)
            patch.setattr(sys.modules["fastconformer.onednn_graph"], "onednn_graph_available", lambda: False)
            assert not graph.serves(x) and rel_error(graph(x), model(x.double())) <= MODEL_TOL
        hook = fast.conv_trans_2.register_forward_hook(lambda module, args, output: None)
        assert not graph.serves(x)
        hook.remove()
        hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
        assert not graph.serves(x)
        hook.remove()
        assert graph.serves(x) and not graph.graphs()
    graph.train()
    assert fast.training and model.train().training and not graph.serves(x)
    with torch.no_grad():  # train mode: batch statistics, as the model computes them
        assert rel_error(graph(x), model(x.double())) <= MODEL_TOL
    assert not graph.graphs()


def test_images_whose_logits_must_be_nan_run_eagerly(models, monkeypatch):
    """NaN, Inf and pixels past INPUT_LIMIT (float32 overflows inside the model from ~1e17: the
    eager model's logits are NaN, a graph's ReLUs would make them finite), empty batches and
    non-finite parameters run the eager model."""
    model, fast = models
    fast = copy.deepcopy(fast)
    graph = onednn_graph(fast)
    x = _images(3, 3, 224, 224)
    bad = x.clone()
    bad[0, 0, 5, 5], bad[1, 1, 100, 7] = float("nan"), float("inf")
    with torch.no_grad():
        graph(x)
        assert graph.graphs() and graph.serves(x * INPUT_LIMIT / x.abs().max())
        for image in (bad, x * 1e20):
            assert not graph.serves(image)
            out, expected = graph(image), fast(image)
            assert all(torch.equal(o.isfinite(), e.isfinite()) for o, e in zip(out, expected))
            assert not out[0][:2].isfinite().any() and not out[1][:2].isfinite().any()
        assert not graph.serves(x[:0]) and [o.shape for o in graph(x[:0])] == [(0, 1000)] * 2
        fast.conv1.weight[0, 0, 0, 0] = float("nan")  # before a ReLU: a graph would zero what eager makes NaN
        with monkeypatch.context() as patch:
            patch.setattr(graph, "_trace", lambda *args: pytest.fail("traced a model with a NaN weight"))
            assert not graph.serves(x) and not graph(x)[0].isfinite().any() and not graph.graphs()


def test_weights_that_overflow_within_the_input_limit_stay_eager(models):
    """Finite weights that blow activations up (the stem x 1e16): images of magnitude 1e6 overflow in
    the eager model, so the signature runs eagerly (verification on a probe scaled to INPUT_LIMIT)."""
    model, fast = models
    fast = copy.deepcopy(fast)
    with torch.no_grad():
        fast.conv1.weight.mul_(1e16)
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224) * (INPUT_LIMIT / 10)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="overflows float32"):
        out = graph(x)
    assert not graph.graphs()
    with torch.no_grad():
        assert all(torch.equal(o.isfinite(), e.isfinite()) for o, e in zip(out, fast(x)))


def test_an_input_the_model_refuses_raises_its_error_untraced(models):
    _, fast = models
    graph = onednn_graph(fast)
    with torch.no_grad():
        for x in (_images(2, 4, 224, 224), _images(1, 3, 100, 100)):
            with pytest.raises(ValueError) as raised:
                fast(x)
            with pytest.raises(ValueError, match=re.escape(str(raised.value))):  # the model's words, real sizes
                graph(x)
    assert not graph.graphs()


def test_serves_under_inference_mode(models):
    model, fast = models
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224)
    with torch.inference_mode():
        out = graph(x)
    assert len(graph.graphs()) == 1 and rel_error(out, model(x.double())) <= MODEL_TOL


def test_changed_parameters_drop_the_graphs(models, monkeypatch):
    model, fast = models
    fast, model = copy.deepcopy(fast), copy.deepcopy(model)
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224)
    with torch.no_grad():
        graph(x)
        first = graph._graphs[next(iter(graph.graphs()))]
        for m in (fast, model):
            m.trans_cls_head.bias.add_(1.0)
            m.conv_trans_2.cnn_block.bn1.running_mean.mul_(0.5)
        with pytest.warns(RuntimeWarning, match="model changed since its graphs were traced.*never frees"):
            out = graph(x)
        assert len(graph.graphs()) == 1 and graph._graphs[next(iter(graph.graphs()))] is not first, "traced again"
        assert rel_error(out, model(x.double())) <= MODEL_TOL
        for m in (fast, model):  # a module replaced (no parameters of its own): traced again
            m.conv_trans_2.cnn_block.act1 = nn.Hardtanh(0.0, 1.0).eval()
        assert rel_error(graph(x), model(x.double())) <= MODEL_TOL and graph.serves(x)
        fast.load_state_dict(copy.deepcopy(fast.state_dict()))
        graph(x)
        assert len(graph.graphs()) == 1
        fast.trans_cls_head.double()  # a float64 head after serving: no graph, the model's own dtype error
        with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="dtype"):
            patch.setattr(graph, "_trace", lambda *args: pytest.fail("traced a float64 head"))
            graph(x)
        assert not graph.graphs()
        fast.trans_cls_head.float()
        assert rel_error(graph(x), model(x.double())) <= MODEL_TOL and len(graph.graphs()) == 1
        for m in (fast, model):  # restrided in place of the same storage: version, address and shape unchanged
            weight = m.trans_1.attn.proj.weight
            weight.data = weight.data.t()
        assert rel_error(graph(x), model(x.double())) <= MODEL_TOL
    graph.clear()
    assert not graph.graphs()


def test_fused_optimizer_steps_drop_the_graphs(models):
    """A fused optimizer step (its kernels move no version counter, torch 2.13) still drops the
    graphs: seen in the optimizer's own step post-hook (which torch runs before the global ones) and
    after step() returns."""
    _, fast = models
    fast = copy.deepcopy(fast)
    graph = onednn_graph(fast)
    x = _images(2, 3, 224, 224)
    with torch.no_grad():
        graph(x)
    optimizer = torch.optim.Adam(fast.parameters(), lr=1e-2, fused=True)
    errors = []

    def compare_with_eager(*_):
        with torch.no_grad(), pytest.warns(RuntimeWarning, match="model changed since its graphs were traced"):
            out = graph(x)
        with torch.no_grad():
            errors.append(rel_error(out, fast(x)))

    optimizer.register_step_post_hook(compare_with_eager)
    for p in fast.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
    optimizer.step()
    compare_with_eager()
    assert len(errors) == 2 and max(errors) <= MODEL_TOL, errors


def test_copies_start_without_graphs(models):
    _, fast = models
    graph = onednn_graph(fast)
    x = _images(1, 3, 224, 224)
    with torch.no_grad():
        graph(x)
        for clone in (copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))):
            assert not clone.graphs()
            assert rel_error(clone(x), graph(x)) <= MODEL_TOL and len(clone.graphs()) == 1


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
    monkeypatch.setattr(sys.modules["fastconformer.onednn_graph"], "MODEL_TOL", -1.0)
    graph = onednn_graph(fast)
    x = _images(1, 3, 224, 224)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="does not match the eager model"):
        out = graph(x)
    assert not graph.graphs() and rel_error(out, model(x.double())) <= MODEL_TOL
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


def test_traced_bfloat16_model_takes_the_plain_op_branch(models):
    """The bfloat16 graphs trace a bfloat16 copy through the export branch (any CPU can run it)."""
    _, fast = models
    fast16 = copy.deepcopy(fast).to(torch.bfloat16)
    x = _images(1, 3, 224, 224).bfloat16()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast16, x, check_trace=False, strict=False)
        expected = fast(x.float())
        eager = fast16(x)
        assert rel_error(traced(x), expected) <= HALF_FACTOR * rel_error(eager, expected) + HALF_SLACK
