"""Semantics-preservative transformations: bring every source into the anchor's coordinates (§3).

Three function-preserving maps, estimated from weights alone (anchor: the base model when given,
else the first source):

1. *Vocabulary map* by token string when tokenizers differ (tokenizer files are read only for the
   token strings; without them, equal vocabulary sizes mean the same vocabulary).
2. *Residual rotation* (pure pre-norm families only): R_k = argmin ‖Ŝ_k R_kᵀ − Ŝ_a‖_F over the
   index-aligned tokens (orthogonal Procrustes on the semantic bases). Applied only when some R_k is
   far from I and explains the basis mismatch; then every residual norm gain is folded into the read
   matrices it feeds (in *every* model, anchor included), writes get U ← R U, reads A ← A Rᵀ.
3. *Unit permutations*: MLP neurons and attention heads (by whole KV groups), matched to the anchor
   with the Hungarian algorithm on −cos_F(write vectors) − cos(read vectors).

:func:`compute_alignment` estimates them and, in the same layer-by-layer pass, the Select statistics
(``seme.semantic.select``), holding one layer of every model at a time (and the anchor's bases plus
one other model's while rotations are fitted). :func:`align` writes the artifact
(``seme.semantic.artifact``).

Part of the method: *semantics-preservative transformations* (estimation).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from seme.checkpoint import Checkpoint
from seme.errors import AlignmentError, ConfigError
from seme.semantic.artifact import FORMAT_VERSION, Alignment, model_sha256, write_alignment
from seme.semantic.bases import SemanticBasis, lapack_one_thread, model_basis, spectrum_summary, token_subset
from seme.semantic.compute import module_weights, select_and_compute
from seme.semantic.select import module_statistics
from seme.semantic.settings import GLOBAL_PARAMS, Settings, resolve_device
from seme.semantic.transform import ATTN_READ, MLP_READ, Layout, ModelAlignment, ModelView, head_rows

log = logging.getLogger(__name__)


def read_vocab(path: Path) -> dict[str, int] | None:
    """Token string -> id from ``tokenizer.json`` or ``vocab.json`` (None when neither exists).

    Only the JSON is parsed (no tokenizer library, no text): the strings identify tokens across
    checkpoints whose tokenizers differ.
    """
    from seme.checkpoint import read_json

    tj = path / "tokenizer.json"
    if os.path.lexists(tj):
        data = read_json(tj, AlignmentError, "tokenizer JSON")
        model = data.get("model") if isinstance(data, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        out: dict[str, int] = {}
        try:
            if isinstance(vocab, dict):
                out.update({str(k): _token_id(v) for k, v in vocab.items()})
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                for i, p in enumerate(vocab):
                    if not isinstance(p, list) or not p or not isinstance(p[0], str):
                        raise ValueError(f"vocab entry {i} is {p!r}, not [piece, score]")
                    out[p[0]] = i
            elif vocab is not None:
                raise ValueError(f"model.vocab is a {type(vocab).__name__}")
            for tok in data.get("added_tokens") or []:
                out[str(tok["content"])] = _token_id(tok["id"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise AlignmentError(f"{tj}: invalid tokenizer vocabulary ({e})") from None
        return out or None
    vj = path / "vocab.json"
    if os.path.lexists(vj):
        data = read_json(vj, AlignmentError, "vocab JSON")
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not an object of token -> id")
            return {str(k): _token_id(v) for k, v in data.items()}
        except (ValueError, TypeError) as e:
            raise AlignmentError(f"{vj}: invalid vocab JSON ({e})") from None
    return None


def _token_id(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"token id {v!r} is not a non-negative integer")
    return v


def vocab_mapping(anchor: Checkpoint, va: int, model: Checkpoint, vm: int) -> tuple[torch.Tensor | None, dict]:
    """Anchor id -> model id (-1 absent), or None for the identity; plus a record for alignment.json."""
    a_vocab, m_vocab = read_vocab(anchor.path), read_vocab(model.path)
    if a_vocab is None or m_vocab is None:
        if va == vm:
            return None, {"mode": "identity", "reason": "no tokenizer files; equal vocabulary sizes"}
        raise AlignmentError(
            f"{model.path}: vocabulary size {vm} differs from the anchor's {va} ({anchor.path}) and "
            "tokenizer files are missing, so tokens cannot be matched by string"
        )
    if a_vocab == m_vocab and va == vm:
        return None, {"mode": "identity", "reason": "identical tokenizer vocabularies"}
    id_to_str = {i: s for s, i in a_vocab.items() if 0 <= i < va}
    vmap = torch.full((va,), -1, dtype=torch.int64)
    for i, s in id_to_str.items():
        j = m_vocab.get(s)
        if j is not None and 0 <= j < vm:
            vmap[i] = j
    shared = int((vmap >= 0).sum())
    if shared == 0:
        raise AlignmentError(f"{model.path}: its vocabulary shares no token with the anchor's ({anchor.path})")
    return vmap, {"mode": "by_string", "shared": shared, "anchor_vocab": va, "model_vocab": vm}



def check_compatible(models: list[tuple[str, Checkpoint]]) -> None:
    """Same family, sizes and tensor names/shapes (rows of embeddings/LM head may differ)."""
    a = models[0][1]
    arch_a = a.architecture
    fields = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "tied_embeddings")
    for key, m in models[1:]:
        arch = m.architecture
        for f in fields:
            if getattr(arch, f) != getattr(arch_a, f):
                raise AlignmentError(
                    f"{m.path}: {f} is {getattr(arch, f)!r} but the anchor {a.path} has "
                    f"{getattr(arch_a, f)!r}; SeMe merges models of one architecture"
                )
        missing = sorted(set(a.names) ^ set(m.names))
        if missing:
            raise AlignmentError(f"{m.path}: tensor {missing[0]} is not in both it and the anchor {a.path}")
        for n in a.names:
            sa, sm = a.shape(n), m.shape(n)
            if sa != sm:
                kind = arch_a.role(n).kind
                if kind in ("embed", "lm_head") and sa[1:] == sm[1:]:
                    continue
                raise AlignmentError(f"{m.path}: tensor {n} has shape {sm}, the anchor's is {sa}")



def procrustes(models: dict[str, SemanticBasis], ba: SemanticBasis, shared: dict[str, torch.Tensor | None]
               ) -> dict[str, tuple[torch.Tensor, float, float]]:
    """R_k = argmin ‖Ŝ_k R_kᵀ − Ŝ_a‖_F (orthogonal) over the tokens each model shares with the anchor.

    The cross-covariance comes from the factored bases (no unit rows are formed). Returns per model
    (R, RMS row residual with R, RMS row residual with the identity).
    """
    d, dev = ba.hidden_size, ba.W.device
    # Ŝ_mᵀŜ_a = M_m⁻¹ (W_mᵀ diag(1/‖s_m‖·1/‖s_a‖) W_a) M_a⁻¹: one V×d×d product per model, no unit rows.
    C: dict[str, torch.Tensor] = {}
    n: dict[str, float] = {}
    inv_a = ba.inv_norm.to(dev)
    for k, bm in models.items():
        w_a, w_m = inv_a, bm.inv_norm.to(dev)  # scaled separately: zero rows have 1/‖s‖ = 1e300
        mask = shared.get(k)
        if mask is not None:
            mask = mask.to(dev)
            w_a = w_a * mask.to(w_a.dtype)
            n[k] = float(mask.sum())
        else:
            n[k] = float(ba.vocab_size)
        mid = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for lo in range(0, ba.vocab_size, 8192):
            hi = min(lo + 8192, ba.vocab_size)
            rows_m = bm.W[lo:hi].double().mul_(w_m[lo:hi, None])
            mid.addmm_(rows_m.T, ba.W[lo:hi].double().mul_(w_a[lo:hi, None]))
        C[k] = bm.minv @ mid @ ba.minv
    out = {}
    for k, Ck in C.items():
        with lapack_one_thread():
            U, S, Vh = torch.linalg.svd(Ck)
        Q = U @ Vh  # minimises ‖Ŝ_m Q − Ŝ_a‖; R = Qᵀ
        resid_sq = max(0.0, 2 * n[k] - 2 * float(S.sum()))  # ‖Ŝ_m Q‖² = ‖Ŝ_a‖² = n (unit rows)
        ident_sq = max(0.0, 2 * n[k] - 2 * float(torch.trace(Ck)))
        out[k] = (Q.T.contiguous(), math.sqrt(resid_sq / max(n[k], 1.0)), math.sqrt(ident_sq / max(n[k], 1.0)))
    return out


def _hungarian(cost: torch.Tensor, identity_frac: float) -> tuple[torch.Tensor | None, float]:
    """Perm with aligned[j] = model[perm[j]] minimising the cost (rows: anchor units); None = identity."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().double().cpu()
    if not bool(torch.isfinite(c).all()):
        raise AlignmentError("non-finite unit matching cost (NaN/Inf weights?)")
    perm = None
    if c.shape[0] == c.shape[1] and c.shape[1] >= 2:
        # Exact shortcut: when every row's minimum is strict and the row argmins form a permutation,
        # that assignment reaches the lower bound Σ_i min_j c_ij and is the unique optimum.
        two = torch.topk(c, 2, dim=1, largest=False)
        arg = two.indices[:, 0]
        strict = bool((two.values[:, 0] < two.values[:, 1]).all())
        if strict and int(torch.bincount(arg, minlength=c.shape[1]).max()) == 1:
            perm = arg.to(torch.int64)
    if perm is None:
        _rows, cols = linear_sum_assignment(np.ascontiguousarray(c.numpy()))
        perm = torch.as_tensor(cols, dtype=torch.int64)
    frac = float((perm == torch.arange(perm.numel())).double().mean())
    return (None if frac >= identity_frac else perm), frac


