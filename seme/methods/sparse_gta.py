"""Task arithmetic with two more sparsifiers: Model Breadcrumbs and DELLA.

Same recipe as :mod:`seme.methods.gta` (task vectors, sparsify, weight, optional TIES sign
election, sum, normalize, λ, add the base), with mergekit 0.1.5's other two sparsifications
(sparsify.py ``magnitude_outliers`` and ``della_magprune``):

- **breadcrumbs** / **breadcrumbs_ties** (arXiv:2312.06795): drop the ``gamma`` fraction of largest
  magnitudes (outliers) and the smallest ones, keeping ``int(density·n)`` entries: the entries of
  ranks [n_bot, n_bot + int(density·n)) in ascending order of |δ|, n_bot = max(0, n − int(density·n)
  − int(gamma·n)). Deterministic; equal magnitudes rank by index (mergekit's unstable sort leaves
  their order arbitrary, which shows only in bf16). Defaults: normalize false, rescale false.
- **della** / **della_linear** (arXiv:2406.11617, MagPrune): keep each entry with a probability
  that grows with its magnitude rank within its row, p = density − ε + 2ε·(rank − 1)/(n − 1)
  (1-D tensors: one row; the mean over a row is ``density``), then rescale. Defaults: normalize
  true for della, false for della_linear; rescale true.

``rescale: true`` restores each task vector's L1 norm, as mergekit does for every method (the
DELLA paper divides by p instead; ``rescale: exact`` does that: ÷ p per entry for DELLA, ÷ density
for breadcrumbs). DELLA's draws use DARE's counter-based hash of (per-tensor key, flat index)
compared with p·2³², so they are reproducible from the seed, on any device, row block by row block;
they are not mergekit's draws (which come from torch's global generator), so agreement with
mergekit is statistical (tests/test_mergekit_methods2.py).
"""

from __future__ import annotations

from functools import partial

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, gta, register
from seme.methods._params import as_float, non_base

_ROWS_ELEMS = 1 << 20  # DELLA ranks, probabilities and draws are made this many entries at a time


def _smallest(key: torch.Tensor, m: int) -> torch.Tensor:
    """Mask of the ``m`` smallest entries of the flat ``key`` (equal keys: lowest index first)."""
    n = key.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=key.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=key.device)
    thr = torch.kthvalue(key, m).values
    keep = key < thr
    need = m - int(keep.sum())
    if need:
        keep[torch.nonzero(key == thr).squeeze(1)[:need]] = True
    return keep


