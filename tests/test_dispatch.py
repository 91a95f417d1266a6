"""The backend and oneDNN switches hold per thread and per asyncio task: threads of one server
each keep their own choice at the same time, blocks closed in any order across threads leave the
process default, and a model compiled with ``fullgraph=True`` re-traces for another thread's
choice instead of replaying a stale one."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import fastconformer
from fastconformer import dispatch

CHOICES = ("torch", "triton", "auto", "torch")


def _in_threads(target, n):
    errors = []

    def run(i):
        try:
            target(i)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


def test_threads_hold_their_own_backend_at_once():
    default = dispatch.current_backend()
    inside, after = {}, {}
    all_inside = threading.Barrier(len(CHOICES))
    # closing order: thread i leaves its block after threads i+1.. have left theirs (reverse of
    # entry), so an implementation that restores a shared "previous" value ends on a wrong one
    leave = [threading.Event() for _ in CHOICES]

    def hold(i):
        with dispatch.backend(CHOICES[i]), dispatch.onednn(i % 2 == 0):
            all_inside.wait(timeout=30)
            inside[i] = (dispatch.current_backend(), dispatch._onednn_enabled())
            if i + 1 < len(CHOICES):
                assert leave[i + 1].wait(timeout=30)
        after[i] = dispatch.current_backend()
        leave[i].set()

    _in_threads(hold, len(CHOICES))
    assert inside == {i: (c, i % 2 == 0) for i, c in enumerate(CHOICES)}
    assert after == {i: default for i in range(len(CHOICES))}
    assert dispatch.current_backend() == default


def test_new_threads_start_on_the_process_default():
    seen = []
    with dispatch.backend("triton"):
        _in_threads(lambda i: seen.append(dispatch.current_backend()), 1)
        assert dispatch.current_backend() == "triton"
    assert seen == [dispatch._DEFAULT_BACKEND]


def test_asyncio_tasks_hold_their_own_backend():
    async def task(name):
        if name is None:
            await asyncio.sleep(0.01)  # runs while the other tasks sit inside their blocks
            return dispatch.current_backend()
        with dispatch.backend(name):
            await asyncio.sleep(0.02)
            return dispatch.current_backend()

    async def main():
        return await asyncio.gather(task("torch"), task(None), task("triton"))

    assert asyncio.run(main()) == ["torch", dispatch._DEFAULT_BACKEND, "triton"]


def test_nested_blocks_restore_in_order_and_reject_unknown_names():
    default = dispatch.current_backend()
    with dispatch.backend("torch"):
        with dispatch.backend("triton"):
            assert dispatch.current_backend() == "triton"
        assert dispatch.current_backend() == "torch"
    assert dispatch.current_backend() == default
    with pytest.raises(ValueError, match="backend name must be one of"):
        dispatch.backend("cuda")


def test_compiled_function_follows_each_threads_backend():
    """fullgraph tracing reads the switch (no graph break) and guards on it: a thread holding
    another backend gets its own trace, never the first thread's."""
    torch._dynamo.reset()
    code = {"auto": 1.0, "torch": 2.0, "triton": 3.0}

    @torch.compile(fullgraph=True, backend="eager")
    def scaled(x):
        return x * code[dispatch.current_backend()]

    x = torch.ones(2)
    results = {}

    def call(i):
        with dispatch.backend(CHOICES[i]):
            results[i] = scaled(x)[0].item()

    for i in range(len(CHOICES)):  # one after another: each thread meets the traces of the others
        _in_threads(lambda _, i=i: call(i), 1)
    assert results == {i: code[c] for i, c in enumerate(CHOICES)}
    assert scaled(x)[0].item() == code[dispatch.current_backend()]
    torch._dynamo.reset()


def _fresh_process(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` run by a new Python without TRITON_INTERPRET, with ``env`` added to the environment."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True)


@pytest.mark.parametrize("variable, value, expected", [
    ("FASTCONFORMER_BACKEND", "trition", "FASTCONFORMER_BACKEND must be one of auto, triton, torch (or unset: auto), "
                                         "got 'trition'"),
    ("FASTCONFORMER_ONEDNN", "off", "FASTCONFORMER_ONEDNN must be 0 or 1 (or unset: 1), got 'off'"),
])
def test_a_wrong_environment_value_raises_where_it_is_used(variable, value, expected):
    """fastconformer imports, convert() (before any fused op runs) raises ValueError naming the
    variable, and the command line ends with that one error line."""
    proc = _fresh_process(textwrap.dedent("""
        import sys, torch, fastconformer
        from fastconformer.cli import main
        model = fastconformer.create_model("conformer_tiny_patch16", depth=3).eval()
        try:
            fastconformer.convert(model)
        except ValueError as err:
            print("raised:", err)
        sys.exit(main(["info"]))
    """), **{variable: value})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == f"raised: {expected}\n" and proc.stderr == f"error: {expected}\n"


def test_a_wrong_environment_value_raises_before_torch_compile_traces(monkeypatch):
    """convert() checks the environment, so a compiled model never reaches the check inside a trace
    (where dynamo would wrap the ValueError in its own multi-line error)."""
    monkeypatch.setattr(dispatch, "_ENVIRONMENT_ERROR", "FASTCONFORMER_BACKEND must be one of ..., got 'x'")
    with pytest.raises(ValueError, match="FASTCONFORMER_BACKEND must be one of"):
        fastconformer.create_model("conformer_tiny_patch16", depth=3, fast=True)


def test_an_empty_environment_value_is_as_unset(monkeypatch):
    monkeypatch.setenv("FASTCONFORMER_BACKEND", "")
    monkeypatch.setenv("FASTCONFORMER_ONEDNN", "")
    assert dispatch._environment_defaults() == ("auto", True, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton backend runs here")
@pytest.mark.parametrize("argv", [["bench", "--device", "cpu"], ["predict", "x.png", "--pretrained", "x.pth"]])
def test_the_triton_backend_without_a_gpu_is_one_error_line_before_anything_runs(argv):
    proc = _fresh_process(f"import sys; from fastconformer.cli import main; sys.exit(main({argv!r}))",
                          FASTCONFORMER_BACKEND="triton")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: backend('triton') ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    if argv[0] == "predict":  # the reference model never dispatches: it gets as far as the missing checkpoint
        reference = argv + ["--reference"]
        proc = _fresh_process(f"import sys; from fastconformer.cli import main; sys.exit(main({reference!r}))",
                              FASTCONFORMER_BACKEND="triton")
        assert proc.returncode == 2 and "no checkpoint file 'x.pth'" in proc.stderr, proc.stderr
