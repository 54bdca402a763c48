"""Factor-space linear algebra shared by the SVD and WUDI methods.

A LoRA module's N updates ``delta_i = B_i A_i`` (scale folded into ``B_i``) all
live in ``span(B_1..B_N) x span(A_1..A_N)``. With ``Q_B R_B = [B_1 .. B_N]`` and
``Q_A R_A = [A_1^T .. A_N^T]`` (thin QR, orthonormal columns) every update is
``delta_i = Q_B C_i Q_A^T`` with a small *core* ``C_i = R_B[:, i] R_A[:, i]^T``
of size at most ``(N r x N r)``. Every operation the SVD methods use (SVD,
projection onto a subspace, polar factor, sums, Frobenius norms, the WUDI
quadratic loss and its gradient) commutes with multiplying by matrices with
orthonormal columns, so it can run on the cores and be lifted back at the end:
the ``d_out x d_in`` delta is never formed.

:class:`Frame` carries the bases (``None`` = identity, the dense path) and the
module shape, so one implementation of each method serves both paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..types import Dense, LoRAFactors, LowRank, MergeResult, ModuleInputs

FACTOR_DTYPE = torch.float64
"""Cores are at most (N r x N r): float64 costs nothing there."""
DENSE_DTYPE = torch.float32
"""Dense d_out x d_in work stays in float32 (float64 SVDs of 11008x4096 are slow)."""


@dataclass(frozen=True)
class Frame:
    """Orthonormal bases in which a module's updates are expressed:
    ``delta = QB @ core @ QA.T``; ``QB``/``QA`` ``None`` means identity (dense)."""

    shape: tuple[int, int]
    QB: torch.Tensor | None = None
    QA: torch.Tensor | None = None

    @property
    def is_factor(self) -> bool:
        return self.QB is not None


def rank_rtol(shape: Sequence[int]) -> float:
    """Relative threshold of the numerical rank of a ``shape`` matrix.

    ``max(m, n) * eps(float32)``, as ``numpy.linalg.matrix_rank``, with the eps
    of float32 because adapters and checkpoints arrive in float32 or lower: a
    LoRA delta materialised in float32 has noise singular values around
    ``eps32 * sigma_max`` that must not count.
    """
    return max(int(shape[0]), int(shape[1])) * torch.finfo(torch.float32).eps


def numerical_rank(s: torch.Tensor, shape: Sequence[int]) -> int:
    """Number of singular values ``s`` (descending) above ``rank_rtol(shape) * s[0]``."""
    if s.numel() == 0:
        return 0
    top = float(s[0])
    if not top > 0.0:
        return 0
    return int((s > rank_rtol(shape) * top).sum())


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``x = U diag(S) Vh`` (descending ``S``)."""
    return torch.linalg.svd(x, full_matrices=False)


def polar_factor(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``x = P diag(s) Q^T``: the matrix
    with orthonormal columns nearest to ``x`` (orthogonal Procrustes).

    Variant: components whose singular value is below the numerical-rank
    threshold of ``shape`` are dropped (a partial isometry), so that a
    rank-deficient stack gives a unique, basis-independent answer instead of
    LAPACK's arbitrary completion.
    """
    if x.shape[1] == 0:
        return x.clone()
    p, s, qh = svd(x)
    k = numerical_rank(s, shape)
    return p[:, :k] @ qh[:k, :]


def truncated(
    x: torch.Tensor, k: int, shape: Sequence[int], *, cap: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``min(k, numerical rank)`` singular triplets of ``x``: ``(U, S, V)``
    with ``V`` as columns (``x ~ U diag(S) V^T``). ``cap=False``: the top ``k``
    whatever their singular values (as the released SVD-merging codes)."""
    u, s, vh = svd(x)
    k = max(0, min(int(k), numerical_rank(s, shape) if cap else s.numel()))
    return u[:, :k], s[:k], vh[:k, :].T


def stacked_qr(lora: Sequence[LoRAFactors], dtype: torch.dtype = FACTOR_DTYPE):
    """Thin QR of the stacked factors: ``[B_1..B_N] = Q_B R_B`` (scales folded
    into B) and ``[A_1^T..A_N^T] = Q_A R_A``. Returns ``(Q_B, R_B, Q_A, R_A,
    slices)`` where ``slices[i]`` selects input i's columns of ``R_B``/``R_A``."""
    bs = [f.B_scaled.to(dtype) for f in lora]
    ats = [f.A.to(dtype).T for f in lora]
    qb, rb = torch.linalg.qr(torch.cat(bs, dim=1), mode="reduced")
    qa, ra = torch.linalg.qr(torch.cat(ats, dim=1), mode="reduced")
    slices, start = [], 0
    for f in lora:
        slices.append(slice(start, start + f.rank))
        start += f.rank
    return qb, rb, qa, ra, slices


def factor_cores(
    lora: Sequence[LoRAFactors], dtype: torch.dtype = FACTOR_DTYPE
) -> tuple[Frame, list[torch.Tensor]]:
    """The frame and the cores ``C_i`` with ``delta_i = Q_B C_i Q_A^T`` exactly."""
    qb, rb, qa, ra, slices = stacked_qr(lora, dtype)
    cores = [rb[:, sl] @ ra[:, sl].T for sl in slices]
    shape = (lora[0].B.shape[0], lora[0].A.shape[1])
    return Frame(shape, qb, qa), cores


def module_cores(inputs: ModuleInputs, *, factor: bool | None = None) -> tuple[Frame, list[torch.Tensor]]:
    """Cores of a module's inputs: factor space for LoRA (unless ``factor`` is
    False), the dense deltas themselves (identity frame) otherwise."""
    use_factor = inputs.kind == "lora" if factor is None else (factor and inputs.kind == "lora")
    if use_factor:
        return factor_cores(inputs.lora)
    deltas = [d.to(DENSE_DTYPE) for d in inputs.deltas()]
    return Frame(tuple(deltas[0].shape)), deltas


def lift(frame: Frame, core: torch.Tensor, info: dict | None = None) -> MergeResult:
    """Map a merged core back: ``LowRank`` on a factor frame (rank = numerical
    rank of the core, at least 1), ``Dense`` on the identity frame. float32."""
    info = dict(info or {})
    if not frame.is_factor:
        return Dense(core.to(torch.float32).contiguous(), info={**info, "path": "dense"})
    u, s, vh = svd(core)
    k = max(1, numerical_rank(s, frame.shape))
    B = frame.QB @ (u[:, :k] * s[:k])
    A = vh[:k, :] @ frame.QA.T
    return LowRank(
        A=A.to(torch.float32).contiguous(),
        B=B.to(torch.float32).contiguous(),
        info={**info, "path": "factor", "rank": k},
    )


def weighted(cores: list[torch.Tensor], weights: Sequence[float] | None) -> list[torch.Tensor]:
    """``w_i * C_i`` (unchanged when ``weights`` is None)."""
    if weights is None:
        return list(cores)
    return [c * float(w) for c, w in zip(cores, weights)]


__all__ = [
    "Frame",
    "factor_cores",
    "lift",
    "module_cores",
    "numerical_rank",
    "polar_factor",
    "rank_rtol",
    "stacked_qr",
    "svd",
    "truncated",
    "weighted",
]
