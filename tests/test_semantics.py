"""Semantic bases, the semantic metric and the token subset (§2), on small explicit matrices."""

from __future__ import annotations

import pytest
import torch

from seme.errors import AlignmentError
from seme.semantic.bases import (
    compute_basis,
    effective_readout,
    pseudo_inverse_rows,
    sem_inner,
    spectrum_summary,
    token_subset,
)


def _W(V: int = 300, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, d, generator=g, dtype=torch.float64) * (1 + torch.rand(d, generator=g, dtype=torch.float64))


def test_bases_are_the_pseudoinverse_rows_and_F_is_the_metric():
    W = _W()
    b = compute_basis(W, "test")
    S_explicit = torch.linalg.pinv(W).T  # s_i = e_i W⁺
    S_hat = S_explicit / S_explicit.norm(dim=1, keepdim=True)
    assert torch.allclose(b.unit_rows(), S_hat, atol=1e-6)
    assert torch.allclose(b.F, S_hat.T @ S_hat, atol=1e-6)
    assert b.self_recovery > 0.95 and b.rank == 24
    # ⟨ŜX, ŜY⟩ = tr(XᵀFY) for write matrices (d×n) and read matrices (n×d), exactly for this Ŝ
    S_hat = b.unit_rows()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(24, 7, generator=g, dtype=torch.float64), torch.randn(24, 7, generator=g, dtype=torch.float64)
    assert sem_inner(X, Y, b.F, "write") == pytest.approx(float(((S_hat @ X) * (S_hat @ Y)).sum()), rel=1e-7)
    A, B = X.T.contiguous(), Y.T.contiguous()
    assert sem_inner(A, B, b.F, "read") == pytest.approx(float(((A @ S_hat.T) * (B @ S_hat.T)).sum()), rel=1e-7)
    assert sem_inner(X[:, 0], Y[:, 0], b.F, "vector") == pytest.approx(float(X[:, 0] @ Y[:, 0]))
    spec = spectrum_summary(b.F)
    assert spec["mean"] == pytest.approx(300 / 24, rel=1e-6)  # tr F = V (unit rows)


def test_bases_rotate_with_the_residual_space():
    W = _W()
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    b, br = compute_basis(W, "a"), compute_basis(W @ q.T, "b")
    assert torch.allclose(br.unit_rows(), b.unit_rows() @ q.T, atol=1e-8)


def test_final_norm_gain_is_folded_with_the_family_offset():
    H = _W(50, 8)
    gamma = torch.linspace(-0.5, 0.5, 8)
    assert torch.allclose(effective_readout(H, gamma, 0.0, "x"), H * gamma.double())
    assert torch.allclose(effective_readout(H, gamma, 1.0, "x"), H * (1 + gamma.double()))  # Gemma stores γ-1
    assert torch.allclose(effective_readout(H, None, 0.0, "x"), H)


def test_singular_or_nan_heads_are_errors():
    W = _W(60, 8)
    W[:, 3] = W[:, 2]
    with pytest.raises(AlignmentError, match="singular"):
        compute_basis(W, "model/lm_head.weight")
    W = _W(60, 8)
    W[4, 1] = float("nan")
    with pytest.raises(AlignmentError, match="NaN"):
        effective_readout(W, None, 0.0, "model/lm_head.weight")
    with pytest.raises(AlignmentError, match="smaller than hidden"):
        compute_basis(_W(6, 8), "tiny")


def test_token_subset_is_deterministic_and_skips_specials_and_dead_rows():
    W = _W(1000, 8)
    W[10] = 0.0  # a dead row
    cfg = {"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": None}
    T = token_subset(W, cfg, tokens=100)
    assert torch.equal(T, token_subset(W, cfg, tokens=100))
    assert not {0, 1, 2, 10} & set(T.tolist())
    assert 90 <= T.numel() <= 100 and torch.all(T[1:] > T[:-1])
    assert torch.equal(token_subset(W, cfg, tokens=5000), torch.arange(1000))  # V ≤ tokens: all
    allowed = torch.zeros(1000, dtype=torch.bool)
    allowed[:500] = True
    assert int(token_subset(W, cfg, tokens=5000, allowed=allowed).max()) == 499


def test_pseudo_inverse_of_the_token_subset():
    b = compute_basis(_W(), "x")
    S_T = b.unit_rows(torch.arange(0, 300, 3))
    P = pseudo_inverse_rows(S_T)
    assert torch.allclose(P @ S_T, torch.eye(24, dtype=torch.float64), atol=1e-9)
    with pytest.raises(AlignmentError, match="does not span"):
        pseudo_inverse_rows(S_T[:10])
