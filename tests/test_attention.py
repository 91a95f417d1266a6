"""FusedAttention / the fused attention op against the float64 reference Attention, both backends."""

import concurrent.futures
import copy
import importlib
import warnings

import pytest
import torch

from fastconformer import dispatch
from fastconformer.modules.attention import FusedAttention, attention
from fastconformer.modules.onednn_fusion import onednn_graph_available
from fastconformer.reference import Attention
from fastconformer.testing import MODULE_TOL, assert_matches, randomize_module, rel_error, tf32, to_float64

attention_module = importlib.import_module("fastconformer.modules.attention")  # the name is shadowed by the op

HAS_TRITON = dispatch.triton_available() and (torch.cuda.is_available() or dispatch.interpreter_enabled())

# (B, N, dim, heads, qk_scale): "rand" draws a scale; N and head_dim (dim / heads) cover the model's
# shapes (197 tokens for patch16 at 224, 50 for patch32, 257 and 577 for larger inputs, 1, 17) and
# head_dim 64 (every variant), 32, 80, 96, 128.
CASES = [
    (3, 197, 384, 6, None),
    (1, 50, 576, 9, None),
    (2, 1, 192, 6, "rand"),
    (3, 17, 160, 2, "rand"),
    (1, 257, 192, 2, "rand"),
    (1, 577, 256, 2, "rand"),
    (2, 120, 128, 2, None),  # head_dim 64 at an N where the launchers stream 64-key blocks with a masked tail
]


def _ids(case):
    B, N, dim, heads, scale = case
    return f"B{B}-N{N}-hd{dim // heads}-h{heads}" + ("-randscale" if scale else "")


