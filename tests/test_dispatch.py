"""The backend and oneDNN switches hold per thread and per asyncio task: threads of one server
each keep their own choice at the same time, blocks closed in any order across threads leave the
process default, and a model compiled with ``fullgraph=True`` re-traces for another thread's
choice instead of replaying a stale one."""

import asyncio
import threading

import pytest
import torch

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
