"""Merge-method registry: name -> :class:`MethodSpec` (a pure per-tensor function + its parameters).

Each method family lives in its own module and registers itself on import. The registry imports
them lazily on the first :func:`get` / :func:`names`, so importing ``seme.methods`` stays cheap
(no torch). ``seme.semantic.merger`` registers the ``seme`` method the same way; it is optional here.

Method function contract (docs/internals.md)::

    fn(base: Tensor | None, tensors: list[Tensor], model_params: list[dict], params: dict,
       rng: torch.Generator) -> Tensor
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from seme.errors import ConfigError

__all__ = ["POSTHOC_PARAMS", "REQUIRED", "MethodSpec", "all_parameter_names", "configured", "get", "names",
           "register"]

#: Default value meaning "no default": the method raises ConfigError when the parameter is absent.
REQUIRED = None
#: Options every per-tensor method takes (name -> default): ``svc: true`` calibrates the merged update's
#: singular values afterwards (``seme.methods.spectral.with_svc``).
POSTHOC_PARAMS = {"svc": False, "svc_alpha": 0.1}


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    ``global_params`` / ``model_params`` map parameter name -> default (``None``: required).

    A method whose result needs whole-tensor statistics (e.g. TIES's top-k threshold) but is
    otherwise element-wise may also give ``prepare(base, tensors, model_params, params, rng) ->
    state`` (pass 1: the statistics; None: use ``fn`` on the whole tensor) and
    ``fn_block(state, base_rows, rows, row0) -> Tensor`` (pass 2: the result for the rows
    ``row0 …`` given those rows of the inputs). The executor may then merge large tensors block of
    rows by block of rows; the result must equal ``fn``'s. Both stay pure (no I/O).

    ``out_in``: ``fn`` sees 2-D tensors as (out, in); the executor transposes GPT-2's Conv1D weights
    (stored (in, out)) before the call and the result back (for methods that are not symmetric in
    the two sides, e.g. WUDI's input Gram or SVC's output directions).
    """

    name: str
    fn: Callable[..., Any]
    needs_base: bool
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    prepare: Callable[..., Any] | None = None
    fn_block: Callable[..., Any] | None = None
    out_in: bool = False


_REGISTRY: dict[str, MethodSpec] = {}
_LOCK = threading.RLock()
_BUILTIN_MODULES = (
    "seme.methods.linear",
    "seme.methods.gta",
    "seme.methods.slerp",
    "seme.methods.model_stock",
    "seme.methods.sparse_gta",
    "seme.methods.sce",
    "seme.methods.spherical",
    "seme.methods.arcee_fusion",
    "seme.methods.nearswap",
    "seme.methods.spectral",
    "seme.methods.passthrough",
)
# Registered by other parts of seme; absent modules are tolerated (only the module itself).
_OPTIONAL_MODULES = ("seme.semantic.merger",)
_loaded = {"builtin": False, "optional": False}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry. Re-registering the same function under its name is a no-op."""
    with _LOCK:
        old = _REGISTRY.get(spec.name)
        if old is not None and old.fn is not spec.fn:
            owner = getattr(getattr(old.fn, "func", old.fn), "__module__", "?")  # unwrap partials
            raise ValueError(f"merge method {spec.name!r} is already registered by {owner}")
        _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    with _LOCK:
        if not _loaded["builtin"]:
            for mod in _BUILTIN_MODULES:
                importlib.import_module(mod)
            _loaded["builtin"] = True


def _load_optional() -> None:
    with _LOCK:
        if _loaded["optional"]:
            return
        for mod in _OPTIONAL_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # a dependency of an existing module is missing: a real error
                    raise
        _loaded["optional"] = True


def names() -> list[str]:
    """All registered method names, sorted."""
    _load_builtin()
    _load_optional()
    return sorted(_REGISTRY)


#: Parameter names of mergekit 0.1.5's methods (``MergeMethodSpec`` shared and input parameters):
#: a config naming one that the chosen method does not use gets a warning, not an error.
MERGEKIT_PARAMETERS = frozenset({
    "alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask", "lambda", "max_iter",
    "normalize", "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r", "rescale", "scale",
    "select_topk", "t", "tol", "weight",
})


def all_parameter_names() -> frozenset[str]:
    """Every parameter name some method knows (registered here, or mergekit's)."""
    names()
    with _LOCK:
        known = {k for s in _REGISTRY.values() for k in (*s.global_params, *s.model_params)}
    return frozenset(known | MERGEKIT_PARAMETERS)


def get(name: str) -> MethodSpec:
    """The spec registered as ``name``; ConfigError listing the valid names otherwise."""
    _load_builtin()
    spec = _REGISTRY.get(name)
    if spec is None:
        _load_optional()
        spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown merge_method {name!r}; valid: {', '.join(names())}")
    return spec


def configured(cfg: Any) -> MethodSpec:
    """The spec a merge config runs: ``cfg.merge_method``, followed by SVC when its ``svc`` parameter
    is anything but a plain false (a filter list turns it on per tensor)."""
    spec = get(cfg.merge_method)
    svc = cfg.parameters.get("svc", False)
    if isinstance(svc, (bool, int, str)):
        from seme.methods._params import as_bool

        if not as_bool(spec.name, "svc", svc):
            return spec
    if spec.name == "seme":
        raise ConfigError("svc is not available with merge_method seme")
    if not cfg.base_model:
        raise ConfigError(f"svc needs base_model (it calibrates the update of {spec.name} from the base)")
    from seme.methods.spectral import with_svc

    return with_svc(spec)