def _reference(dim, heads, gen, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
    if qk_scale == "rand":
        qk_scale = 0.02 + 0.3 * torch.rand((), generator=gen).item()
    return randomize_module(Attention(dim, heads, qkv_bias=True, qk_scale=qk_scale, attn_drop=attn_drop,
                                      proj_drop=proj_drop), gen).eval()


def _pair(ref, dtype, device):
    """(plain reference in dtype, FusedAttention sharing its parameters)."""
    ref_dt = copy.deepcopy(ref).to(device, dtype)
    return ref_dt, FusedAttention.from_reference(ref_dt)


def _check_forward(ref, x, dtype, device, fp32_tol=MODULE_TOL):
    expected = copy.deepcopy(ref).to(device, torch.float64)(to_float64(x).to(device))
    ref_dt, fused = _pair(ref, dtype, device)
    xd = x.to(device, dtype)
    with torch.no_grad():
        out = fused(xd)
        baseline = ref_dt(xd)
    assert out.dtype == dtype and out.shape == x.shape
    if fp32_tol is None:
        fp32_tol = max(MODULE_TOL, 2 * rel_error(baseline, expected) + 1e-6)
    assert_matches(out, expected, baseline=None if dtype == torch.float32 else baseline, fp32_tol=fp32_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(backend_name, device, gen, case, dtype):
    B, N, dim, heads, qk_scale = case
    ref = _reference(dim, heads, gen, qk_scale)
    _check_forward(ref, torch.randn(B, N, dim, generator=gen), dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits(backend_name, device, gen, dtype):
    """Scores q·k of magnitude ~1e4 before scaling (up to ~3e4): fp16 must not overflow. The
    float32 bound is the policy's 1e-5, or 2x the plain float32 module's own error where that is
    larger (at logits ~1e3 after scaling, fp32 rounding of the logits alone costs about 1e-5)."""
    ref = _reference(384, 6, gen)
    x = 25 * torch.randn(2, 197, 384, generator=gen)
    _check_forward(ref, x, dtype, device, fp32_tol=None)


@pytest.fixture
def tf32_matmuls():
    """torch's TF32 switches on for the test (either torch API, restored after)."""
    with tf32(True):
        yield


def test_follows_tf32_setting(backend_name, device, gen, tf32_matmuls):
    """With torch's TF32 matmuls on, the kernel takes its TF32 launch config (tl.dot in TF32 on GPUs);
    the bound is then 2x the plain float32 module's own (TF32) error, as for half precision."""
    ref = _reference(384, 6, gen, "rand")
    _check_forward(ref, torch.randn(1, 197, 384, generator=gen), torch.float32, device, fp32_tol=None)


def _tf32_unset():
    """torch's fp32_precision settings unset, so the CUDA matmul one inherits the global one."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"


@pytest.mark.parametrize("style", ["cuda.matmul.fp32_precision", "fp32_precision", "allow_tf32"])
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_dot_precision_follows_either_tf32_api(style, tf32, triton_backend, device, gen):
    """The kernels read torch's TF32 choice through an API that works after either style of
    setting it (reading the legacy allow_tf32 raises once fp32_precision has been set), and an
    fp32 fused op runs under each."""
    from fastconformer.kernels import dot_precision

    backends = torch.backends
    if style != "allow_tf32" and not hasattr(backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision settings")
    _tf32_unset()
    try:
        if style == "allow_tf32":
            backends.cuda.matmul.allow_tf32 = tf32
        elif style == "fp32_precision":
            backends.fp32_precision = "tf32" if tf32 else "ieee"
        else:
            backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        assert dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
        assert dot_precision(torch.float16) == "ieee"
        x = torch.randn(1, 5, 3 * 64, generator=gen).to(device)
        assert attention(x, 2, 0.125).shape == (1, 5, 64)
    finally:  # torch's default, set through the legacy switch last: only then does reading it work again
        _tf32_unset()
        backends.cuda.matmul.allow_tf32 = False
    assert backends.cuda.matmul.allow_tf32 is False


def test_noncontiguous_input(backend_name, device, gen):
    ref = _reference(576, 9, gen, "rand")
    x = torch.randn(50, 3, 576, generator=gen).transpose(0, 1)
    _check_forward(ref, x, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_strided_qkv(backend_name, device, gen, dtype):
    """The op on a qkv whose last dimension is not unit-stride (not the Linear's layout)."""
    qkv = torch.randn(3, 3 * 256, 50, generator=gen).transpose(1, 2)
    expected = attention.torch_impl(to_float64(qkv), 4, 0.21)
    qd = qkv.to(device, dtype)
    out = attention(qd, 4, 0.21)
    baseline = attention.torch_impl(qd, 4, 0.21)
    assert_matches(out, expected, baseline=None if dtype == torch.float32 else baseline)


def _check_gradients(ref, x, dtype, device, gen, fp32_tol=MODULE_TOL, grad_scale=1.0):
    """Gradients of x and of every parameter of FusedAttention vs the float64 reference (the same
    weights, input and output gradient, drawn times grad_scale); half precision against the plain
    module in that dtype. fp32_tol=None: the policy's 1e-5 or 2x the plain float32 module's own
    error, whichever is larger."""
    grad = grad_scale * torch.randn(x.shape, generator=gen)

    def grads(module, dtype):
        xd = x.to(device, dtype).clone().requires_grad_()
        module(xd).backward(grad.to(device, dtype))
        return [xd.grad] + [p.grad for p in module.parameters()]

    expected = grads(copy.deepcopy(ref).to(device, torch.float64), torch.float64)
    ref_dt, fused = _pair(ref, dtype, device)
    baseline = grads(copy.deepcopy(ref_dt), dtype)
    out = grads(fused, dtype)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, o, e, b in zip(names, out, expected, baseline):
        tol = max(MODULE_TOL, 2 * rel_error(b, e) + 1e-6) if fp32_tol is None else fp32_tol
        assert_matches(o, e, baseline=None if dtype == torch.float32 else b, fp32_tol=tol, name=f"grad {name}")


# Gradient cases (odd batches; head_dim 64, 32, 80, 128; N = 197, 50, 1, 17, 257; random scales) with
# their dtypes, small enough for the interpreter, which runs the backward kernels program by program.
GRAD_CASES = [
    ((1, 197, 128, 2, None), torch.float32),
    ((3, 50, 128, 2, None), torch.float16),
    ((3, 1, 192, 6, "rand"), torch.float32),
    ((3, 1, 192, 6, "rand"), torch.float16),
    ((3, 17, 160, 2, "rand"), torch.float32),
    ((3, 17, 160, 2, "rand"), torch.float16),
    ((1, 257, 128, 1, "rand"), torch.float32),
    ((1, 257, 128, 1, "rand"), torch.float16),
    ((2, 120, 128, 2, None), torch.float16),  # the forward's 64-key blocks with a masked tail
]


@pytest.mark.parametrize("case,dtype", GRAD_CASES, ids=[f"{_ids(c)}-{str(d)[6:]}" for c, d in GRAD_CASES])
def test_gradients_match(backend_name, device, gen, case, dtype):
    B, N, dim, heads, qk_scale = case
    ref = _reference(dim, heads, gen, qk_scale)
    _check_gradients(ref, torch.randn(B, N, dim, generator=gen), dtype, device, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_large_logits(backend_name, device, gen, dtype):
    """Backward at logits ~1e3 after scaling (nearly one-hot softmax rows), as test_large_logits; the
    output gradient is scaled down (as a loss scaler would) so the weight gradients, sums over
    tokens of |x| ~ 25 times the qkv gradient, stay finite in fp16."""
    ref = _reference(192, 3, gen)
    x = 25 * torch.randn(1, 197, 192, generator=gen)
    _check_gradients(ref, x, dtype, device, gen, fp32_tol=None, grad_scale=1e-3)


def test_gradients_follow_tf32_setting(backend_name, device, gen, tf32_matmuls):
    """The backward kernels take the TF32 config too; bound: 2x the plain float32 module's own error."""
    ref = _reference(160, 2, gen, "rand")
    _check_gradients(ref, torch.randn(3, 17, 160, generator=gen), torch.float32, device, gen, fp32_tol=None)


def _math_grads(qkv, grad_out, heads, scale):
    """(dq, dk, dv), each (B, heads, N, head_dim), by autograd of softmax(q kᵀ · scale) v in qkv's dtype."""
    qkv = qkv.detach().clone().requires_grad_()
    attention.torch_impl(qkv, heads, scale).backward(grad_out)
    return qkv.grad.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton on CUDA or under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,N,heads,head_dim,scale", [(3, 197, 1, 64, 0.125), (1, 33, 2, 80, 0.31),
                                                      (2, 5, 1, 128, 0.07)])
def test_backward_op_matches_math(device, gen, dtype, B, N, heads, head_dim, scale):
    """fastconformer::attention_backward's dq, dk, dv vs float64 autograd of the attention math, on
    a qkv with padding between tokens (strided rows) and a non-contiguous grad_out."""
    from fastconformer.kernels.attention import attention_backward_op, attention_op

    C = heads * head_dim
    qkv = torch.randn(B, N, 3 * C + 16, generator=gen)[..., :3 * C]
    grad_out = torch.randn(B, C, N, generator=gen).transpose(1, 2)
    expected = _math_grads(to_float64(qkv), to_float64(grad_out), heads, scale)
    qd, gd = qkv.to(device, dtype), grad_out.to(device, dtype)
    out, lse = attention_op(qd, heads, scale)
    grad_qkv = attention_backward_op(gd, qd, out, lse, heads, scale)
    assert grad_qkv.dtype == dtype and grad_qkv.shape == (B, N, 3 * C) and grad_qkv.is_contiguous()
    got = grad_qkv.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
    baseline = _math_grads(qd, gd, heads, scale) if dtype != torch.float32 else (None,) * 3
    for name, g, e, b in zip("qkv", got, expected, baseline):
        assert_matches(g, e, baseline=b, name=f"d{name}")


def _saved_shapes(module, x):
    """Shapes of every tensor autograd saves during module(x)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return shapes


def test_training_saves_no_score_matrix(backend_name, device, gen):
    """A training step keeps no N×N matrix for the backward: the Triton op saves qkv, out and the
    per-row log-sum-exp; the torch path (SDPA's own autograd) a log-sum-exp too."""
    B, N, dim, heads = 3, 37, 128, 2
    fused = FusedAttention.from_reference(_reference(dim, heads, gen)).to(device)
    x = torch.randn(B, N, dim, generator=gen).to(device).requires_grad_()
    shapes = _saved_shapes(fused, x)
    assert not [s for s in shapes if s.count(N) >= 2], shapes
    if backend_name == "triton":
        for needed in [(B, N, 3 * dim), (B, N, dim), (B, heads, N)]:  # qkv, out, lse
            assert needed in shapes, shapes
    assert all(p.grad is not None for p in fused.parameters()) and x.grad is not None


def test_torch_path_gradcheck(gen):
    """Float64 gradcheck of the torch path (F.scaled_dot_product_attention's own autograd) and of the
    module on it, on tiny shapes."""
    with dispatch.backend("torch"):
        qkv = torch.randn(3, 4, 3 * 2 * 4, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: attention(t, 2, 0.37), (qkv,))
        fused = FusedAttention.from_reference(_reference(8, 2, gen, "rand")).double()
        x = torch.randn(1, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(fused, (x,))


def test_attention_dropout_falls_back(backend_name, device, gen):
    """In training with attn_drop > 0 the module runs the reference math: same RNG seed, same
    dropout masks, same output (and eval mode still matches with dropout off)."""
    ref = _reference(384, 6, gen, attn_drop=0.2, proj_drop=0.1).train()
    x = torch.randn(3, 50, 384, generator=gen).to(device)
    ref = ref.to(device)
    fused = FusedAttention.from_reference(ref)
    assert fused.training
    torch.manual_seed(7)
    expected = ref(x)
    torch.manual_seed(7)
    out = fused(x)
    assert_matches(out, expected)
    out.sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
    _check_forward(ref.eval(), x.cpu(), torch.float32, device)


def test_autocast_bf16(device, gen):
    ref = _reference(384, 6, gen)
    x = torch.randn(3, 197, 384, generator=gen)
    expected = copy.deepcopy(ref).double()(x.double())
    fused = FusedAttention.from_reference(ref)
    with dispatch.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = fused(x)
        baseline = ref(x)
    assert out.dtype == baseline.dtype == torch.bfloat16
    assert_matches(out, expected, baseline=baseline)


def _sdpa_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")


def test_cpu_bf16_inference_takes_explicit_scores(gen):
    """bf16 CPU inference computes the (B, heads, N, N) scores (softmax computing in fp32), within the bf16
    policy of the reference under the same autocast, bf16 and plain bf16 weights alike; with a
    gradient to compute, or the oneDNN switch off, it keeps the flash kernel (no score matrix saved)."""
    ref = _reference(384, 6, gen)
    x = torch.randn(3, 197, 384, generator=gen)
    expected = copy.deepcopy(ref).double()(x.double())
    fused = FusedAttention.from_reference(ref)
    with dispatch.backend("torch"), torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            calls = _sdpa_calls(lambda: fused(x))
            out, baseline = fused(x), ref(x)
        assert calls == 0 and out.dtype == torch.bfloat16
        assert_matches(out, expected, baseline=baseline)
        fused16, ref16 = copy.deepcopy(fused).bfloat16(), copy.deepcopy(ref).bfloat16()
        assert_matches(fused16(x.bfloat16()), expected, baseline=ref16(x.bfloat16()), name="bf16 weights")
    qkv = torch.randn(2, 17, 3 * 64, generator=gen).bfloat16()
    with torch.no_grad():
        assert _sdpa_calls(lambda: attention(qkv, 2, 0.125)) == 0
        with dispatch.onednn(False):
            assert _sdpa_calls(lambda: attention(qkv, 2, 0.125)) == 1, "the oneDNN switch turns it off"
    assert _sdpa_calls(lambda: attention(qkv.requires_grad_(), 2, 0.125)) == 1, "autograd keeps the flash kernel"


def test_explicit_bf16_scores_are_capped(gen, monkeypatch):
    qkv = torch.randn(2, 17, 3 * 64, generator=gen).bfloat16()
    monkeypatch.setattr(attention_module, "EXPLICIT_SCORES_MAX", 2 * 2 * 17 * 17 - 1)
    with torch.no_grad():
        assert _sdpa_calls(lambda: attention(qkv, 2, 0.125)) == 1, "beyond the cap: the flash kernel's tiles"


GRAPHS = pytest.mark.skipif(not onednn_graph_available(), reason="this torch has no oneDNN Graph fuser")


@pytest.fixture
def no_attention_graphs(monkeypatch):
    """An empty cache of attention graphs for the test (the module's own cache is put back after)."""
    monkeypatch.setattr(attention_module, "_GRAPHS", {})
    return attention_module._GRAPHS


def _graph_call(qkv, heads, scale):
    """(attention(qkv) on the CPU with the torch backend, whether it ran a oneDNN Graph partition)."""
    with dispatch.backend("torch"):
        out = attention(qkv, heads, scale)
        graph = torch.jit.last_executed_optimized_graph()
    return out, bool(graph.findAllNodes("prim::oneDNNFusionGroup")) and bool(attention_module._GRAPHS)


@GRAPHS
@pytest.mark.parametrize("B,N,heads,head_dim", [(3, 197, 6, 64), (1, 50, 9, 64), (2, 17, 2, 80)])
def test_cpu_float32_inference_runs_a_verified_onednn_graph(no_attention_graphs, gen, B, N, heads, head_dim):
    """float32 CPU inference: one oneDNN Graph partition per shape, within MODULE_TOL of float64; NaN
    and Inf come out where SDPA's do."""
    qkv = torch.randn(B, N, 3 * heads * head_dim, generator=gen)
    scale = head_dim ** -0.5
    expected = attention(qkv.double(), heads, scale)
    with torch.no_grad():
        out, fused = _graph_call(qkv, heads, scale)
        assert fused and list(no_attention_graphs) == [((B, N, 3 * heads * head_dim), heads, scale)]
        assert_matches(out, expected, name="oneDNN Graph attention")
        bad = qkv.clone()
        bad[0, 1, 3] = float("nan")  # a q
        bad[-1, 2, heads * head_dim + 5] = float("inf")  # a k
        bad[-1, 0, 2 * heads * head_dim + 7] = -float("inf")  # a v
        out, fused = _graph_call(bad, heads, scale)
        with dispatch.onednn(False):
            sdpa = attention(bad, heads, scale)
    assert fused and torch.equal(out.isnan(), sdpa.isnan()) and torch.equal(out.isinf(), sdpa.isinf())
    assert out.isnan().any() and rel_error(out.nan_to_num(), sdpa.nan_to_num()) <= MODULE_TOL


@GRAPHS
def test_onednn_graph_only_where_it_serves(no_attention_graphs, gen):
    """Autograd, a strided qkv, another dtype or the oneDNN switch off run SDPA (and stay exact);
    without a gradient to compute, grad mode on still takes the graph."""
    qkv = torch.randn(2, 33, 3 * 128, generator=gen)
    expected = attention(qkv.double(), 2, 0.125)
    leaf = qkv.clone().requires_grad_()
    out, fused = _graph_call(leaf, 2, 0.125)
    assert not fused and out.requires_grad
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.isfinite().all()
    strided = torch.randn(33, 2, 3 * 128, generator=gen).transpose(0, 1)
    strided_expected = attention(strided.double(), 2, 0.125)
    with torch.no_grad():
        assert_matches(_graph_call(strided, 2, 0.125)[0], strided_expected, name="strided qkv")
        with dispatch.onednn(False):
            assert_matches(_graph_call(qkv, 2, 0.125)[0], expected, name="switch off")
        assert not no_attention_graphs
        out, fused = _graph_call(qkv, 2, 0.125)  # grad mode off
    assert fused
    out, fused = _graph_call(qkv, 2, 0.125)  # grad mode on, nothing requires grad
    assert fused and not out.requires_grad
    assert_matches(out, expected, name="grad mode on")


@GRAPHS
def test_unverified_attention_graph_stays_sdpa(no_attention_graphs, gen, monkeypatch):
    """A graph that fused nothing (or does not match) is not served: a warning, then SDPA for that shape."""
    qkv = torch.randn(2, 17, 3 * 64, generator=gen)
    expected = attention(qkv.double(), 2, 0.125)
    monkeypatch.setattr(attention_module, "warm_up", lambda graph, probe: (graph(probe), 0))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"qkv \(2, 17, 192\): 0 partitions.*scaled_dot_product"):
            out = attention(qkv, 2, 0.125)
        assert_matches(out, expected, name="after a refused graph")
        assert _sdpa_calls(lambda: attention(qkv, 2, 0.125)) == 1 and list(no_attention_graphs.values()) == [None]


@GRAPHS
def test_attention_graphs_are_bounded_and_thread_safe(no_attention_graphs, gen, monkeypatch):
    """The first ATTENTION_GRAPHS_MAX signatures get graphs (kept: a trace's memory is never given
    back, so none is evicted and traced again), the others run SDPA; threads tracing at once agree."""
    monkeypatch.setattr(attention_module, "ATTENTION_GRAPHS_MAX", 2)
    inputs = [torch.randn(B, 17, 3 * 64, generator=gen) for B in (1, 2, 3, 4)]
    expected = [attention(qkv.double(), 2, 0.125) for qkv in inputs]

    def run(i):
        with torch.no_grad():
            return attention(inputs[i % 4], 2, 0.125)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, range(16)))
    for i, out in enumerate(outs):
        assert_matches(out, expected[i % 4], name=f"thread call {i}")
    assert len(no_attention_graphs) == 2 and all(graph is not None for graph in no_attention_graphs.values())
    traced = set(no_attention_graphs)
    with torch.no_grad():
        for qkv in inputs:
            assert _sdpa_calls(lambda: attention(qkv, 2, 0.125)) == ((qkv.shape, 2, 0.125) not in traced)
    assert set(no_attention_graphs) == traced


@GRAPHS
def test_attention_graph_token_cap_and_no_warnings(no_attention_graphs, gen, monkeypatch):
    """Beyond GRAPH_TOKENS_MAX tokens SDPA runs; a first call that traces warns nothing (no
    DeprecationWarning or TracerWarning reaches the caller, e.g. under -W error)."""
    qkv = torch.randn(1, 33, 3 * 64, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(qkv, 2, 0.125)  # traces (its float64 check runs SDPA once)
        assert _sdpa_calls(lambda: attention(qkv, 2, 0.125)) == 0 and len(no_attention_graphs) == 1
        monkeypatch.setattr(attention_module, "GRAPH_TOKENS_MAX", 32)
        assert _sdpa_calls(lambda: attention(torch.randn(1, 33, 3 * 64, generator=gen), 2, 0.25)) == 1
    assert len(no_attention_graphs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[5]], ids=_ids)
def test_matches_reference_bf16(backend_name, device, gen, case):
    B, N, dim, heads, qk_scale = case
    ref = _reference(dim, heads, gen, qk_scale)
    _check_forward(ref, torch.randn(B, N, dim, generator=gen), torch.bfloat16, device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], GRAD_CASES[2][0], GRAD_CASES[4][0], GRAD_CASES[6][0]], ids=_ids)
