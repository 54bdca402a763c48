"""SVD-based merges: TSV-Merge, Iso-C and Iso-CTS.

All three are rotation-equivariant, so on LoRA inputs they run on the small
cores of :mod:`._lowrank` (QR of the stacked factors, SVDs of at most
``N r x N r`` matrices) and return ``LowRank``; on full checkpoints they run
on the dense deltas and return ``Dense``. Both paths give the same delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..types import MergeResult, ModuleInputs
from . import register
from ._lowrank import (
    lift,
    module_cores,
    numerical_rank,
    polar_factor,
    svd,
    truncated,
    weighted,
)
from ._params import MethodParams


# --------------------------------------------------------------------------- TSV
@dataclass(frozen=True)
class TSVParams(MethodParams):
    """keep_fraction: fraction of ``min(d_out, d_in)`` singular triplets kept per
    task; None means ``1/N`` (the paper's choice, so the N blocks fill the space).
    scaling defaults to 1.0: TSV-M is reported without tuning alpha."""

    method: ClassVar[str] = "tsv"

    keep_fraction: float | None = None

    def validate(self) -> None:
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            self._bad("keep_fraction", self.keep_fraction, "must be in (0, 1]")


def _tsv_core(
    cores: list[torch.Tensor], shape, keep_fraction: float | None
) -> torch.Tensor:
    n = len(cores)
    frac = keep_fraction if keep_fraction is not None else 1.0 / n
    k = max(1, int(min(shape) * frac + 1e-9))
    us, ss, vs = [], [], []
    for c in cores:
        u, s, v = truncated(c, k, shape)  # k capped at this delta's numerical rank
        us.append(u)
        ss.append(s)
        vs.append(v)
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    if S.numel() == 0:
        return torch.zeros_like(cores[0])
    return polar_factor(U, shape) @ torch.diag(S) @ polar_factor(V, shape).T


@register(
    "tsv",
    params=TSVParams,
    summary="Task Singular Vectors: per-task top singular triplets, decorrelated by the polar factor",
    reference_url="https://arxiv.org/abs/2412.00081",
    inputs=("lora", "dense"),
    min_inputs=2,
    lowrank_on_lora=True,
)
def tsv(
    inputs: ModuleInputs, params: TSVParams, *, generator: torch.Generator
) -> MergeResult:
    """TSV-Merge (Gargiulo et al., CVPR 2025).

    Formula: for each task ``tau_i = U_i S_i V_i^T`` keep the top
    ``k_i = min(floor(min(m, n) / N), rank(tau_i))`` triplets; stack
    ``U = [U_1,k .. U_N,k]``, ``S = [S_1,k .. S_N,k]``, ``V = [V_1,k .. V_N,k]``;
    decorrelate with the orthogonal polar factors ``U_hat = P_U Q_U^T``
    (``U = P_U Sigma Q_U^T``), ``V_hat`` likewise; merged
    ``= scaling * U_hat diag(S) V_hat^T``. ``weights`` multiply each ``tau_i``
    first.

    Reference: https://arxiv.org/abs/2412.00081

    Variant: the released code's ``k = int(min(m, n) / N)``, additionally capped
    at each delta's numerical rank (a LoRA delta of rank r has only r
    meaningful triplets; the code would pad with noise directions), and the
    polar factor restricted to the numerical rank of the stack (see
    ``_lowrank.polar_factor``). On LoRA inputs the computation runs in factor
    space and returns ``LowRank``.
    """
    params.check_inputs(inputs.n)
    frame, cores = module_cores(inputs)
    core = _tsv_core(weighted(cores, params.weights), frame.shape, params.keep_fraction)
    return lift(frame, core * params.scaling, {"method": "tsv"})


# --------------------------------------------------------------------------- Iso-C
@dataclass(frozen=True)
class IsoCParams(MethodParams):
    """scaling defaults to 1.5: flattening the spectrum shrinks the Frobenius
    norm (``mean(s) sqrt(k) <= ||s||``), so the Iso paper selects alpha > 1 on
    validation data (searched over [0, 3]); 1.5 is the value FusionBench uses for
    its Iso-C/Iso-CTS reproductions and the top of the second seed paper's grid."""

    method: ClassVar[str] = "iso_c"

    scaling: float = 1.5


def _iso_c_core(cores: list[torch.Tensor], shape) -> torch.Tensor:
    total = torch.stack(cores).sum(0)
    u, s, vh = svd(total)
    r = numerical_rank(s, shape)
    if r == 0:
        return torch.zeros_like(total)
    return s[:r].mean() * (u[:, :r] @ vh[:r, :])


