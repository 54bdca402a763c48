"""PCB-Merging: parameter competition balancing (element-wise, on dense deltas).

``scope=model`` (default, the released code) takes every statistic of a task
over the whole model (all modules the method runs on, flattened into one
vector per task); the merge driver streams the modules through the passes of
:func:`pcb_model_passes` (exact order statistics by radix selection, memory
bounded by one module plus the count tables), then merges module by module.
``scope=module`` takes them per module.

"The whole model" is every tensor the method runs on: the linear matrices
under ``nonlinear=average`` (embeddings, lm_head and norms are averaged and
left out of the statistics); every tensor under ``nonlinear=method``, which is
the released code's flattened checkpoint (less its ``remove_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import MethodParamError
from ..types import Dense, ModuleInputs
from . import StatPass, register
from . import _orderstat as ost
from ._params import MethodParams


@dataclass(frozen=True)
class PCBParams(MethodParams):
    """prune_rate: fraction of each task's entries dropped by their balance score
    (the paper's ratio r is the kept fraction, ``r = 1 - prune_rate``; the
    released code's default r = 0.1, so prune_rate = 0.9).
    clamp_ratio: fraction of each task's entries clamped at both ends of the
    magnitude distribution before scoring (released code: 1e-4).
    weights: per-task lambdas of the numerator (the paper's evolutionary search
    tunes them in [0.8, 1.3]; default 1).
    scope: ``model`` (released code: quantiles, min and max of each task over
    the whole model) or ``module`` (per module; measured gap 1.4 relative
    Frobenius, issue 11).
    """

    method: ClassVar[str] = "pcb"

    prune_rate: float = 0.9
    clamp_ratio: float = 1e-4
    scope: Literal["model", "module"] = "model"

    def validate(self) -> None:
        self._check_fraction("prune_rate")
        if not 0.0 <= self.clamp_ratio < 0.5:
            self._bad("clamp_ratio", self.clamp_ratio, "must be in [0, 0.5)")


def _sorted_at(x: torch.Tensor, idx: int) -> torch.Tensor:
    """Per row, the value at (0-based) index ``idx`` of the ascending sort,
    ``idx`` clipped to ``[0, d-1]``."""
    idx = min(max(int(idx), 0), x.shape[1] - 1)
    return torch.kthvalue(x, idx + 1, dim=1, keepdim=True).values


def _minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row to [0, 1]; a constant row becomes 0."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)


def pcb_balance(tv: torch.Tensor, prune_rate: float, clamp_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of PCB on an ``(N, D)`` stack of flattened task vectors.

    Returns ``(clamped, score)``: the outlier-clamped task vectors and the
    per-entry balance score after the drop (0 for dropped entries).
    """
    n, d = tv.shape
    mag = tv.abs()
    if clamp_ratio > 0:
        lo = _sorted_at(mag, int(d * clamp_ratio))
        hi = _sorted_at(mag, int(d * (1 - clamp_ratio)) - 1)
        mag = torch.minimum(torch.maximum(mag, lo), hi)
    clamped = torch.sign(tv) * mag
    intra = torch.exp(n * _minmax_rows(mag) ** 2)  # softmax(N * Norm(tau_i^2)) up to a per-task constant
    inter = torch.tanh(tv * tv.sum(dim=0, keepdim=True))  # released code: tanh(tau_i * sum_j tau_j)
    beta = intra * inter
    if prune_rate > 0:
        thr = _sorted_at(beta, int(d * prune_rate))
        beta = torch.maximum(beta, thr)  # everything below the (1-r) quantile -> 0 after Norm
    score = _minmax_rows(beta)
    return clamped, score


def _flat(mi: ModuleInputs) -> torch.Tensor:
    return torch.stack([d.to(torch.float32).reshape(-1) for d in mi.deltas()])


def _terms(tv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamp(tau), beta)`` of an (N, D) block with the per-task clamp bounds
    ``lo``/``hi`` (N,) of the whole scope (Norm of the clamped magnitudes is
    ``(m - lo) / (hi - lo)``: the bounds are its min and max)."""
    n = tv.shape[0]
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    mag = torch.minimum(torch.maximum(tv.abs(), lo), hi)
    span = hi - lo
    norm = torch.where(span > 0, (mag - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    beta = torch.exp(n * norm**2) * torch.tanh(tv * tv.sum(dim=0, keepdim=True))
    return torch.sign(tv) * mag, beta


def _clamp_ranks(d: int, clamp_ratio: float) -> tuple[int, int]:
    return int(d * clamp_ratio), int(d * (1 - clamp_ratio)) - 1


def pcb_model_passes(params: PCBParams) -> list[StatPass]:
    """The statistics passes of ``scope=model`` (none for ``scope=module``):
    exact clamp bounds of each task's ``|tau|`` over the model, then the exact
    drop threshold and the max of each task's ``beta``."""
    if params.scope != "model":
        return []

    def acc_high(state, mi, stats, rows):
        c = ost.count_high(rows)
        return (c, rows.shape[1]) if state is None else (state[0] + c, state[1] + rows.shape[1])

    def acc_low(state, rows, bins):
        c = ost.count_low(rows, bins)
        return c if state is None else [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(state, c)]

    def mag_high(state, mi, stats):
        return acc_high(state, mi, stats, _flat(mi).abs())

    def mag_high_done(state, stats):
        counts, d = state
        lo, hi = _clamp_ranks(d, params.clamp_ratio)
        return {"d": d, "mag_bins": ost.locate(counts, [[lo, hi]] * counts.shape[0])}

    def mag_low(state, mi, stats):
        return acc_low(state, _flat(mi).abs(), stats["mag_bins"])

    def mag_low_done(state, stats):
        v = torch.tensor(ost.resolve(stats["mag_bins"], state), dtype=torch.float32)
        return {"lo": v[:, 0].contiguous(), "hi": v[:, 1].contiguous()}

    def beta_high(state, mi, stats):
        _, beta = _terms(_flat(mi), stats["lo"], stats["hi"])
        top = beta.max(dim=1).values
        c, d = acc_high(None if state is None else state[:2], mi, stats, beta)
        return c, d, top if state is None else torch.maximum(state[2], top)

    def beta_high_done(state, stats):
        counts, d, top = state
        k = min(int(d * params.prune_rate), d - 1)
        return {"beta_bins": ost.locate(counts, [[k]] * counts.shape[0]), "bmax": top}

    def beta_low(state, mi, stats):
        _, beta = _terms(_flat(mi), stats["lo"], stats["hi"])
        return acc_low(state, beta, stats["beta_bins"])

    def beta_low_done(state, stats):
        v = torch.tensor(ost.resolve(stats["beta_bins"], state), dtype=torch.float32)
        return {"thr": v[:, 0].contiguous()}

    return [
        StatPass("pcb |tau| bins", mag_high, mag_high_done),
        StatPass("pcb |tau| quantiles", mag_low, mag_low_done),
        StatPass("pcb beta bins", beta_high, beta_high_done),
        StatPass("pcb beta threshold", beta_low, beta_low_done),
    ]


def _merge_model_scope(inputs: ModuleInputs, params: PCBParams, stats: dict) -> Dense:
    tv = _flat(inputs)
    clamped, beta = _terms(tv, stats["lo"], stats["hi"])
    thr, top = stats["thr"].unsqueeze(1), stats["bmax"].unsqueeze(1)
    span = top - thr
    score = torch.where(
        span > 0, (torch.maximum(beta, thr) - thr) / torch.where(span > 0, span, torch.ones_like(span)), 0.0
    )
    w = torch.tensor(params.weight_list(inputs.n), dtype=torch.float32).unsqueeze(1)
    merged = (w * clamped * score).sum(0) / score.sum(0).clamp(min=1e-12)
    return Dense(
        (merged * params.scaling).reshape(inputs.shape).contiguous(), info={"method": "pcb", "scope": "model"}
    )


@register(
    "pcb",
    params=PCBParams,
    summary="Parameter Competition Balancing: intra/inter-task balance, drop, rescale",
    reference_url="https://arxiv.org/abs/2410.02396",
    inputs=("lora", "dense"),
    min_inputs=2,
    elementwise=True,
    model_passes=pcb_model_passes,
)
def pcb(
    inputs: ModuleInputs, params: PCBParams, *, generator: torch.Generator, stats: dict | None = None
) -> Dense:
    """PCB-Merging (Du et al., NeurIPS 2024).

    Formula (per task i, over the entries of the module; ``Norm`` = min-max to
    [0, 1] per task): clamp ``|tau_i|`` to its [c, 1-c] quantiles;
    intra-balance ``b_intra = exp(N * Norm(|tau_i|)^2)`` (the paper's
    ``Softmax(N * Norm(tau_i * tau_i))`` up to a per-task constant, which the
    final ``Norm`` removes); inter-balance ``b_inter = tanh(tau_i * sum_j tau_j)``;
    ``beta_i = b_intra * b_inter``; drop: entries below the ``prune_rate``
    quantile of ``beta_i`` get score 0, ``s_i = Norm(max(beta_i, q))``;
    merged ``= scaling * sum_i w_i s_i clamp(tau_i) / sum_i s_i`` (denominator
    floored at 1e-12).

    Reference: ``PCB_merge`` in ``pcb-merging.py`` of github.com/duguodong7/
    pcb-merging, which runs on the whole model flattened into one vector per
    task: the default ``scope=model`` computes it (``stats`` from the driver's
    passes, see :func:`pcb_model_passes`); ``scope=module`` takes the
    quantiles, min and max per module instead.

    Variant: the released code, not the paper text: the
    paper's inter-balance is ``sum_j Softmax(Norm(tau_i * tau_j))``, the code's is
    ``tanh(tau_i * sum_j tau_j)``; the code also clamps 1e-4 outliers. The
    evolutionary search of per-task lambdas is not run (pass ``weights``).
    Element-wise, so LoRA deltas are materialised for this module (``Dense``).
    """
    params.check_inputs(inputs.n)
    if params.scope == "model":
        if stats is None:
            raise MethodParamError(
                f"pcb: module {inputs.name}: scope=model needs the model-wide statistics that the merge "
                f"driver (harness_merge.merge_loop.iter_merged) collects first; merge through it, or "
                f"pass scope=module for per-module statistics"
            )
        return _merge_model_scope(inputs, params, stats)
    deltas = [d.to(torch.float32) for d in inputs.deltas()]
    shape = deltas[0].shape
    tv = torch.stack([d.reshape(-1) for d in deltas])
    clamped, score = pcb_balance(tv, params.prune_rate, params.clamp_ratio)
    w = torch.tensor(params.weight_list(inputs.n), dtype=torch.float32).unsqueeze(1)
    merged = (w * clamped * score).sum(0) / score.sum(0).clamp(min=1e-12)
    return Dense((merged * params.scaling).reshape(shape).contiguous(), info={"method": "pcb"})