def test_gradients_match_bf16(backend_name, device, gen, case):
    B, N, dim, heads, qk_scale = case
    ref = _reference(dim, heads, gen, qk_scale)
    _check_gradients(ref, torch.randn(B, N, dim, generator=gen), torch.bfloat16, device, gen)


@pytest.mark.gpu
def test_compiled_training_step(triton_backend, device, gen):
    """torch.compile(fullgraph=True) traces the fused forward and its Triton backward (both triton_ops)
    and gives eager's gradients."""
    fused = FusedAttention.from_reference(_reference(384, 6, gen)).to(device)
    x = torch.randn(3, 197, 384, generator=gen).to(device)

    def input_grad(loss_fn):
        xg = x.clone().requires_grad_()
        loss_fn(xg).backward()
        return xg.grad

    expected = input_grad(lambda t: fused(t).square().sum())
    torch.compiler.reset()
    assert_matches(input_grad(torch.compile(lambda t: fused(t).square().sum(), fullgraph=True)), expected)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton on CUDA or under the interpreter")
@pytest.mark.parametrize("N,heads,head_dim", [(197, 2, 64), (17, 3, 80)])
def test_kernel_log_sum_exp(device, gen, N, heads, head_dim):
    """The kernel's saved per-row log-sum-exp is logsumexp(scale * q kᵀ) in fp32, (B, heads, N)."""
    from fastconformer.kernels.attention import attention_op

    qkv = torch.randn(2, N, 3 * heads * head_dim, generator=gen)
    out, lse = attention_op(qkv.to(device), heads, 0.17)
    q, k, _ = to_float64(qkv).unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)
    assert lse.dtype == torch.float32 and lse.shape == (2, heads, N)
    assert_matches(lse, torch.logsumexp(q @ k.transpose(-2, -1) * 0.17, dim=-1), name="lse")
    assert_matches(out, attention.torch_impl(to_float64(qkv), heads, 0.17))


