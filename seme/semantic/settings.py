"""SeMe's parameters: the global settings every part of the method reads, validated once.

Defaults and meanings are in docs/seme-method.md (Parameters). λ (``weight``) is the only per-model
parameter; ``scale`` may vary by layer like any parameter and is resolved per module by the merger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seme.errors import ConfigError

#: SeMe's global parameters and defaults (seme-method.md; docs/seme-method.md explains each).
GLOBAL_PARAMS: dict[str, Any] = {
    "select_ratio": 0.1,
    "select_floor": 1e-6,
    "compute": "default",
    "erase": "ties",
    "density": 0.5,
    "scale": 1.0,
    "tokens": 8192,
    "ridge": 1e-6,
    "rotation_tol": 1e-3,
    "perm_identity": 0.99,
    "block_size": 512,
}
MODEL_PARAMS: dict[str, Any] = {"weight": 1.0}
COMPUTE_MODES = ("default", "overlap", "cap")
ERASE_MODES = ("ties", "none")


@dataclass(frozen=True)
class Settings:
    """SeMe's global settings, validated."""

    select_ratio: float = 0.1
    select_floor: float = 1e-6
    compute: str = "default"
    erase: str = "ties"
    density: float = 0.5
    scale: float = 1.0
    tokens: int = 8192
    ridge: float = 1e-6
    rotation_tol: float = 1e-3
    perm_identity: float = 0.99
    block_size: int = 512

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """Read the scalar SeMe parameters of a MergeConfig (unknown keys were rejected by load_config)."""
        raw = dict(GLOBAL_PARAMS)
        for i, m in enumerate(cfg.models):
            extra = sorted(set(m.parameters) - set(MODEL_PARAMS))
            if extra:
                raise ConfigError(
                    f"models[{i}] ({m.model}): SeMe parameter {extra[0]} is global; set it under `parameters`"
                )
        for k, v in (cfg.parameters or {}).items():
            if k in raw:
                if isinstance(v, (list, dict)) and k not in ("scale",):
                    raise ConfigError(f"SeMe parameter {k} must be a scalar, got {v!r}")
                raw[k] = v
        if isinstance(raw["scale"], (list, dict)):
            raw["scale"] = GLOBAL_PARAMS["scale"]  # per-module values are resolved by the merger
        try:
            s = cls(
                select_ratio=float(raw["select_ratio"]),
                select_floor=float(raw["select_floor"]),
                compute=str(raw["compute"]),
                erase=str(raw["erase"]),
                density=float(raw["density"]),
                scale=float(raw["scale"]),
                tokens=int(raw["tokens"]),
                ridge=float(raw["ridge"]),
                rotation_tol=float(raw["rotation_tol"]),
                perm_identity=float(raw["perm_identity"]),
                block_size=int(raw["block_size"]),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"SeMe parameters: {e}") from None
        if s.compute not in COMPUTE_MODES:
            raise ConfigError(f"SeMe parameter compute={s.compute!r}; valid: {', '.join(COMPUTE_MODES)}")
        if s.erase not in ERASE_MODES:
            raise ConfigError(f"SeMe parameter erase={s.erase!r}; valid: {', '.join(ERASE_MODES)}")
        if not 0.0 < s.density <= 1.0:
            raise ConfigError(f"SeMe parameter density={s.density} must be in (0, 1]")
        if s.select_ratio < 0 or s.select_floor < 0:
            raise ConfigError("SeMe parameters select_ratio and select_floor must be >= 0")
        if s.tokens < 1 or s.block_size < 1:
            raise ConfigError("SeMe parameters tokens and block_size must be >= 1")
        return s


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return device
