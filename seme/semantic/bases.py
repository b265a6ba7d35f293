"""Vocabulary-defined semantics: semantic bases, the semantic metric, the token subset (seme-method.md §2).

A model's *effective readout* is W = H · diag(γ_f) (V×d): the LM head with the final-norm gain folded
in (Gemma stores γ-1, so the gain is ``stored + arch.norm_offset``). The semantic basis of token i is
row i of S = W (WᵀW + εI)⁻¹: only a d×d solve (float64), never a V×V one. Ŝ holds the rows of S scaled
to unit norm, and F = ŜᵀŜ (d×d) is the *semantic metric*: ⟨ŜX, ŜY⟩ = tr(XᵀFY), so every norm and
inner product "in semantic coordinates" costs O(d²n) instead of O(Vdn).

Everything here reads weights only: no tokenizer, no text. The V×d readout is streamed in chunks of
``CHUNK`` rows (float64 only per chunk), so a model's bases cost one float32 copy of W, not V×d float64.

Part of the method: *semantic bases* (seme-method.md §2), the frame every other part measures in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from seme.errors import AlignmentError

if TYPE_CHECKING:
    from seme.checkpoint import Checkpoint
    from seme.semantic.transform import Layout

CHUNK = 8192  # rows of W processed at once (keeps the V×d float64 intermediates bounded)


@contextmanager
def lapack_one_thread() -> Iterator[None]:
    """Run small d×d factorizations (eigvalsh, svd, cholesky) on one CPU thread.

    For d in the hundreds they take ~0.1 s on one thread; with two threads on a loaded machine the
    LAPACK threads wait on each other (measured: svd of 576×576 float64, 0.19 s on one thread vs
    1.5-4.5 s on two under load 8). Same results up to rounding.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


