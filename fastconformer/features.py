"""Which blocks' outputs a backbone returns, and what they are (timm's conventions, our own code).

A Conformer has ``depth`` blocks (12 in every published variant), counted from 0: block 0 is the
first stage (``conv_1`` with ``trans_1``), block i >= 1 is ``conv_trans_{i + 1}``. After each block
the model holds a CNN map (B, C, H / r, W / r) and the transformer tokens (B, 1 + N, D).

- :func:`take_indices` validates the ``indices`` of ``forward_intermediates`` and the
  ``out_indices`` of a ``features_only`` model.
- :class:`FeatureInfo` describes the CNN maps a backbone returns: channels, reduction (stride from
  the input) and the module that produces each, as timm's ``FeatureInfo`` does.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

__all__ = ["FeatureInfo", "take_indices"]


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """(sorted block indices, the largest) for timm's ``indices`` argument.

    indices: None (every block), an int n (the last n blocks) or a sequence of block indices
    (negative ones count from the end, as in Python). Raises TypeError for another type (bool
    included) and ValueError for an index out of range, an index given twice (also as its negative
    twin) or an empty sequence.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(indices, str):
        raise TypeError(f"indices must be None, an int (the last n blocks) or a sequence of block indices, "
                        f"got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; the model has {num_blocks} "
                             f"(use 1..{num_blocks}, or a list of block indices)")
        taken = list(range(num_blocks - indices, num_blocks))
        return taken, taken[-1]
    taken = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"block indices must be ints, got {index!r} in {list(indices)!r}")
        if not -num_blocks <= index < num_blocks:
            raise ValueError(f"block index {index} is out of range: the model has {num_blocks} blocks, "
                             f"indices 0..{num_blocks - 1} (or -{num_blocks}..-1)")
        taken.append(index % num_blocks)
    if not taken:
        raise ValueError("indices is empty; give at least one block index")
    if len(set(taken)) != len(taken):
        raise ValueError(f"indices {list(indices)!r} name a block more than once (block indices {taken})")
    taken.sort()
    return taken, taken[-1]


class FeatureInfo:
    """The CNN maps a backbone returns, in order: for each, its channels (``num_chs``), reduction
    (the input's H / the map's H) and producing ``module``, as dicts like timm's ``FeatureInfo``.

    ``channels()``, ``reduction()`` and ``module_name()`` return a list over all maps, or one value
    for an int ``idx`` (a position in this list), or a list for a sequence of positions.
    ``out_indices`` holds the block index of each map.
    """

    def __init__(self, infos: Sequence[dict[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(infos[i]) for i in out_indices]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [info[key] for info in self.info]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def get_dicts(self) -> list[dict[str, Any]]:
        return [dict(info) for info in self.info]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info})"
