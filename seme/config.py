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
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    out_shard_size: int | str | None = None
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    def sha256(self) -> str:
        """Digest of the canonical JSON form (recorded as ``seme.config_sha256``)."""
        raw = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()

    def shard_bytes(self) -> int:
        return parse_size(self.out_shard_size) if self.out_shard_size is not None else 2 * 1024**3


def parse_size(v: int | str) -> int:
    """``"2GB"`` / ``"500M"`` / ``1000`` -> bytes (decimal units for B/KB/MB/GB, binary for KiB...)."""
    if isinstance(v, int):
        return v
    s = str(v).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
             "K": 1000, "M": 1000**2, "G": 1000**3, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ConfigError(f"out_shard_size: cannot parse {v!r} (e.g. 2GB, 500MB, 1000000)") from None


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
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a YAML mapping")
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None
    if not cfg.models:
        raise ConfigError(f"{source}: 'models' is empty; list at least one model")
    for key in ("dtype", "out_dtype"):
        val = getattr(cfg, key)
        if val is not None and val not in COMPUTE_DTYPES:
            raise ConfigError(f"{source}: {key} {val!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    from seme import methods  # the registry validates method names and parameters

    spec = methods.get(cfg.merge_method)
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
