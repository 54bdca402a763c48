"""SVD-based merges: TSV-Merge, Iso-C and Iso-CTS.

``spectrum=full`` (default, the released codes): every method works on the
dense ``d_out x d_in`` deltas (LoRA deltas materialised in float32, one module
at a time) and uses all ``min(d_out, d_in)`` singular directions; it returns
``Dense``. On LoRA deltas of rank r the directions beyond r are a basis of a
null space, which LAPACK picks (it differs between CPU and GPU libraries), so
there the reference itself is not well defined: we compute what it computes
with ``torch.linalg.svd`` and document the gap to the basis-free variant.

``spectrum=numerical_rank``: only the directions above the numerical rank
threshold of ``_lowrank.numerical_rank``. These are rotation-equivariant, so
on LoRA inputs they run on the small cores of :mod:`._lowrank` (QR of the
stacked factors, SVDs of at most ``N r x N r`` matrices) and return
``LowRank``; on full-rank checkpoints they equal ``spectrum=full``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

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

Spectrum = Literal["full", "numerical_rank"]


def _frame(inputs: ModuleInputs, spectrum: str):
    return module_cores(inputs, factor=spectrum == "numerical_rank")


def _svd_note(method: str, spectrum: str, kind: str, shapes, svds_per_module) -> str | None:
    """The cost of dense SVDs (spectrum=full, or checkpoints), said before a merge:
    ~10 m n min(m, n) flops per SVD at half the measured matmul rate (which
    matches the 40 s of one 4096x4096 float32 SVD measured on 2 cores)."""
    if spectrum != "full" and kind == "lora":
        return None
    mats = [s for s in shapes if len(s) == 2]
    flops = sum(svds_per_module * 10.0 * a * b * min(a, b) for a, b in mats)
    if flops < 5e11:
        return None
    from .wudi import _human, _matmul_rate

    secs = flops / (0.5 * _matmul_rate("cpu"))
    hint = " spectrum=numerical_rank works in factor space on LoRA (seconds)" if kind == "lora" else ""
    return (
        f"{method}: {svds_per_module} dense SVD{'s' if svds_per_module > 1 else ''} per module on "
        f"{len(mats)} matri{'ces' if len(mats) > 1 else 'x'}: "
        f"~{flops / 1e12:.3g} TFLOP, roughly {_human(secs)} on this CPU.{hint}"
    )


# --------------------------------------------------------------------------- TSV
@dataclass(frozen=True)
class TSVParams(MethodParams):
    """keep_fraction: fraction of ``min(d_out, d_in)`` singular triplets kept per
    task; None means ``1/N`` (the paper's choice, so the N blocks fill the space).
    scaling defaults to 1.0, the released ``svd_merging`` default (its
    scripts then sweep alpha on validation data; pass ``scaling``).
    spectrum: ``full`` (released code) or ``numerical_rank`` (see the module
    docstring)."""

    method: ClassVar[str] = "tsv"

    keep_fraction: float | None = None
    spectrum: Spectrum = "full"

    def plan_note(self, kind, shapes, n_inputs):
        return _svd_note(self.method, self.spectrum, kind, shapes, n_inputs + 2)

    def validate(self) -> None:
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            self._bad("keep_fraction", self.keep_fraction, "must be in (0, 1]")


def _tsv_core(
    cores: list[torch.Tensor], shape, keep_fraction: float | None, cap: bool = True
) -> torch.Tensor:
    n = len(cores)
    frac = keep_fraction if keep_fraction is not None else 1.0 / n
    k = max(1, int(min(shape) * frac + 1e-9))
    us, ss, vs = [], [], []
    for c in cores:
        u, s, v = truncated(c, k, shape, cap=cap)  # cap: at this delta's numerical rank
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
    lowrank_on_lora=lambda p: p.spectrum == "numerical_rank",
)
def tsv(inputs: ModuleInputs, params: TSVParams, *, generator: torch.Generator) -> MergeResult:
    """TSV-Merge (Gargiulo et al., CVPR 2025).

    Formula: for each task ``tau_i = U_i S_i V_i^T`` keep the top
    ``k_i = min(floor(min(m, n) / N), rank(tau_i))`` triplets; stack
    ``U = [U_1,k .. U_N,k]``, ``S = [S_1,k .. S_N,k]``, ``V = [V_1,k .. V_N,k]``;
    decorrelate with the orthogonal polar factors ``U_hat = P_U Q_U^T``
    (``U = P_U Sigma Q_U^T``), ``V_hat`` likewise; merged
    ``= scaling * U_hat diag(S) V_hat^T``. ``weights`` multiply each ``tau_i``
    first.

    Reference: https://arxiv.org/abs/2412.00081

    Reference: ``compute_and_sum_svd_mem_reduction`` of
    github.com/AntoAndGar/task_singular_vectors (and MLLMerging's
    ``svd_merging``): ``k = int(min(m, n) / N)`` triplets of each dense task
    vector, polar factors by SVD. The default (spectrum=full) computes it; the
    polar factor drops directions of the stack below the numerical rank (the
    reference's zero-padded columns, which meet zero singular values).
    Variant ``spectrum=numerical_rank``: ``k`` capped at each delta's numerical
    rank (a LoRA delta of rank r has r meaningful triplets; the reference pads
    with null-space directions that then shape the polar factor), in factor
    space on LoRA (``LowRank``). Measured gap to the default on LoRA: 0.59
    relative Frobenius (issue 11); 0 on full-rank checkpoints.
    """
    params.check_inputs(inputs.n)
    frame, cores = _frame(inputs, params.spectrum)
    core = _tsv_core(
        weighted(cores, params.weights),
        frame.shape,
        params.keep_fraction,
        cap=params.spectrum == "numerical_rank",
    )
    return lift(frame, core * params.scaling, {"method": "tsv"})


# --------------------------------------------------------------------------- Iso-C
@dataclass(frozen=True)
class IsoCParams(MethodParams):
    """scaling defaults to 1.5: flattening the spectrum shrinks the Frobenius
    norm (``mean(s) sqrt(k) <= ||s||``), so the Iso paper selects alpha > 1 on
    validation data (searched over [0, 3]); 1.5 is the value FusionBench uses for
    its Iso-C/Iso-CTS reproductions and the top of the second seed paper's grid.
    spectrum: ``full`` (released code) or ``numerical_rank`` (module docstring)."""

    method: ClassVar[str] = "iso_c"

    scaling: float = 1.5
    spectrum: Spectrum = "full"

    def plan_note(self, kind, shapes, n_inputs):
        return _svd_note(self.method, self.spectrum, kind, shapes, 1)


def _iso_c_core(cores: list[torch.Tensor], shape, full: bool = False) -> torch.Tensor:
    total = torch.stack(cores).sum(0)
    u, s, vh = svd(total)
    r = s.numel() if full else numerical_rank(s, shape)
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
    lowrank_on_lora=lambda p: p.spectrum == "numerical_rank",
)
def iso_c(inputs: ModuleInputs, params: IsoCParams, *, generator: torch.Generator) -> MergeResult:
    """Iso-C (Marczak et al., ICML 2025).

    Formula: ``T = sum_i w_i tau_i = U diag(s) V^T`` over all ``r = min(m, n)``
    directions (spectrum=full) or the numerical rank ``r`` of ``T``
    (numerical_rank); merged ``= scaling * mean(s_1..s_r) * U_r V_r^T``.

    Reference: ``iso_c`` in ``src/utils/iso.py`` of github.com/danielm1405/
    iso-merging (and MLLMerging's ``iso_merging``); the default computes it.
    On a LoRA sum of rank ``N r`` it is full-rank: the ``min(m, n) - N r``
    null-space directions of ``T`` (a LAPACK-chosen basis) each get the mean
    singular value (which averages in the zeros), so more of the update's norm
    lies outside the LoRA subspace than inside.
    Variant ``spectrum=numerical_rank``: the mean and ``U V^T`` over the
    numerical rank only; on LoRA: factor space, ``LowRank`` of rank
    ``rank(T) <= N r``. Measured gap to the default on LoRA: 1.3 relative
    Frobenius (issue 11); 0 on full-rank checkpoints.
    """
    params.check_inputs(inputs.n)
    frame, cores = _frame(inputs, params.spectrum)
    core = _iso_c_core(weighted(cores, params.weights), frame.shape, full=params.spectrum == "full")
    return lift(frame, core * params.scaling, {"method": "iso_c"})


# --------------------------------------------------------------------------- Iso-CTS
@dataclass(frozen=True)
class IsoCTSParams(MethodParams):
    """common_fraction: share of the kept dimensions (the numerical rank of the
    sum) given to the common subspace; the rest is split equally among tasks.
    scaling defaults to 1.5, as Iso-C (see IsoCParams).
    spectrum: ``full`` (released code: ``min(m, n)`` dimensions are split) or
    ``numerical_rank`` (the numerical rank of the sum is split)."""

    method: ClassVar[str] = "iso_cts"

    scaling: float = 1.5
    common_fraction: float = 0.8
    spectrum: Spectrum = "full"

    def plan_note(self, kind, shapes, n_inputs):
        return _svd_note(self.method, self.spectrum, kind, shapes, n_inputs + 3)

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
    cores: list[torch.Tensor], shape, common_fraction: float, full: bool = False
) -> tuple[torch.Tensor, dict]:
    n = len(cores)
    total = torch.stack(cores).sum(0)
    u, s, vh = svd(total)
    r = s.numel() if full else numerical_rank(s, shape)
    if r == 0:
        return torch.zeros_like(total), {"common_dims": 0, "task_dims": 0}
    kc, kt = iso_cts_dims(r, n, common_fraction)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc, :].T
    us, ss, vs = [], [], []
    for c in cores:
        # project out the common (left) subspace; full: the released code's
        # association (on LoRA deltas its rounding picks the null-space basis)
        resid = c - uc @ uc.T @ c if full else c - uc @ (uc.T @ c)
        ut, st, vt = truncated(resid, kt, shape, cap=not full)
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
    lowrank_on_lora=lambda p: p.spectrum == "numerical_rank",
)
def iso_cts(inputs: ModuleInputs, params: IsoCTSParams, *, generator: torch.Generator) -> MergeResult:
    """Iso-CTS (Marczak et al., ICML 2025).

    Formula: ``T = sum_i w_i tau_i = U diag(s) V^T`` with numerical rank ``r``;
    ``(k_c, k_t) = iso_cts_dims(r, N, common_fraction)``; common subspace
    ``U_c = U[:, :k_c]``, ``V_c``, ``s_c``; for each task the residual
    ``tau_i - U_c U_c^T tau_i`` gives its top ``k_t`` triplets
    ``(U_i, s_i, V_i)``; stack ``U* = [U_1..U_N, U_c]``, ``V*`` likewise, ``s*``;
    merged ``= scaling * mean(s*) * polar(U*) polar(V*)^T``.

    Reference: ``iso_cts`` in ``src/utils/iso.py`` of github.com/danielm1405/
    iso-merging: ``min(m, n)`` dimensions split as ``iso_cts_dims``, the mean
    over all of them; the default (spectrum=full) computes it (its polar
    factors drop only directions below the numerical rank of the stack).
    Variant ``spectrum=numerical_rank``: the numerical rank ``r`` of the sum is
    split (for LoRA sums ``r <= N r_lora``; splitting ``min(m, n)`` fills the
    task blocks with null-space directions), task blocks are capped at each
    residual's numerical rank, the mean runs over the kept values only; factor
    space on LoRA (``LowRank``). Measured gap to the default on LoRA: 1.6
    relative Frobenius (issue 11); 0 on full-rank checkpoints.
    When ``k_t == 0`` (``common_fraction`` near 1) the result equals Iso-C.
    """
    params.check_inputs(inputs.n)
    frame, cores = _frame(inputs, params.spectrum)
    core, info = _iso_cts_core(
        weighted(cores, params.weights),
        frame.shape,
        params.common_fraction,
        full=params.spectrum == "full",
    )
    return lift(frame, core * params.scaling, {"method": "iso_cts", **info})
