"""The equality policy's numbers and its measure (the leaf :mod:`fastconformer.testing` builds on,
importable from the fused modules): float32 within :data:`MODULE_TOL` per module and
:data:`MODEL_TOL` for the whole model, float16/bfloat16 within :data:`HALF_FACTOR` times the plain
module's own error + :data:`HALF_SLACK`, all by :func:`rel_error` against float64."""

from __future__ import annotations

import math

import torch

__all__ = ["HALF_FACTOR", "HALF_SLACK", "MODEL_TOL", "MODULE_TOL", "rel_error"]

MODULE_TOL = 1e-5
MODEL_TOL = 1e-4
HALF_FACTOR = 2.0
HALF_SLACK = 1e-6


def _flat(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).to(torch.float64)
    if isinstance(x, (list, tuple)):
        return torch.cat([_flat(t) for t in x])
    raise TypeError(f"expected a tensor or a list/tuple of tensors, got {type(x).__name__}")


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 over all elements (tensors or lists of tensors);
    inf when out holds NaN or Inf or the shapes differ."""
    o, r = _flat(out).cpu(), _flat(ref).cpu()
    if o.shape != r.shape or not torch.isfinite(o).all():
        return math.inf
    ref_norm = r.norm().item()
    diff = (o - r).norm().item()
    if ref_norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref_norm