@dataclass
class SemanticBasis:
    """The semantic bases of one model, kept in factored form.

    ``W`` (V×d, float32) is the effective readout; Ŝ rows are produced on demand as
    ``(W[idx] @ minv) * inv_norm[idx]`` so that no V×d float64 matrix has to stay in memory.
    """

    W: torch.Tensor  # V×d float32, on ``device``
    minv: torch.Tensor  # d×d float64: (WᵀW + εI)⁻¹
    inv_norm: torch.Tensor  # V float64: 1/‖s_i‖
    F: torch.Tensor  # d×d float64: ŜᵀŜ
    eps: float
    rank: int
    self_recovery: float  # fraction of probe tokens i with argmax_j s_i·w_j = i
    source: str

    @property
    def vocab_size(self) -> int:
        return int(self.W.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.W.shape[1])

    def unit_rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Ŝ[idx] (float64): the unit semantic bases of tokens ``idx`` (all tokens when None)."""
        if idx is None:
            idx = torch.arange(self.vocab_size, device=self.W.device)
        idx = idx.to(self.W.device)
        out = []
        for lo in range(0, idx.numel(), CHUNK):
            part = idx[lo : lo + CHUNK]
            out.append((self.W[part].double() @ self.minv) * self.inv_norm[part, None])
        return torch.cat(out) if out else torch.zeros(0, self.hidden_size, dtype=torch.float64)


def effective_readout(head: torch.Tensor, final_gain: torch.Tensor | None, norm_offset: float,
                      where: str) -> torch.Tensor:
    """W = H · diag(γ_f + offset) in float64; raises AlignmentError on NaN/Inf or a bad shape."""
    if head.dim() != 2:
        raise AlignmentError(f"{where}: LM head must be a matrix, got shape {tuple(head.shape)}")
    W = head.double()
    if not bool(torch.isfinite(W).all()):
        raise AlignmentError(f"{where}: LM head contains NaN or Inf values; semantic bases undefined")
    if final_gain is not None:
        g = final_gain.double() + norm_offset
        if g.shape != (W.shape[1],):
            raise AlignmentError(f"{where}: final norm gain has shape {tuple(g.shape)}, hidden size {W.shape[1]}")
        if not bool(torch.isfinite(g).all()):
            raise AlignmentError(f"{where}: final norm gain contains NaN or Inf values")
        W = W * g
    return W


def compute_basis(W: torch.Tensor, where: str, ridge: float = 1e-6, device: str = "cpu",
                  probe: int = 256, gain: torch.Tensor | None = None,
                  release: Callable[[int, int], None] | None = None) -> SemanticBasis:
    """Semantic bases of an effective readout W (V×d): a float64 d×d solve.

    With ``gain`` (d, float64), W is ``W · diag(gain)`` formed chunk by chunk in float64 (the same
    values as :func:`effective_readout`, without its V×d float64 copy). Raises AlignmentError when W
    has NaN/Inf, is rank-deficient (a singular LM head has no semantic bases: some residual direction
    is invisible to every token) or V < d. ``release(lo, hi)`` is called after each pass over rows
    ``[lo, hi)`` of W (e.g. to give a memory-mapped head's pages back).
    """
    V, d = W.shape
    if V < d:
        raise AlignmentError(f"{where}: vocabulary ({V}) smaller than hidden size ({d}); bases undefined")
    g = None if gain is None else gain.to(device=device, dtype=torch.float64)

    def rows(lo: int, hi: int) -> torch.Tensor:
        c = W[lo:hi].to(device=device, dtype=torch.float64)
        return c * g if g is not None else c

    G = torch.zeros(d, d, dtype=torch.float64, device=device)
    W32 = torch.empty(V, d, dtype=torch.float32, device=device)  # the stored readout
    for lo in range(0, V, CHUNK):
        c = rows(lo, lo + CHUNK)
        if not bool(torch.isfinite(c).all()):
            raise AlignmentError(f"{where}: LM head contains NaN or Inf values; semantic bases undefined")
        G.addmm_(c.T, c)
        W32[lo : lo + CHUNK] = c
        if release is not None:
            release(lo, lo + CHUNK)
    with lapack_one_thread():
        evals = torch.linalg.eigvalsh(G)
    top = float(evals[-1])
    if not math.isfinite(top) or top <= 0:
        raise AlignmentError(f"{where}: LM head is zero or not finite; semantic bases undefined")
    rank = int((evals > top * 1e-10).sum())
    if rank < d:
        raise AlignmentError(
            f"{where}: LM head is singular (rank {rank} < hidden size {d}); semantic bases undefined"
        )
    eps = ridge * float(torch.trace(G)) / d
    M = G + eps * torch.eye(d, dtype=torch.float64, device=device)
    with lapack_one_thread():
        minv = torch.cholesky_inverse(torch.linalg.cholesky(M))
    minv = 0.5 * (minv + minv.T)
    inv_norm = torch.empty(V, dtype=torch.float64, device=device)
    F = torch.zeros(d, d, dtype=torch.float64, device=device)
    for lo in range(0, V, CHUNK):
        s = rows(lo, lo + CHUNK) @ minv
        n = s.norm(dim=1).clamp_min_(1e-300)
        inv_norm[lo : lo + CHUNK] = 1.0 / n
        s.div_(n[:, None])
        F.addmm_(s.T, s)
        if release is not None:
            release(lo, lo + CHUNK)
    # Check (§2): argmax_j s_i·w_j = i for nearly all i, on an evenly spaced probe of tokens.
    idx = torch.arange(0, V, max(1, V // probe), device=device)[:probe]
    hits = 0
    for lo in range(0, idx.numel(), 256):
        part = idx[lo : lo + 256]
        sel = W[part.to(W.device)].to(device=device, dtype=torch.float64)
        sel = sel * g if g is not None else sel
        scores = (sel @ minv).float() @ W32.T  # a check: float32 is plenty
        hits += int((scores.argmax(dim=1) == part).sum())
    return SemanticBasis(
        W=W32, minv=minv, inv_norm=inv_norm, F=0.5 * (F + F.T), eps=eps, rank=rank,
        self_recovery=hits / max(1, idx.numel()), source=where,
    )


def special_token_ids(config: dict[str, Any]) -> set[int]:
    """Ids the config names as special (bos/eos/pad/unk; lists allowed)."""
    out: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = config.get(key)
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and not isinstance(x, bool):
                out.add(x)
    return out


def token_subset(W: torch.Tensor, config: dict[str, Any], tokens: int = 8192,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The deterministic token subset T (§2), as sorted int64 ids.

    All tokens when V ≤ ``tokens``; otherwise drop the config's special ids and rows of W whose
    norm is below 1e-3·median, then take every ⌈V/tokens⌉-th remaining id. ``allowed`` (bool over
    V) further restricts T, e.g. to tokens every source's vocabulary shares.
    """
    V = int(W.shape[0])
    keep = torch.ones(V, dtype=torch.bool)
    if allowed is not None:
        keep &= allowed.cpu()
    if V <= tokens:
        return torch.nonzero(keep).flatten()
    norms = W.float().norm(dim=1).cpu()
    keep &= norms >= 1e-3 * float(norms.median())
    for i in special_token_ids(config):
        if 0 <= i < V:
            keep[i] = False
    ids = torch.nonzero(keep).flatten()
    return ids[:: math.ceil(V / tokens)].clone()


def sem_inner(X: torch.Tensor, Y: torch.Tensor, F: torch.Tensor, kind: str) -> float:
    """⟨ŜX, ŜY⟩ via the metric: tr(XᵀFY) for write matrices (d×n), tr(XFYᵀ) for read matrices and
    row stacks (n×d), the plain inner product for anything else (norm gains, biases)."""
    if kind == "write":
        return float((X.double() * (F @ Y.double())).sum())
    if kind in ("read", "rows"):
        return float((X.double() * (Y.double() @ F)).sum())
    return float((X.double() * Y.double()).sum())


def row_sem_sq(X: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Per-row semantic squared norm x F xᵀ of a row stack (n×d) -> (n,) float64."""
    Xd = X.double()
    return ((Xd @ F) * Xd).sum(dim=1)


def spectrum_summary(F: torch.Tensor) -> dict[str, float]:
    """Eigenvalue summary of the semantic metric (it is anisotropic; diagnostics report it)."""
    with lapack_one_thread():
        ev = torch.linalg.eigvalsh(F.double().cpu())
    return {
        "min": float(ev[0]),
        "max": float(ev[-1]),
        "mean": float(ev.mean()),
        "median": float(ev.median()),
        "condition": float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf"),
    }


def pseudo_inverse_rows(S_T: torch.Tensor) -> torch.Tensor:
    """Ŝ_T⁺ = (Ŝ_TᵀŜ_T)⁻¹Ŝ_Tᵀ (d×|T|), float64; raises when T does not span the residual space."""
    G = S_T.T @ S_T
    d = G.shape[0]
    with lapack_one_thread():
        evals = torch.linalg.eigvalsh(G)
        if float(evals[0]) <= float(evals[-1]) * 1e-12:
            raise AlignmentError(
                f"token subset of {S_T.shape[0]} tokens does not span the {d}-dim residual space; raise `tokens`"
            )
        return torch.linalg.solve(G, S_T.T)



def model_basis(ckpt: Checkpoint, layout: Layout, vocab_map: torch.Tensor | None, ridge: float,
                device: str) -> SemanticBasis:
    """Semantic bases of a checkpoint (final-norm gain folded), rows in the anchor's token order.

    The LM head is read over the checkpoint's memory map (no copy) and its pages are given back
    afterwards; under a vocabulary map, tokens the model lacks get zero rows.
    """
    head_name = layout.head_name()
    where = f"{ckpt.path} ({head_name})"
    head = ckpt.view(head_name)
    if head.dim() != 2:
        raise AlignmentError(f"{where}: LM head must be a matrix, got shape {tuple(head.shape)}")
    if vocab_map is not None:
        out = torch.zeros(vocab_map.numel(), head.shape[1], dtype=head.dtype)
        out[vocab_map >= 0] = head[vocab_map[vocab_map >= 0]]
        head = out
    release = None if vocab_map is not None else (lambda lo, hi: ckpt.release(head_name, (lo, hi)))
    gain = None
    if layout.final_norm:
        g = ckpt.get(layout.final_norm).double() + layout.arch.norm_offset
        if g.shape != (head.shape[1],):
            raise AlignmentError(f"{where}: final norm gain has shape {tuple(g.shape)}, hidden size {head.shape[1]}")
        if not bool(torch.isfinite(g).all()):
            raise AlignmentError(f"{where}: final norm gain contains NaN or Inf values")
        gain = g
    try:
        return compute_basis(head, where, ridge=ridge, device=device, gain=gain, release=release)
    finally:
        ckpt.release(head_name)
