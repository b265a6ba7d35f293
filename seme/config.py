"""Merge config: the mergekit-compatible YAML subset of interfaces.md, and parameter resolution.

Parameter values may be a scalar, a list of numbers (a gradient over layer depth, interpolated
linearly at t = layer / (num_layers - 1)), or a list of ``{filter: substring, value: ...}`` entries
(first entry whose filter occurs in the tensor name wins; an entry without filter matches all).
Precedence follows mergekit: a model's own ``parameters`` beat the global ``parameters``, which
beat the method's defaults.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from seme.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")

log = logging.getLogger(__name__)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One input of an output slice: layers ``[start, end)`` of ``model``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceDef(BaseModel):
    """An output slice: its layers are merged from equally long layer ranges of its sources."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None  # accepted as mergekit does; mergekit 0.1.5 ignores it too
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModuleDef(BaseModel):
    """mergekit's ``modules:`` entry (one per module of the architecture; text LMs have one)."""

    model_config = ConfigDict(extra="forbid")
    slices: list[SliceDef] | None = None
    models: list[ModelEntry] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class TokenEmbedding(BaseModel):
    """``tokenizer.tokens.<token>``: where an (added) token's embedding row comes from."""

    model_config = ConfigDict(extra="forbid")
    source: str | dict[str, Any] | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "seme-merged"


