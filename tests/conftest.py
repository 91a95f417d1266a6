"""Test configuration: the Triton interpreter on machines without CUDA, markers, shared fixtures.

TRITON_INTERPRET=1 must be set before triton is first imported, so this runs before any test
module (and so before fastconformer.kernels) is imported.
"""

import os
import pickle
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns unless this default is explicit

import pytest  # noqa: E402

from fastconformer import dispatch, timing  # noqa: E402
from fastconformer.testing import tf32  # noqa: E402

# Under pytest-xdist (the suite's default, one worker per CPU) each worker takes its share of the
# CPUs for torch's intra-op threads: by default every worker would take them all.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


# Fixtures that run a test on a chosen backend. On CUDA the triton backend accepts only CUDA
# tensors, so a test that takes one of them (directly or through another fixture) must take
# ``device`` too and build its tensors there.
BACKEND_FIXTURES = ("backend_name", "triton_backend")


def _tests_without_device(items) -> list[str]:
    """Node ids (one per test function, parameters dropped) of the collected tests whose fixture
    closure holds a backend fixture but not ``device``."""
    return list(dict.fromkeys(
        item.nodeid.partition("[")[0] for item in items
        if "device" not in getattr(item, "fixturenames", ())
        and any(name in item.fixturenames for name in BACKEND_FIXTURES)))


def pytest_addoption(parser):
    # compile_matrix.SCOPES (not imported here: triton is a dependency on Linux only)
    parser.addoption("--compile-scope", choices=("sample", "configs", "all"), default="sample",
                     help="what tests/test_compile.py builds for sm_80 and sm_90: sample (default; every kernel in "
                          "every pointer-dtype combination), configs (every launch config) or all (every "
                          "specialisation); see fastconformer/kernels/compile_matrix.py")


def pytest_collection_modifyitems(config, items):
    unplaced = _tests_without_device(items)
    if unplaced:
        raise pytest.UsageError(
            f"{len(unplaced)} test(s) take a backend fixture ({' or '.join(BACKEND_FIXTURES)}) without the "
            "`device` fixture; on CUDA the triton backend needs every tensor on `device`: take it and build the "
            "tensors there:\n  " + "\n  ".join(unplaced))
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """Every test runs with TF32 off for float32 CUDA matmuls (cuBLAS, and the Triton kernels' dots,
    which follow it) and convolutions (cuDNN, TF32 by default on Ampere and later): the float32
    bounds hold for IEEE arithmetic, and an unfused convolution in TF32 alone costs the whole model
    ~1e-3. tests/test_tf32.py turns TF32 on for its own bound. Changes no CPU arithmetic."""
    with tf32(False):
        yield


@pytest.fixture
def device():
    """cuda when present, else cpu (where the triton backend runs under the interpreter)."""
    return DEVICE


# Backends a fused op can be checked on here: torch always; triton on CUDA or under the interpreter.
BACKENDS = ["torch"] + (["triton"] if dispatch.triton_available() and (HAS_CUDA or dispatch.interpreter_enabled())
                        else [])


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    """Runs the test once per available backend, inside ``fastconformer.backend(name)``."""
    with dispatch.backend(request.param):
        yield request.param


@pytest.fixture
def triton_backend():
    """Runs the test inside ``fastconformer.backend("triton")``; skipped where triton cannot run."""
    if "triton" not in BACKENDS:
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1 with triton installed")
    with dispatch.backend("triton"):
        yield "triton"


@pytest.fixture
def gen():
    """A seeded CPU generator: fresh random draws, reproducible failures."""
    return torch.Generator().manual_seed(1234)


class FakeClock:
    """Stands in for fastconformer.timing's CPU clock: each timed call takes the next scripted
    duration (the clock advances while the timer waits for the device after the call)."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = iter(durations)

    def perf_counter(self):
        return self.now

    def synchronize(self, device):
        self.now += next(self.durations)


@pytest.fixture
def fake_clock(monkeypatch):
    """``fake_clock(durations)``: a :class:`FakeClock` that fastconformer.timing reads from now on."""

    def install(durations) -> FakeClock:
        clock = FakeClock(durations)
        monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
        monkeypatch.setattr(timing, "synchronize", clock.synchronize)
        return clock

    return install


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory):
    """``share(name, compute)``: ``compute()``'s value, computed once per test run. Under pytest-xdist
    (one worker per CPU) every worker has its own session and module fixtures, so an expensive one
    (the compile matrix, the ONNX exports) would be built by each: the first worker to ask computes
    and pickles the value into the run's temporary directory, the others wait for it and load it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return lambda name, compute: compute()
    import fcntl  # POSIX; xdist's workers share the run's basetemp's parent

    root = tmp_path_factory.getbasetemp().parent  # one per run: the workers' basetemps are in it

    def share(name, compute):
        path = root / f"{name}.pickle"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                path.write_bytes(pickle.dumps(compute()))
        return pickle.loads(path.read_bytes())

    return share


@pytest.fixture(scope="session")
def all_specs(once_per_run):
    """The compile matrix's specs, every scope (``compile_specs("all")``): derived once per run (~20 s)."""
    from fastconformer.kernels.compile_matrix import compile_specs  # imports triton: a dependency on Linux only

    return once_per_run("compile_specs_all", lambda: compile_specs("all"))