@register(
    "iso_c",
    params=IsoCParams,
    summary="Isotropic merging in the common subspace: sum of deltas with a flat spectrum",
    reference_url="https://arxiv.org/abs/2502.04959",
    inputs=("lora", "dense"),
    min_inputs=2,
    lowrank_on_lora=True,
)
def iso_c(
    inputs: ModuleInputs, params: IsoCParams, *, generator: torch.Generator
) -> MergeResult:
    """Iso-C (Marczak et al., ICML 2025).

    Formula: ``T = sum_i w_i tau_i = U diag(s) V^T``; with ``r`` the numerical
    rank of ``T``, merged ``= scaling * mean(s_1..s_r) * U_r V_r^T``.

    Reference: https://arxiv.org/abs/2502.04959

    Variant: the mean is over the numerical rank of the sum, not over all
    ``min(m, n)`` singular values as in the released code (identical for
    full-rank sums; for LoRA sums of rank ``N r`` the released code would
    average in ``min(m, n) - N r`` zeros and shrink the update by that factor).
    On LoRA inputs: factor space, ``LowRank`` of rank ``rank(T) <= N r``.
    """
    params.check_inputs(inputs.n)
    frame, cores = module_cores(inputs)
    core = _iso_c_core(weighted(cores, params.weights), frame.shape)
    return lift(frame, core * params.scaling, {"method": "iso_c"})


# --------------------------------------------------------------------------- Iso-CTS
@dataclass(frozen=True)
class IsoCTSParams(MethodParams):
    """common_fraction: share of the kept dimensions (the numerical rank of the
    sum) given to the common subspace; the rest is split equally among tasks.
    scaling defaults to 1.5, as Iso-C (see IsoCParams)."""

    method: ClassVar[str] = "iso_cts"

    scaling: float = 1.5
    common_fraction: float = 0.8

    def validate(self) -> None:
        if not 0.0 < self.common_fraction < 1.0:
            self._bad("common_fraction", self.common_fraction, "must be in (0, 1)")


def iso_cts_dims(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(k_common, k_per_task)`` for ``rank`` kept dimensions, as the released
    code: ``k_c = int(rank * f)``, ``k_t = round((rank - k_c) / N)``, then
    ``k_c = rank - N k_t`` so that the blocks fill ``rank`` exactly
    (``k_t`` capped at ``rank // N`` so that ``k_c >= 0``)."""
    kc = int(rank * common_fraction)
    kt = min(round((rank - kc) / n_tasks), rank // n_tasks)
    return rank - n_tasks * kt, kt


def _iso_cts_core(
    cores: list[torch.Tensor], shape, common_fraction: float
) -> tuple[torch.Tensor, dict]:
    n = len(cores)
    total = torch.stack(cores).sum(0)
    u, s, vh = svd(total)
    r = numerical_rank(s, shape)
    if r == 0:
        return torch.zeros_like(total), {"common_dims": 0, "task_dims": 0}
    kc, kt = iso_cts_dims(r, n, common_fraction)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc, :].T
    us, ss, vs = [], [], []
    for c in cores:
        resid = c - uc @ (uc.T @ c)  # project out the common (left) subspace
        ut, st, vt = truncated(resid, kt, shape)
        us.append(ut)
        ss.append(st)
        vs.append(vt)
    U = torch.cat(us + [uc], 1)
    S = torch.cat(ss + [sc])
    V = torch.cat(vs + [vc], 1)
    core = S.mean() * (polar_factor(U, shape) @ polar_factor(V, shape).T)
    return core, {"common_dims": kc, "task_dims": int(S.numel()) - kc}


@register(
    "iso_cts",
    params=IsoCTSParams,
    summary="Isotropic merging in common and task-specific subspaces, flat spectrum",
    reference_url="https://arxiv.org/abs/2502.04959",
    inputs=("lora", "dense"),
    min_inputs=2,
    lowrank_on_lora=True,
)
def iso_cts(
    inputs: ModuleInputs, params: IsoCTSParams, *, generator: torch.Generator
) -> MergeResult:
    """Iso-CTS (Marczak et al., ICML 2025).

    Formula: ``T = sum_i w_i tau_i = U diag(s) V^T`` with numerical rank ``r``;
    ``(k_c, k_t) = iso_cts_dims(r, N, common_fraction)``; common subspace
    ``U_c = U[:, :k_c]``, ``V_c``, ``s_c``; for each task the residual
    ``tau_i - U_c U_c^T tau_i`` gives its top ``k_t`` triplets
    ``(U_i, s_i, V_i)``; stack ``U* = [U_1..U_N, U_c]``, ``V*`` likewise, ``s*``;
    merged ``= scaling * mean(s*) * polar(U*) polar(V*)^T``.

    Reference: https://arxiv.org/abs/2502.04959

    Variant: the released code splits ``min(m, n)`` dimensions; here the
    numerical rank ``r`` of the sum is split (for LoRA sums ``r <= N r_lora``;
    splitting ``min(m, n)`` would fill the task blocks with noise), task blocks
    are capped at each residual's numerical rank, the mean runs over the kept
    values only, and the polar factors are restricted to the numerical rank.
    When ``k_t == 0`` (``common_fraction`` near 1) the result equals Iso-C.
    """
    params.check_inputs(inputs.n)
    frame, cores = module_cores(inputs)
    core, info = _iso_cts_core(
        weighted(cores, params.weights), frame.shape, params.common_fraction
    )
    return lift(frame, core * params.scaling, {"method": "iso_cts", **info})