class MergeConfig(BaseModel):
    """The merge config (mergekit 0.1.5's schema plus seme's own keys). Unknown keys are errors.

    Exactly one of ``models`` / ``slices`` / ``modules``. For ``slices`` and ``modules`` configs
    ``models`` stays empty and ``seme.layout`` plans the output layer by layer.
    """

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] | None = None
    modules: dict[str, ModuleDef] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    out_shard_size: StrictInt | StrictFloat | StrictStr | None = None  # not a bool
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    def sha256(self) -> str:
        """Digest of the canonical JSON form (recorded as ``seme.config_sha256``)."""
        raw = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()

    def shard_bytes(self) -> int:
        return parse_size(self.out_shard_size) if self.out_shard_size is not None else 2 * 1024**3

    def output_slices(self) -> list[SliceDef] | None:
        """The output slices of a ``slices:`` or ``modules:`` config (None for ``models:``)."""
        if self.slices:
            return self.slices
        if self.modules:
            mod = next(iter(self.modules.values()))
            return mod.slices
        return None

    def module_parameters(self) -> dict[str, Any]:
        if self.modules:
            return next(iter(self.modules.values())).parameters
        return {}

    def referenced_models(self) -> list[str]:
        """Every model reference, base first, in order of appearance, without repeats."""
        refs: list[str] = [self.base_model] if self.base_model else []
        for m in self.models:
            refs.append(m.model)
        for sl in self.output_slices() or []:
            if sl.base_model:
                refs.append(sl.base_model)
            refs.extend(s.model for s in sl.sources)
        if self.modules:
            for mod in self.modules.values():
                refs.extend(m.model for m in mod.models or [])
        tok = self.tokenizer.source if self.tokenizer else self.tokenizer_source
        if tok and tok not in ("base", "union"):
            refs.append(tok)
        return list(dict.fromkeys(refs))

    def token_source(self) -> str | None:
        """``tokenizer_source`` or ``tokenizer.source``: base | union | a model reference | None."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source


def parse_size(v: float | str) -> int:
    """``"2GB"`` / ``"500M"`` / ``1000`` -> bytes (decimal units for B/KB/MB/GB, binary for KiB...).

    A size must be a finite positive number of bytes; anything else is a ConfigError."""
    bad = ConfigError(f"out_shard_size: cannot parse {v!r} (a positive size such as 2GB, 500MB, 1000000)")
    if isinstance(v, bool):
        raise bad
    if isinstance(v, (int, float)):
        n = float(v)
    else:
        s = str(v).strip().upper().replace(" ", "")
        units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
                 "K": 1000, "M": 1000**2, "G": 1000**3, "B": 1}
        num, mult = s, 1
        for u, m in units.items():
            if s.endswith(u):
                num, mult = s[: -len(u)], m
                break
        try:
            n = float(num) * mult
        except (ValueError, OverflowError):
            raise bad from None
    if not math.isfinite(n) or n < 1 or n > 1 << 62:
        raise ConfigError(f"out_shard_size: {v!r} is not a positive size of at most 2^62 bytes")
    return int(n)


#: limits on a config file: its size, and its YAML node count with every alias expanded (an "alias
#: bomb" of a few hundred bytes otherwise expands to gigabytes in whatever walks it)
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def load_yaml(p: Path, error: type[Exception] = ConfigError) -> Any:
    """Parse a YAML file safely: a regular UTF-8 file of at most MAX_CONFIG_BYTES, not nested deeper
    than Python can walk, and at most MAX_CONFIG_NODES nodes once aliases are expanded."""
    from seme.fsutil import open_regular

    fd = open_regular(p, error)
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise error(f"{p}: larger than {MAX_CONFIG_BYTES >> 10} KiB; not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return None
        _check_expanded_size(node, p, error)
        return yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise error(f"{p}: invalid YAML ({str(e).splitlines()[0][:300]})") from None
    except RecursionError:
        raise error(f"{p}: YAML nested too deeply") from None


def _check_expanded_size(root: yaml.Node, p: Path, error: type[Exception]) -> None:
    """Count the nodes of ``root`` with aliases expanded (memoised, iterative); refuse big or cyclic."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [x for kv in node.value for x in kv]
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            if size[id(node)] > MAX_CONFIG_NODES:
                raise error(f"{p}: YAML expands to more than {MAX_CONFIG_NODES} nodes (aliases?); refused")
            continue
        if id(node) in open_:
            raise error(f"{p}: YAML alias refers to itself; refused")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def _format_validation(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        valid = ", ".join(MergeConfig.model_fields) if len(err["loc"]) == 1 else ""
        where = f"unknown key '{loc}'"
        return f"{source}: {where}" + (f"; valid keys: {valid}" if valid else "")
    if err["type"] == "missing":
        return f"{source}: missing required key '{loc}'"
    return f"{source}: {loc}: {err['msg']}"


def load_config(path_or_dict: str | Path | dict[str, Any]) -> MergeConfig:
    """Parse and validate a merge config (path to YAML, or a dict)."""
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, "config"
    else:
        p = Path(path_or_dict)
        source = str(p)
        if not os.path.lexists(p):
            raise ConfigError(f"{p}: config file not found")
        data = load_yaml(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a YAML mapping")
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None
    _check_structure(cfg, source)
    if cfg.out_shard_size is not None:
        try:
            cfg.shard_bytes()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    for key in ("dtype", "out_dtype"):
        val = getattr(cfg, key)
        if val is not None and val not in COMPUTE_DTYPES:
            raise ConfigError(f"{source}: {key} {val!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    from seme import methods  # the registry validates method names and parameters

    try:
        spec = methods.get(cfg.merge_method)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    posthoc = set() if spec.name == "seme" else set(methods.POSTHOC_PARAMS)  # svc: any per-tensor method
    unused: dict[str, list[str]] = {}
    for where, params in _parameter_blocks(cfg):
        for k in check_parameter_names(spec, params, f"{source}: {where}",
                                       posthoc if where == "parameters" else set()):
            unused.setdefault(k, []).append(where)
    for k, wheres in unused.items():  # one line per parameter, however many models give it
        log.warning("%s: parameter '%s' (%s) is not used by %s; ignored", source, k, ", ".join(wheres), spec.name)
    has_base = cfg.base_model or any(sl.base_model for sl in cfg.output_slices() or [])
    if spec.needs_base and not has_base:
        raise ConfigError(f"{source}: merge_method {spec.name} needs base_model")
    try:
        methods.configured(cfg)  # post-hoc options' own needs (svc: a base model)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _check_structure(cfg: MergeConfig, source: str) -> None:
    """mergekit's structural rules, as one-line errors."""
    given = [k for k in ("models", "slices", "modules") if getattr(cfg, k)]
    if len(given) != 1:
        if not given and cfg.models == [] and "models" in cfg.model_fields_set:
            raise ConfigError(f"{source}: 'models' is empty; list at least one model")
        raise ConfigError(
            f"{source}: give exactly one of 'models', 'slices' or 'modules'"
            + (f" (found {', '.join(given)})" if given else "")
        )
    if cfg.tokenizer is not None and cfg.tokenizer_source is not None:
        raise ConfigError(f"{source}: give either 'tokenizer_source' or a 'tokenizer' block, not both")
    if cfg.modules is not None:
        if len(cfg.modules) != 1:
            raise ConfigError(
                f"{source}: modules: seme merges single-module (text decoder) models; got modules "
                f"{', '.join(cfg.modules)}"
            )
        name, mod = next(iter(cfg.modules.items()))
        if bool(mod.slices) == bool(mod.models):
            raise ConfigError(f"{source}: modules.{name}: give exactly one of 'slices' or 'models'")
        if mod.models:  # a modules/models config is a models config with module-level parameters
            cfg.models = mod.models
    for i, sl in enumerate(cfg.output_slices() or []):
        if sl.residual_weight is not None:
            log.warning("%s: slices[%d].residual_weight is ignored (as mergekit 0.1.5 ignores it)", source, i)
        if not sl.sources:
            raise ConfigError(f"{source}: slices[{i}] has no sources")
        lengths = set()
        for j, src in enumerate(sl.sources):
            lo, hi = src.layer_range
            if lo < 0 or hi < lo:
                raise ConfigError(
                    f"{source}: slices[{i}].sources[{j}] ({src.model}): layer_range [{lo}, {hi}] is not "
                    "a range [start, end) with 0 <= start <= end"
                )
            lengths.add(hi - lo)
        if len(lengths) > 1:
            raise ConfigError(
                f"{source}: slices[{i}]: all sources must span the same number of layers "
                f"(got {sorted(lengths)})"
            )
    if cfg.merge_method == "seme" and cfg.output_slices():
        raise ConfigError(f"{source}: merge_method seme takes 'models:', not slices")


def _parameter_blocks(cfg: MergeConfig) -> list[tuple[str, dict[str, Any]]]:
    """Every ``parameters`` mapping of the config with where it sits."""
    out = [("parameters", cfg.parameters)]
    out += [(f"models[{i}] ({m.model})", m.parameters) for i, m in enumerate(cfg.models)]
    for name, mod in (cfg.modules or {}).items():
        out.append((f"modules.{name}.parameters", mod.parameters))
    for i, sl in enumerate(cfg.output_slices() or []):
        out.append((f"slices[{i}].parameters", sl.parameters))
        out += [(f"slices[{i}].sources[{j}] ({s.model})", s.parameters) for j, s in enumerate(sl.sources)]
    return out


def check_parameter_names(spec: Any, params: dict[str, Any], where: str,
                          extra: set[str] | None = None) -> list[str]:
    """A name no method knows is an error listing the valid names (a typo); returns the names that
    belong to another method (``density`` on ``linear``, common in published configs: a warning).
    ``extra``: names also valid here (the post-hoc ``svc`` options in the global block)."""
    from seme import methods

    valid = set(spec.global_params) | set(spec.model_params) | (extra or set())
    others = []
    for k in params:
        if k in valid:
            continue
        if k in methods.all_parameter_names():
            others.append(k)
            continue
        raise ConfigError(
            f"{where}: unknown parameter '{k}' for merge_method {spec.name}; "
            f"valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    return others


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """Evaluate one parameter value for a tensor at depth ``t`` (0..1)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("empty list given as a parameter value")
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                flt = entry.get("filter")
                if flt is None or flt == "*" or flt in tensor_name:
                    return evaluate(entry.get("value"), tensor_name, t)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            if len(value) == 1:
                return value[0]
            pos = t * (len(value) - 1)
            lo = min(math.floor(pos), len(value) - 2)
            frac = pos - lo
            return (1 - frac) * value[lo] + frac * value[lo + 1]
        if all(isinstance(v, (bool, int, float, str)) for v in value):  # discrete values (mergekit)
            return value[int(t * (len(value) - 1))]
        raise ConfigError(f"parameter list {value!r} mixes scalars and filter entries")
    if isinstance(value, dict) and "value" in value:
        flt = value.get("filter")
        return evaluate(value["value"], tensor_name, t) if flt is None or flt in tensor_name else None
    return value


class ParamResolver:
    """Resolves global and per-model parameters for each tensor of a ``models:`` config: a model's
    own parameters, then the module's (``modules:``), then the global ones, then the defaults."""

    def __init__(self, cfg: MergeConfig, global_defaults: dict[str, Any], model_defaults: dict[str, Any],
                 arch: Any = None):
        self.cfg = cfg
        self.global_defaults = global_defaults
        self.model_defaults = model_defaults
        self.arch = arch
        self.module = cfg.module_parameters()

    def t_of(self, name: str) -> float:
        """Depth of tensor ``name`` for gradients (``Architecture.t_of``)."""
        return self.arch.t_of(name)

    def global_params(self, tensor_name: str, t: float) -> dict[str, Any]:
        out = {}
        for k, default in self.global_defaults.items():
            v = None
            for scope in (self.module, self.cfg.parameters):
                if k in scope:
                    v = evaluate(scope[k], tensor_name, t)
                    if v is not None:
                        break
            out[k] = default if v is None else v
        return out

    def model_params(self, index: int, tensor_name: str, t: float) -> dict[str, Any]:
        own = self.cfg.models[index].parameters
        out = {}
        for k, default in self.model_defaults.items():
            v = None
            for scope in (own, self.module, self.cfg.parameters):
                if k in scope:
                    v = evaluate(scope[k], tensor_name, t)
                    if v is not None:
                        break
            out[k] = default if v is None else v
        return out
