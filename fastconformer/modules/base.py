"""What the six drop-in fused modules share: one way to build them, one error for what they cannot fuse."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["FusedModule", "NotFusableError"]


class NotFusableError(TypeError, ValueError):
    """A module the fused path cannot compute exactly (a missing or different submodule, an
    activation or configuration the kernels do not implement). It is a TypeError and a ValueError,
    so code that caught either from earlier versions still catches it."""


class FusedModule(nn.Module):
    """Base of the drop-in fused modules. Each is built one of two ways:

    - ``Fused(*args, **kwargs)`` takes the constructor arguments of its reference class
      (:attr:`reference`), builds that module (the same construction order, so a seed draws the
      same weights) and adopts it;
    - ``Fused.from_reference(module)`` adopts an existing module, ours or the official repository's
      (matched by attributes, not class): the fused module holds the same submodules, Parameters
      and buffers (no copies) and the same training mode; ``module`` itself is not changed. A
      module that already is a ``Fused`` is returned as it is.

    Subclasses set :attr:`reference` and implement :meth:`_adopt`, which raises NotFusableError
    naming what is wrong and registers the module's submodules in the reference's order (so
    state_dict keys come in the same order).
    """

    reference: type[nn.Module]

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._adopt(self.reference(*args, **kwargs))

    @classmethod
    def from_reference(cls, module: nn.Module):
        if isinstance(module, cls):
            return module
        if not isinstance(module, nn.Module):
            raise NotFusableError(f"{cls.__name__}.from_reference takes an nn.Module, got {type(module).__name__}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(module)
        return fused.train(module.training)

    def _adopt(self, module: nn.Module) -> None:
        raise NotImplementedError

    def _require(self, module: nn.Module, names: tuple[str, ...]) -> None:
        """NotFusableError unless ``module`` has every attribute in ``names``."""
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise NotFusableError(f"{type(self).__name__}.from_reference expects a {self.reference.__name__} "
                                  f"(attributes {', '.join(names)}); {type(module).__name__} lacks "
                                  f"{', '.join(missing)}")
