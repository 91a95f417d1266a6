"""The conftest's collection guard: a test on a backend fixture without ``device`` (whose tensors
would stay on the CPU, which the triton backend refuses on CUDA) stops the run at collection."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()


@pytest.fixture
def suite(pytester):
    """A scratch test directory with this suite's conftest."""
    pytester.makeconftest(CONFTEST)
    return pytester


@pytest.mark.parametrize("fixture", ["backend_name", "triton_backend", "on_backend"])
def test_backend_test_without_device_is_refused(suite, fixture):
    """Taking a backend fixture directly, or through another fixture, without ``device``."""
    suite.makepyfile(f"""
        import pytest
        import torch

        @pytest.fixture
        def on_backend(backend_name):
            return backend_name

        def test_placed(backend_name, device):
            assert torch.ones(2, device=device).sum() == 2

        def test_unplaced({fixture}):
            assert torch.ones(2).sum() == 2
    """)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: 1 test(s) take a backend fixture * without the `device` fixture*",
                                 "  test_backend_test_without_device_is_refused.py::test_unplaced"])
    result.stdout.no_fnmatch_line("*passed*")


def test_backend_tests_with_device_run(suite):
    suite.makepyfile("""
        import pytest
        import torch

        @pytest.fixture
        def on_backend(backend_name):
            return backend_name

        @pytest.mark.parametrize("n", [1, 2])
        def test_placed(on_backend, device, n):
            assert torch.ones(n, device=device).sum() == n

        def test_without_backend():
            assert torch.ones(2).sum() == 2
    """)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.OK
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 3 and "error" not in outcomes and "failed" not in outcomes