def test_from_reference_shares_parameters(gen):
    ref = _reference(384, 6, gen, "rand", attn_drop=0.1)

    class OfficialAttention(torch.nn.Module):  # the official repository's class: same attributes, other type
        def __init__(self, src):
            super().__init__()
            self.num_heads, self.scale = src.num_heads, src.scale
            self.qkv, self.attn_drop, self.proj, self.proj_drop = src.qkv, src.attn_drop, src.proj, src.proj_drop
            self.train(src.training)

    for source in (ref, OfficialAttention(ref)):
        rng = torch.random.get_rng_state()
        fused = FusedAttention.from_reference(source)
        assert torch.equal(rng, torch.random.get_rng_state()), "from_reference must not draw weights"
        assert fused.scale == ref.scale and fused.num_heads == ref.num_heads and not fused.training
        assert fused.attn_drop.p == 0.1
        for (n, p), (rn, rp) in zip(fused.named_parameters(), ref.named_parameters()):
            assert n == rn and p is rp
    fresh = FusedAttention(384, 6, qkv_bias=True, qk_scale=ref.scale)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fresh.state_dict(), strict=True)
    assert FusedAttention(384, 6, qk_scale=0.0).scale == 64**-0.5 == FusedAttention(384, 6).scale
    with pytest.raises(TypeError, match="lacks"):
        FusedAttention.from_reference(torch.nn.Linear(4, 4))


