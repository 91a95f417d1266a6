"""Tensors derived from parameters (oneDNN-packed weights: :mod:`fastconformer.modules.onednn`),
kept for inference until one of their sources changes. Opt-in per owner:
:func:`fastconformer.prepack_weights` registers a model's.

A derived tensor is rebuilt on first use after any of its sources changed through PyTorch: its
version counter moved (optimizer steps, ``load_state_dict``, in-place ops under ``no_grad``) or it
got other storage, dtype, shape or strides (``module.to()``, ``.half()`` and back, ``param.data = ...``).
The fused optimizer kernels (``torch.optim.Adam(..., fused=True)`` and the like) write parameters
without moving their version counters: once a stamp has been taken, a global optimizer step pre-hook
and post-hook move the counters of every parameter a ``fused`` param group holds before and after
each step (before: a stamp taken earlier no longer matches in the optimizer's own post-hooks, which
torch runs before the global ones; after: nor does one taken by a pre-hook during the step, once
step() returns). Not covered: a derived tensor built in a pre-hook that runs after the global one
(the optimizer's own pre-hooks) and read again in the optimizer's own post-hooks. The
hooks are process-wide, for every fused optimizer: as after a non-fused step, a backward through a
graph retained from before the step then raises "modified by an inplace operation".
Each entry keeps an alias of the sources it was built from, so no new tensor can be allocated at
a source's old address and pass for it. In-place writes that bypass the version counter (through
``param.data``, e.g. ``param.data.mul_(2)``, a NumPy view or the storage) are not seen: register
again after those.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, TypeVar

import torch
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["DerivedTensors", "stamp", "stamp_matches"]

T = TypeVar("T")


def _key(sources: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype, t.shape, t.stride()) for t in sources)


_FUSED_STEP_HOOKS = []  # the handles of the hooks below, once registered
_FUSED_STEP_HOOKS_LOCK = threading.Lock()


def _count_fused_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook and post-hook: move the version counter of every parameter of
    a ``fused`` param group, which the fused kernels write without moving it."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            increment_version([p for p in group["params"] if isinstance(p, torch.Tensor) and not p.is_inference()])


def stamp(sources: tuple[torch.Tensor, ...]) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """What :func:`stamp_matches` compares later: each source's version, storage address, dtype,
    shape and strides (``param.data = param.data.t()`` keeps the rest), and an alias of each (which
    pins its storage, so that no new tensor can take its address). Not for inference tensors (no
    version counter). The first stamp registers the fused-optimizer hooks (module docstring)."""
    if not _FUSED_STEP_HOOKS:
        with _FUSED_STEP_HOOKS_LOCK:
            if not _FUSED_STEP_HOOKS:
                _FUSED_STEP_HOOKS.extend((register_optimizer_step_pre_hook(_count_fused_step),
                                          register_optimizer_step_post_hook(_count_fused_step)))
    return _key(sources), tuple(t.detach() for t in sources)


def stamp_matches(stamp: tuple[tuple, tuple[torch.Tensor, ...]] | None, sources: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``sources`` are unchanged since ``stamp`` was taken (None: never taken)."""
    return stamp is not None and stamp[0] == _key(sources)


class DerivedTensors:
    """owner (a tensor or module, held weakly) -> values derived from its sources, one per key."""

    def __init__(self, what: str, keys_max: int | None = None):
        self.what = what
        self.keys_max = keys_max  # values kept per owner (the first keys met, until a source changes); None: all
        self._entries = WeakIdKeyDictionary()
        self._lock = threading.Lock()  # threads calling one model: one entry per owner, keys_max per entry

    def register(self, owner: object, sources: tuple[torch.Tensor, ...]) -> None:
        """Keep values derived for ``owner`` from now on (built on first use). ValueError when a
        source was created under ``torch.inference_mode`` (no version counter to tell a change)."""
        if any(t.is_inference() for t in sources):
            raise ValueError(f"prepack_weights: the model's {self.what} were created under torch.inference_mode and "
                             "have no version counter to tell when they change; build the model outside "
                             "inference_mode")
        self._entries[owner] = None

    def unregister(self, owner: object) -> None:
        self._entries.pop(owner, None)

    def registered(self, owner: object) -> bool:
        return owner in self._entries

    def built(self, owner: object) -> int:
        """How many values are kept for ``owner`` now (0 when not registered or none built yet)."""
        entry = self._entries.get(owner)
        return 0 if entry is None else len(entry[1])

    def get(self, owner: object, sources: tuple[torch.Tensor, ...], key: Hashable, build: Callable[[], T]
            ) -> T | None:
        """The value derived for a registered ``owner`` under ``key``, built by ``build()`` when
        missing or when a source changed since the entry was made; None for an owner not registered
        (or one whose sources turned into inference tensors, which have no version counter), and for
        a new key once ``keys_max`` values are kept for the owner."""
        with self._lock:
            entry = self._entries.get(owner, False)
            if entry is False or any(t.is_inference() for t in sources):
                return None
            if entry is None or not stamp_matches(entry[0], sources):
                entry = (stamp(sources), {})
                self._entries[owner] = entry
            values = entry[1]
            if key not in values:
                if self.keys_max is not None and len(values) >= self.keys_max:
                    return None
                values[key] = build()
            return values[key]