def band_mask(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of the entries of ``x`` whose rank in ascending order of |x| lies in [lo, hi).

    Two linear-time selections instead of a sort. Ranks compare |x| in float32 (float64 for
    float64), as mergekit sorts; equal magnitudes rank by flat index.
    """
    key = x.reshape(-1).abs()
    if key.dtype != torch.float64:
        key = key.float()
    return (_smallest(key, hi) & ~_smallest(key, lo)).view(x.shape)


def breadcrumbs_(delta: torch.Tensor, dens: float, gamma: float, rescale: str | None) -> torch.Tensor:
    """Breadcrumbs trim, in place: drop the ``gamma`` fraction of outliers and the smallest entries,
    keeping ``int(density·n)`` (module docstring)."""
    if dens >= 1.0 or delta.numel() == 0:
        return delta
    n = delta.numel()
    target = int(dens * n)
    n_bot = max(0, n - target - int(gamma * n))
    before = gta._l1(delta) if rescale == "l1" else None
    delta.masked_fill_(band_mask(delta, n_bot, n_bot + target).logical_not_(), 0)
    if rescale == "l1":
        gta._rescale_l1_(delta, before)
    elif rescale == "exact":
        delta.div_(dens)
    return delta


def della_probs(rows: torch.Tensor, dens: float, eps: float) -> torch.Tensor:
    """DELLA's keep probabilities for ``rows`` (2-D or more; ranked along dim 1), in the dtype
    mergekit works in (bfloat16 for bfloat16, else float32/float64).

    p = (density − ε) + rank_norm·2ε, rank_norm = (rank − min rank)/(max rank − min rank) with
    ranks 1…n by ascending |δ| (equal magnitudes by index); a single column gets p = density.
    """
    work = rows.dtype if rows.dtype in (torch.bfloat16, torch.float64) else torch.float32
    ncols = rows.shape[1]
    if ncols <= 1:
        return torch.full(rows.shape, dens, dtype=work, device=rows.device)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    shape = [1] * rows.dim()
    shape[1] = ncols
    ranks.scatter_(1, order, torch.arange(1, ncols + 1, device=rows.device).view(shape).expand_as(order))
    del order
    ranks = ranks.to(work)
    lo, hi = ranks.amin(dim=1, keepdim=True), ranks.amax(dim=1, keepdim=True)
    rank_norm = ((ranks - lo) / (hi - lo)).clamp_(0, 1)
    return (dens - eps) + rank_norm * 2 * eps


def della_(delta: torch.Tensor, dens: float, eps: float, rescale: str | None, key: tuple[int, int]) -> torch.Tensor:
    """DELLA MagPrune, in place: keep entry i with probability p_i (:func:`della_probs`), the draw
    being ``gta.entry_hash(key, i) < p_i·2³²``; then rescale (module docstring)."""
    if dens >= 1.0 or delta.numel() == 0:
        return delta
    before = gta._l1(delta) if rescale == "l1" else None
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    if rows.dim() == 2:  # rows are ranked independently: a block of rows at a time
        step = max(1, _ROWS_ELEMS // max(1, rows.shape[1]))
        spans = [(r, min(rows.shape[0], r + step)) for r in range(0, rows.shape[0], step)]
    else:
        spans = [(0, rows.shape[0])]
    per_row = rows[0].numel()
    for r0, r1 in spans:
        part = rows[r0:r1]
        p = della_probs(part, dens, eps)
        h = gta.entry_hash(key, r0 * per_row, r1 * per_row, delta.device).view(p.shape)
        keep = h < p.double().mul_(2.0**32)
        del h
        part.masked_fill_(keep.logical_not_(), 0)
        if rescale == "exact":
            part.div_(p)
    if rescale == "l1":
        gta._rescale_l1_(delta, before)
    return delta


def _check_della(method: str, dens: float, eps: float, i: int) -> None:
    if eps < 0 or (dens < 1.0 and not (0.0 < dens - eps and dens + eps < 1.0)):
        raise ConfigError(
            f"{method}: density ± epsilon must lie in (0, 1) with epsilon ≥ 0 for model {i}, "
            f"got density {dens}, epsilon {eps}"
        )


def sparse_gta_merge(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None,
    *,
    method: str,
    sparsify: str,
    consensus: bool,
) -> torch.Tensor:
    """Breadcrumbs (``sparsify="breadcrumbs"``) or DELLA (``"della"``) task arithmetic."""
    idx = non_base(method, base, tensors)
    if not base.is_floating_point():
        raise ConfigError(f"{method}: tensors must be floating point, got {base.dtype}")
    normalize, lam, rescale, weights, dens = gta.checked_params(method, idx, model_params, params, sparsify)
    extra = "gamma" if sparsify == "breadcrumbs" else "epsilon"
    vals = [as_float(method, extra, model_params[i].get(extra), f"model {i}") for i in idx]
    for j, i in enumerate(idx):
        if sparsify == "breadcrumbs" and not 0.0 <= vals[j] <= 1.0:
            raise ConfigError(f"{method}: gamma must be in [0, 1] for model {i}, got {vals[j]}")
        if sparsify == "della":
            _check_della(method, dens[j], vals[j], i)
    if not idx:
        return base
    if sparsify == "della" and rng is None:
        raise ValueError(f"{method}: a torch.Generator is required for DELLA's draws")
    keys = gta.dare_keys(rng, len(idx)) if sparsify == "della" else None
    deltas = torch.empty((len(idx), *base.shape), dtype=base.dtype, device=base.device)
    for j, i in enumerate(idx):
        d = torch.sub(tensors[i], base, out=deltas[j])
        if sparsify == "breadcrumbs":
            breadcrumbs_(d, dens[j], vals[j], rescale)
        else:
            della_(d, dens[j], vals[j], rescale, keys[j])
    mixed = gta._combine(deltas, weights, base, normalize, consensus)
    del deltas
    return gta._finish(mixed, lam, base)


_GLOBAL = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}

_METHODS = (  # name, sparsify, consensus, normalize, rescale, extra per-model parameter, description
    ("breadcrumbs", "breadcrumbs", False, False, False, {"gamma": 0.01},
     "task arithmetic on task vectors without their outliers and smallest entries (arXiv:2312.06795)"),
    ("breadcrumbs_ties", "breadcrumbs", True, False, False, {"gamma": 0.01},
     "breadcrumbs trim + TIES sign election (arXiv:2312.06795)"),
    ("della", "della", True, True, True, {"epsilon": 0.15},
     "magnitude-ranked random drop (MagPrune) + TIES sign election (arXiv:2406.11617)"),
    ("della_linear", "della", False, False, True, {"epsilon": 0.15},
     "magnitude-ranked random drop (MagPrune) + task arithmetic (arXiv:2406.11617)"),
)

for _name, _sparsify, _consensus, _normalize, _rescale, _extra, _desc in _METHODS:
    register(
        MethodSpec(
            name=_name,
            fn=partial(sparse_gta_merge, method=_name, sparsify=_sparsify, consensus=_consensus),
            needs_base=True,
            global_params={**_GLOBAL, "normalize": _normalize, "rescale": _rescale},
            model_params={"weight": 1.0, "density": 1.0, **_extra},
            description=_desc,
        )
    )