def test_bad_input(backend_name, device, gen):
    fused = FusedAttention(192, 6).to(device)
    with pytest.raises(ValueError, match="x must be"):
        fused(torch.randn(5, 192, generator=gen).to(device))
    with pytest.raises(ValueError, match="x must be"):
        fused(torch.randn(2, 5, 96, generator=gen).to(device))
    with pytest.raises(ValueError, match="divisible"):
        FusedAttention(100, 3)
    with pytest.raises(ValueError, match="qkv must be 3-D"):
        attention(torch.randn(2, 5, 3, 6, 32, generator=gen).to(device), 6, 0.1)
    with pytest.raises(ValueError, match="multiple of 3\\*num_heads"):
        attention(torch.randn(2, 5, 100, generator=gen).to(device), 6, 0.1)
    if backend_name == "triton":
        with pytest.raises(ValueError, match="head_dim up to"):
            attention(torch.randn(1, 5, 3 * 256, generator=gen).to(device), 1, 0.1)
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            attention(torch.randn(1, 5, 3 * 64, generator=gen, dtype=torch.float64).to(device), 1, 0.1)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton on CUDA or under the interpreter")
@pytest.mark.parametrize("N,streamed", [(197, 32), (1, 32), (50, 64), (120, 64), (1051, 64), (4201, 64)])
def test_launch_configs_follow_the_padding(N, streamed):
    """fp16/bf16 at head_dim 64: 64-row held blocks, 3 stages, 4 warps; the forward's streamed key
    blocks are 64 wide unless that pads N by more than 1/16 over 32-wide ones (N = 197: 256 keys
    against 224); the backward always streams 32."""
    from fastconformer.kernels import attention as kernels

    for config_of, held, key in ((kernels.attention_fwd_config, "BLOCK_M", "BLOCK_N"),
                                 (kernels.attention_bwd_dq_config, "BLOCK_M", "BLOCK_N"),
                                 (kernels.attention_bwd_dkdv_config, "BLOCK_N", "BLOCK_M")):
        config = config_of(N, 64, torch.bfloat16, "ieee")
        expected = streamed if config_of is kernels.attention_fwd_config else 32
        assert (config.constexprs[held], config.constexprs[key], config.num_warps, config.num_stages) == (
            64, expected, 4, 3), config_of.__name__
