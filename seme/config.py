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
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from seme.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "seme-merged"


class MergeConfig(BaseModel):
    """The merge config. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    out_shard_size: StrictInt | StrictFloat | StrictStr | None = None  # not a bool
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    def sha256(self) -> str:
        """Digest of the canonical JSON form (recorded as ``seme.config_sha256``)."""
        raw = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()

    def shard_bytes(self) -> int:
        return parse_size(self.out_shard_size) if self.out_shard_size is not None else 2 * 1024**3


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
    if not cfg.models:
        raise ConfigError(f"{source}: 'models' is empty; list at least one model")
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
    valid = set(spec.global_params) | set(spec.model_params)
    posthoc = set() if spec.name == "seme" else set(methods.POSTHOC_PARAMS)  # svc: any per-tensor method
    for k in cfg.parameters:
        if k not in valid | posthoc:
            raise ConfigError(
                f"{source}: unknown parameter '{k}' for merge_method {spec.name}; "
                f"valid: {', '.join(sorted(valid | posthoc)) or '(none)'}"
            )
    for i, m in enumerate(cfg.models):
        for k in m.parameters:
            if k not in valid:
                raise ConfigError(
                    f"{source}: models[{i}] ({m.model}): unknown parameter '{k}' for {spec.name}; "
                    f"valid: {', '.join(sorted(valid)) or '(none)'}"
                )
    if spec.needs_base and not cfg.base_model:
        raise ConfigError(f"{source}: merge_method {spec.name} needs base_model")
    try:
        methods.configured(cfg)  # post-hoc options' own needs (svc: a base model)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def evaluate(value: Any, tensor_name: str, t: float) -> Any:
    """Evaluate one parameter value for a tensor at depth ``t`` (0..1)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("empty list given as a parameter value")
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                flt = entry.get("filter")
                if flt is None or flt in tensor_name:
                    return evaluate(entry.get("value"), tensor_name, t)
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            if len(value) == 1:
                return value[0]
            pos = t * (len(value) - 1)
            lo = min(math.floor(pos), len(value) - 2)
            frac = pos - lo
            return (1 - frac) * value[lo] + frac * value[lo + 1]
        raise ConfigError(f"parameter list {value!r} mixes numbers and filter entries")
    if isinstance(value, dict) and "value" in value:
        flt = value.get("filter")
        return evaluate(value["value"], tensor_name, t) if flt is None or flt in tensor_name else None
    return value


class ParamResolver:
    """Resolves global and per-model parameters for each tensor."""

    def __init__(self, cfg: MergeConfig, global_defaults: dict[str, Any], model_defaults: dict[str, Any]):
        self.cfg = cfg
        self.global_defaults = global_defaults
        self.model_defaults = model_defaults

    def global_params(self, tensor_name: str, t: float) -> dict[str, Any]:
        out = {}
        for k, default in self.global_defaults.items():
            v = evaluate(self.cfg.parameters[k], tensor_name, t) if k in self.cfg.parameters else None
            out[k] = default if v is None else v
        return out

    def model_params(self, index: int, tensor_name: str, t: float) -> dict[str, Any]:
        own = self.cfg.models[index].parameters
        out = {}
        for k, default in self.model_defaults.items():
            v = None
            if k in own:
                v = evaluate(own[k], tensor_name, t)
            if v is None and k in self.cfg.parameters:
                v = evaluate(self.cfg.parameters[k], tensor_name, t)
            out[k] = default if v is None else v
        return out
