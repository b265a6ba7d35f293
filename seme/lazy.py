"""``torch``, imported on first use.

``import torch`` costs about 1.5 s of CPU, more than a whole 135M-parameter merge on the fused CPU
kernels, which need only numpy and numba. Modules on that path (the executor, the checkpoint reader,
the classic methods) write ``from seme.lazy import torch``: the name behaves like the module, and the
real import happens at the first attribute access (``torch.float32``, ``torch.Tensor`` …). Type
annotations stay free under ``from __future__ import annotations``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__") and self.__name__ not in sys.modules:
            raise AttributeError(attr)  # introspection (copy, pickle, doctest) must not import torch
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)  # found directly next time
        return value


def imported(name: str = "torch") -> bool:
    """Whether the real module has been imported (by anyone) in this process."""
    return name in sys.modules


torch: Any = _LazyModule("torch")
