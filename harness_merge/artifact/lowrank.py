"""Low-rank conversions used by the writer: SVD of a dense delta and
re-truncation of a factored one (QR of the factors, SVD of the small core)."""

from __future__ import annotations

import torch

from ..methods._lowrank import numerical_rank  # the one definition (threshold max(m, n) * eps32 * s_max)


def factor_dense(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``delta ~= B @ A`` by SVD; exact (numerical rank) when ``rank`` is None.

    Returns ``(A, B, rel_err)`` with ``rel_err = ||delta - B A||_F / ||delta||_F``;
    the singular values are split as ``sqrt(S)`` on each factor.
    """
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = numerical_rank(S, tuple(delta.shape))
    if rank is not None:
        k = min(k, rank)
    k = max(k, 1)
    root = S[:k].sqrt()
    B = (U[:, :k] * root).float()
    A = (root.unsqueeze(1) * Vh[:k]).float()
    total = float(S.square().sum())
    err = float(S[k:].square().sum())
    return A, B, (err / total) ** 0.5 if total > 0 else 0.0


def truncate_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``B @ A`` without forming it:
    ``B = Q_B R_B``, ``A^T = Q_A R_A``, SVD of the small core ``R_B R_A^T``."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = max(1, min(rank, numerical_rank(S, (B.shape[0], A.shape[1]))))
    root = S[:k].sqrt()
    B_new = ((Qb @ U[:, :k]) * root).float()
    A_new = (root.unsqueeze(1) * (Vh[:k] @ Qa.T)).float()
    total = float(S.square().sum())
    err = float(S[k:].square().sum())
    return A_new, B_new, (err / total) ** 0.5 if total > 0 else 0.0
