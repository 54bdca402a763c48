"""Sparsified task arithmetic: TIES, DARE and DARE-TIES (one family, three names).

All three work on the dense per-module deltas ``delta_n = scale_n B_n A_n``
(materialised for one module at a time), never on A and B separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..types import Dense, MergeResult, ModuleInputs
from . import register
from ._ops import elect_sign, prune_magnitude, prune_random
from ._params import MethodParams


@dataclass(frozen=True)
class TiesParams(MethodParams):
    """prune_rate: fraction of each delta zeroed by magnitude (TIES keeps the top
    20%, so 0.8). majority_sign: ``total`` (sign of the sum) or ``frequency``."""

    method: ClassVar[str] = "ties"
    scaling: float = 1.0
    prune_rate: float = 0.8
    majority_sign: Literal["total", "frequency"] = "total"

    def validate(self) -> None:
        self._check_fraction("prune_rate")


@dataclass(frozen=True)
class DareParams(MethodParams):
    """drop_rate: probability of dropping each entry (DARE's p; 0.9 is the
    paper's typical rate). rescale: divide survivors by 1 - p. seed: RNG seed."""

    method: ClassVar[str] = "dare"
    scaling: float = 1.0
    drop_rate: float = 0.9
    rescale: bool = True
    seed: int = 0

    def validate(self) -> None:
        self._check_fraction("drop_rate")


@dataclass(frozen=True)
class DareTiesParams(DareParams):
    method: ClassVar[str] = "dare_ties"
    majority_sign: Literal["total", "frequency"] = "total"


def _sparsified(
    inputs: ModuleInputs, params: MethodParams, sparsify, *, elect: bool, sign_method: str = "total"
) -> MergeResult:
    """Sparsify each delta, then a weighted sum or TIES's elect + disjoint mean.

    Memory: one (N, d_out, d_in) buffer filled one delta at a time and then
    reused in place, plus the count: about N + 2 deltas at the peak.
    """
    w = params.weight_list(inputs.n)
    deltas = (f.delta() for f in inputs.lora) if inputs.kind == "lora" else iter(inputs.task_vectors)
    if not elect:
        merged = None
        for wi, d in zip(w, deltas):
            t = sparsify(d)
            merged = t.mul_(wi) if merged is None else merged.add_(t, alpha=wi)
        return Dense(merged.mul_(params.scaling))
    stacked = torch.empty((inputs.n, *inputs.shape), dtype=torch.float32)
    for i, d in enumerate(deltas):
        stacked[i] = sparsify(d)
    sign = elect_sign(stacked, sign_method) > 0
    count = torch.zeros(inputs.shape, dtype=stacked.dtype)
    for i, wi in enumerate(w):  # one task at a time: boolean masks of one delta only
        row = stacked[i]
        agree = torch.where(sign, row > 0, row < 0)  # zeros never agree
        count += agree
        row.masked_fill_(~agree, 0.0).mul_(wi)
    merged = stacked.sum(dim=0).div_(count.clamp_(min=1))
    return Dense(merged.mul_(params.scaling))


@register(
    "ties",
    params=TiesParams,
    summary="TIES: trim to top-k by magnitude, elect sign, disjoint mean (on dense deltas)",
    reference_url="https://arxiv.org/abs/2306.01708",
    min_inputs=2,
)
def ties(inputs: ModuleInputs, params: TiesParams, *, generator=None) -> MergeResult:
    """TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

    ``t_n = trim(delta_n)`` (keep the top ``1 - prune_rate`` by magnitude, per
    tensor); ``gamma = sign(sum_n t_n)``; ``delta_m = lambda * sum_n w_n t_n [sign
    t_n = gamma] / #{n : sign t_n = gamma}``.
    Variant: equals ``peft.utils.merge_utils.ties(deltas, weights, density=1 -
    prune_rate, majority_sign_method)`` times ``scaling``: per-tensor top-k, sign
    elected on the *unweighted* trimmed deltas (0 votes elect +), divided by the
    *count* of agreeing entries (>= 1).
    """
    return _sparsified(
        inputs, params, lambda d: prune_magnitude(d, params.prune_rate), elect=True,
        sign_method=params.majority_sign,
    )


@register(
    "dare",
    params=DareParams,
    summary="DARE + task arithmetic: random drop p, rescale 1/(1-p), weighted sum",
    reference_url="https://arxiv.org/abs/2311.03099",
)
def dare(inputs: ModuleInputs, params: DareParams, *, generator: torch.Generator) -> MergeResult:
    """DARE (Yu et al., ICML 2024, arXiv 2311.03099) followed by task arithmetic.

    ``t_n = m_n * delta_n / (1 - p)``, ``m_n ~ Bernoulli(1 - p)`` elementwise;
    ``delta_m = lambda * sum_n w_n t_n``.
    Variant: as peft's ``dare_linear``; the masks come from a generator seeded by
    (seed, module name), drawn for the inputs in order, so a merge is reproducible.
    """
    return _sparsified(
        inputs, params, lambda d: prune_random(d, params.drop_rate, generator, rescale=params.rescale),
        elect=False,
    )


@register(
    "dare_ties",
    params=DareTiesParams,
    summary="DARE-TIES: random drop + rescale, then TIES sign election and disjoint mean",
    reference_url="https://arxiv.org/abs/2311.03099",
    min_inputs=2,
)
def dare_ties(inputs: ModuleInputs, params: DareTiesParams, *, generator: torch.Generator) -> MergeResult:
    """DARE-TIES: DARE's random drop and rescale in place of TIES's trim.

    Variant: as peft's ``dare_ties`` (sign elected on the unweighted rescaled
    deltas, count denominator), with our seeded generator.
    """
    return _sparsified(
        inputs, params, lambda d: prune_random(d, params.drop_rate, generator, rescale=params.rescale),
        elect=True, sign_method=params.majority_sign,
    )