def _unit_features(reads: list[torch.Tensor], W: torch.Tensor, F: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Per unit (rows): [write block, unit F-norm | read vector, unit norm], so that one GEMM of two
    feature matrices gives cos_F(writes) + cos(reads) for all unit pairs.

    reads: row blocks (G, r_i) whose concatenation is each unit's read vector; W: (d, G, m) write
    columns per unit (a view of the d × G·m write matrix). ``weighted`` multiplies the write part by F
    (one side of ⟨a, F b⟩; F is symmetric). Written into one buffer: no concatenated copies.
    """
    d, G, m = W.shape
    W2 = W.reshape(d, G * m)
    FW = F @ W2
    nw = (W2 * FW).reshape(d, G, m).sum(dim=(0, 2)).clamp_min(1e-30).sqrt()
    wf = (FW if weighted else W2).reshape(d, G, m).permute(1, 0, 2).reshape(G, d * m)
    out = torch.empty(G, d * m + sum(r.shape[1] for r in reads), dtype=W.dtype, device=W.device)
    torch.div(wf, nw[:, None], out=out[:, : d * m])
    nr = sum((r * r).sum(dim=1) for r in reads).sqrt().clamp_min(1e-30)[:, None]
    off = d * m
    for r in reads:
        torch.div(r, nr, out=out[:, off : off + r.shape[1]])
        off += r.shape[1]
    return out


def _mlp_vectors(view: ModelView, layer: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(read row blocks per neuron ([I × d] per read unit), write columns as (d, I, 1)) for one MLP."""
    lay = view.layout
    reads = []
    for unit, parts in MLP_READ.items():
        name = lay.by_unit.get((layer, unit))
        if name is None:
            continue
        t = view.get(name)
        n = view.arch.intermediate_size
        reads += [t[i * n : (i + 1) * n] for i in range(len(parts))]
    down = lay.by_unit.get((layer, "down"))
    if not reads or down is None:
        return None
    U = view.get(down)  # d × I
    return reads, U.unsqueeze(2)


def _attn_vectors(view: ModelView, layer: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(read blocks per KV group flattened ([G × ·] per unit), write blocks (d, G, r·hd)) for attention."""
    lay, arch = view.layout, view.arch
    G = arch.num_kv_heads
    reads = []
    ident = torch.arange(G)
    for unit, parts in ATTN_READ.items():
        name = lay.by_unit.get((layer, unit))
        if name is None:
            continue
        t = view.get(name)
        off = 0
        for u in parts:
            n = lay.sizes(u)
            blk = t[off : off + n][head_rows(arch, u, ident).to(t.device)]
            reads.append(blk.reshape(G, -1))
            off += n
    o = lay.by_unit.get((layer, "o"))
    if not reads or o is None:
        return None
    O = view.get(o)  # d × (nh·hd): KV group g owns columns [g·r·hd, (g+1)·r·hd)
    return reads, O.reshape(O.shape[0], G, -1)


def match_layer(anchor: ModelView, model: ModelView, layer: int, F: torch.Tensor,
                identity_frac: float, cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Hungarian matching of MLP neurons and KV groups of ``layer``; sets model.al perms in place.

    Cost −cos_F(write vectors) − cos(read vectors), as one GEMM of unit features (F applied on the
    anchor's side). ``cache`` keeps the anchor's features between calls for several models.
    """
    out: dict[str, Any] = {}
    cache = {} if cache is None else cache
    F32 = F.to(device=anchor.device, dtype=torch.float32)
    for kind, fn, store in (("mlp", _mlp_vectors, model.al.mlp_perm), ("attn", _attn_vectors, model.al.attn_perm)):
        store.pop(layer, None)
        if (kind, layer) not in cache:
            va = fn(anchor, layer)
            cache[(kind, layer)] = None if va is None else _unit_features(*va, F32, weighted=True)
        fa = cache[(kind, layer)]
        vm = fn(model, layer) if fa is not None else None
        if fa is None or vm is None:
            continue
        cost = fa @ _unit_features(*vm, F32, weighted=False).T
        perm, frac = _hungarian(cost.neg_(), identity_frac)
        if perm is not None:
            store[layer] = perm
        out[kind] = {"identity": perm is None, "identity_fraction": frac}
    return out



class _Timer:
    """Wall and CPU seconds per phase, into ``alignment.json``'s ``timings``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()  # CPU: the whole process
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = self.timings.get(f"{name}_s", 0.0) + time.perf_counter() - t
            self.timings[f"{name}_cpu_s"] = self.timings.get(f"{name}_cpu_s", 0.0) + time.process_time() - c


def _vocabulary_maps(models: list[tuple[str, Checkpoint]], layout: Layout, va: int
                     ) -> tuple[dict[str, ModelAlignment], dict[str, Any]]:
    """Step 1: a ModelAlignment per model, holding its vocabulary map (None: the anchor's ids)."""
    anchor_key, anchor = models[0]
    als = {anchor_key: ModelAlignment()}
    records: dict[str, Any] = {anchor_key: {"mode": "identity", "reason": "anchor"}}
    for key, ck in models[1:]:
        vmap, records[key] = vocab_mapping(anchor, va, ck, ck.shape(layout.head_name())[0])
        als[key] = ModelAlignment(vocab_map=vmap)
    return als, records


def _fit_rotations(models: list[tuple[str, Checkpoint]], layout: Layout, als: dict[str, ModelAlignment],
                   s: Settings, device: str) -> tuple[SemanticBasis, dict[str, torch.Tensor], dict[str, Any],
                                                      dict[str, Any]]:
    """Step 2a: the anchor's bases, and R_k by Procrustes for every other model.

    One other model's bases are in memory at a time. Returns (anchor basis, R per model, rotation
    records, basis records).
    """
    anchor_key, anchor = models[0]
    ba = model_basis(anchor, layout, None, s.ridge, device)
    d = ba.hidden_size
    basis_rec = {anchor_key: {"self_recovery": ba.self_recovery, "rank": ba.rank, "eps": ba.eps}}
    rotations: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for key, ck in models[1:]:
        vm = als[key].vocab_map
        bm = model_basis(ck, layout, vm, s.ridge, device)
        basis_rec[key] = {"self_recovery": bm.self_recovery, "rank": bm.rank, "eps": bm.eps}
        R, resid, resid_id = procrustes({key: bm}, ba, {key: None if vm is None else vm >= 0})[key]
        del bm
        rotations[key] = R
        records[key] = {"deviation_from_identity": float((R - torch.eye(d, dtype=R.dtype, device=R.device)).norm()),
                        "procrustes_residual": resid, "identity_residual": resid_id}
    return ba, rotations, records, basis_rec


def _decide_rotation(models: list[tuple[str, Checkpoint]], layout: Layout, als: dict[str, ModelAlignment],
                     rotations: dict[str, torch.Tensor], records: dict[str, Any], s: Settings,
                     d: int) -> dict[str, Any]:
    """Step 2b: apply the rotations (and fold norm gains, in every model) or not; sets ``als``.

    Rotate only when some R_k is far from I *and* explains most of the basis mismatch: for fine-tunes
    of one base, Procrustes on a small vocabulary fits noise (R ≠ I, residual barely lower).
    """
    arch = layout.arch
    needed = any(r["deviation_from_identity"] >= s.rotation_tol * math.sqrt(d)
                 and r["procrustes_residual"] < 0.5 * r["identity_residual"] for r in records.values())
    applied, reason = False, "all rotations within rotation_tol of the identity"
    fold_final = not layout.tied
    if needed and not arch.residual_rotation_ok:
        reason = f"family {arch.family} has post-norms on the residual: permutations only"
    elif needed and layout.tied and layout.final_norm:
        gains = [ModelView(ck, layout, ModelAlignment()).gain(layout.final_norm) for _k, ck in models]
        if all(float((g - g.mean()).abs().max()) <= 1e-6 * max(1.0, float(g.abs().mean())) for g in gains):
            applied, reason = True, "rotated; tied embeddings with uniform final-norm gain (left unfolded)"
        else:
            reason = ("tied embeddings with a non-uniform final-norm gain: folding it would untie the "
                      "LM head, so the rotation is not applied (permutations only)")
            log.warning("SeMe: %s", reason)
    elif needed:
        applied, reason = True, "rotated with norm gains folded into the read matrices"
    for key, al in als.items():
        al.fold = applied
        al.fold_final = applied and fold_final
        if applied and key in rotations:
            al.rotation = rotations[key]
    return {"needed": needed, "applied": applied, "fold_final": applied and fold_final, "reason": reason}


def _permutations_and_statistics(views: dict[str, ModelView], n_sources: int, has_base: bool, anchor: Checkpoint,
                                 F: torch.Tensor, s: Settings, timer: _Timer
                                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Step 3, layer by layer: match the units of every model to the anchor's, then accumulate the
    Select statistics of the layer's tensors, then give the layer's pages back. Embeddings, LM head
    and final norm come last (their statistics go block of rows by block of rows)."""
    keys = list(views)
    anchor_key = keys[0]
    arch = views[anchor_key].arch
    src_views = [views[str(i)] for i in range(n_sources)]
    base_view = views["base"] if has_base else None
    by_layer: dict[int | None, list[str]] = {}
    for n in anchor.names:
        by_layer.setdefault(arch.role(n).layer, []).append(n)
    perm_records: dict[str, dict[str, Any]] = {key: {} for key in keys}
    stats: dict[str, dict[str, Any]] = {}
    for layer in range(arch.num_layers):
        names = by_layer.pop(layer, [])
        cache: dict[Any, Any] = {}
        for v in views.values():
            v.keep_aligned(True)  # one read per tensor for matching + statistics
        with timer.phase("permutations"):
            for key in keys[1:]:
                perm_records[key][str(layer)] = match_layer(views[anchor_key], views[key], layer, F,
                                                            s.perm_identity, cache)
        with timer.phase("select_stats"):
            module_statistics(src_views, base_view, names, arch, F, stats)
        for v in views.values():
            v.keep_aligned(False)
            v.release(names)
    rest = [n for names in by_layer.values() for n in names]
    with timer.phase("select_stats"):
        module_statistics(src_views, base_view, rest, arch, F, stats)
    for v in views.values():
        v.release(rest)
    return perm_records, stats


def _shared_token_subset(ba: SemanticBasis, anchor: Checkpoint, als: dict[str, ModelAlignment], va: int,
                         s: Settings) -> torch.Tensor:
    """Step 4: the token subset T over the anchor's ids that every model has."""
    shared = torch.ones(va, dtype=torch.bool)
    for al in als.values():
        if al.vocab_map is not None:
            shared &= al.vocab_map >= 0
    T = token_subset(ba.W, anchor.config, s.tokens, allowed=shared)
    if T.numel() < ba.hidden_size:
        raise AlignmentError(f"token subset has {T.numel()} tokens, fewer than the hidden size {ba.hidden_size}")
    return T


def compute_alignment(cfg: Any, sources: list[Checkpoint], base: Checkpoint | None, device: str = "cpu",
                      progress: bool = False) -> Alignment:
    """Estimate rotations, permutations and vocabulary maps, and the Select statistics (§3-§4)."""
    timer = _Timer()
    t_start, c_start = time.perf_counter(), time.process_time()
    device = resolve_device(device)
    s = Settings.from_config(cfg)
    if not sources:
        raise AlignmentError("SeMe needs at least one source model")
    keys = (["base"] if base is not None else []) + [str(i) for i in range(len(sources))]
    models = list(zip(keys, ([base] if base is not None else []) + list(sources)))
    check_compatible(models)
    anchor_key, anchor = models[0]
    arch = anchor.architecture
    layout = Layout(arch, anchor.names)
    va = anchor.shape(layout.head_name())[0]
    d = arch.hidden_size

    als, vocab_records = _vocabulary_maps(models, layout, va)
    with timer.phase("bases"):  # (includes the Procrustes fits, one model's bases at a time)
        ba, rotations, rot_records, basis_records = _fit_rotations(models, layout, als, s, device)
    with timer.phase("rotation"):
        rotation = _decide_rotation(models, layout, als, rotations, rot_records, s, d)
    views = {key: ModelView(ck, layout, als[key], device=device) for key, ck in models}
    perm_records, stats = _permutations_and_statistics(views, len(sources), base is not None, anchor, ba.F, s,
                                                       timer)
    T = _shared_token_subset(ba, anchor, als, va, s)

    tensors: dict[str, torch.Tensor] = {"tokens": T.to(torch.int64).cpu()}
    meta_models: dict[str, Any] = {}
    for key, ck in models:
        al = als[key]
        if al.rotation is not None:
            tensors[f"rotation.{key}"] = al.rotation.double().cpu()
        if al.vocab_map is not None:
            tensors[f"vocab_map.{key}"] = al.vocab_map.cpu()
        for layer, p in al.mlp_perm.items():
            tensors[f"mlp_perm.{key}.{layer}"] = p.cpu()
        for layer, p in al.attn_perm.items():
            tensors[f"attn_perm.{key}.{layer}"] = p.cpu()
        meta_models[key] = {
            "path": str(ck.path),
            "sha256": model_sha256(ck),
            "role": "base" if key == "base" else "source",
            "anchor": key == anchor_key,
            "vocabulary": vocab_records[key],
            "rotation": rot_records.get(key, {"deviation_from_identity": 0.0, "procrustes_residual": 0.0}),
            "permutations": perm_records[key],
            "mlp_permuted_layers": sorted(al.mlp_perm),
            "attn_permuted_layers": sorted(al.attn_perm),
            "basis": basis_records[key],
        }
    modules = {}
    for key, st in stats.items():
        sc = select_and_compute(st["gram"], st["base_sq"], module_weights(cfg, arch, st["first"]), s)
        modules[key] = {"gram": st["gram"].tolist(), "base_sq": st["base_sq"], "first_tensor": st["first"],
                        **sc}
    timings = timer.timings
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = time.process_time() - c_start
    meta = {
        "format_version": FORMAT_VERSION,
        "method": "seme",
        "anchor": anchor_key,
        "base": str(base.path) if base is not None else None,
        "family": arch.family,
        "hidden_size": d,
        "num_layers": arch.num_layers,
        "settings": {k: getattr(s, k) for k in GLOBAL_PARAMS},
        "weights": [module_weights(cfg, arch, "")[k] for k in range(len(sources))],
        "models": meta_models,
        "rotation": rotation,
        "token_subset": {"size": int(T.numel()), "vocab": va},
        "f_spectrum": spectrum_summary(ba.F),
        "modules": modules,
        "timings": timings,
        "device": device,
    }
    return Alignment(meta=meta, tensors=tensors, anchor_basis=ba)


def align(config: Any, out_dir: str | os.PathLike, device: str = "cpu", overwrite: bool = False,
          allow_pickle: bool = False) -> Path:
    """Compute the alignment artifact for a SeMe merge config into ``out_dir`` (atomic). Data-free."""
    from seme.checkpoint import open_checkpoint
    from seme.config import MergeConfig, load_config
    from seme.fsutil import atomic_dir, check_out_dir, clean_stale_temps
    from seme.merge import limit_heap_retention

    limit_heap_retention()  # freed per-layer tensors leave RSS, as in a merge
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if cfg.merge_method != "seme":
        raise ConfigError(f"seme align needs merge_method: seme, the config has {cfg.merge_method!r}")
    protect = [cfg.base_model, *(m.model for m in cfg.models),
               config if isinstance(config, (str, os.PathLike)) else None]
    clean_stale_temps(check_out_dir(out_dir, overwrite, protect=protect).parent)  # fail fast
    sources = [open_checkpoint(m.model, allow_pickle=allow_pickle) for m in cfg.models]
    base = open_checkpoint(cfg.base_model, allow_pickle=allow_pickle) if cfg.base_model else None
    protect += [ck.path for ck in [*sources, *([base] if base else [])]]
    with atomic_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        al = compute_alignment(cfg, sources, base, device=device)
        write_alignment(al, tmp)
    return Path(out_dir).absolute()
