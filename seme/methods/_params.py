"""Parameter checks and base handling shared by the classic methods.

Values arrive already resolved per tensor (scalar, gradient or filter evaluated by
``seme.config.ParamResolver``); here they are type-checked once per call, which is cheap next to
the tensor math, so a gradient that strays out of range on one layer is caught on that layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from seme.errors import ConfigError

if TYPE_CHECKING:
    import torch

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def as_float(method: str, name: str, value: Any, where: str = "") -> float:
    """A real number; ConfigError for anything else (bools, strings, missing)."""
    loc = f" for {where}" if where else ""
    if value is None:
        raise ConfigError(f"{method}: parameter '{name}' is required{loc}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{method}: parameter '{name}' must be a number{loc}, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{method}: parameter '{name}' must be finite{loc}, got {value!r}")
    return out


def as_bool(method: str, name: str, value: Any) -> bool:
    """A boolean (also ``0/1`` and ``"true"/"false"``, as mergekit's pydantic parsing accepts)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{method}: parameter '{name}' must be true or false, got {value!r}")


def density(method: str, value: Any, where: str) -> float:
    """A density in (0, 1]."""
    d = as_float(method, "density", value, where)
    if not 0.0 < d <= 1.0:
        raise ConfigError(f"{method}: density must be in (0, 1] for {where}, got {d}")
    return d


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are the same memory (the executor passes the base object itself)."""
    if a is b:
        return True
    return (
        a.numel() > 0
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def non_base(method: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> list[int]:
    """Indices of the inputs that are not the base model.

    mergekit 0.1.5 drops the base from the inputs of base-aware methods (``TensorGroup.non_base``,
    merge_methods/base.py:271) even when it is also listed under ``models``; the executor passes a
    listed base as the very same tensor object, which is how it is recognised here.
    """
    if base is None:
        raise ConfigError(f"{method} needs a base_model")
    for i, t in enumerate(tensors):
        if t.shape != base.shape:
            raise ConfigError(
                f"{method}: model {i} has shape {list(t.shape)}, the base has {list(base.shape)}"
            )
    return [i for i, t in enumerate(tensors) if not same_tensor(t, base)]
