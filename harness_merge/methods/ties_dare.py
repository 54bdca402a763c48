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
from ._ops import (
    KeepRule,
    elect_sign,
    flat_blocks,
    keep_at_least,
    prune_magnitude,
    prune_random,
    released_threshold_zeros_first,
)
from ._params import MethodParams


@dataclass(frozen=True)
class TiesParams(MethodParams):
    """prune_rate: fraction of each delta zeroed by magnitude (TIES keeps the top
    20%, so 0.8). majority_sign: ``total`` (sign of the sum) or ``frequency``.
    keep_rule: ``exact`` (default, as peft: exactly floor((1-p) numel) entries,
    ties at the threshold drawn by a permutation seeded from ``seed``) or
    ``released`` (``|x| >= kthvalue``, every tie kept, as MLLMerging's
    ``ties_merging``)."""

    method: ClassVar[str] = "ties"
    scaling: float = 1.0
    prune_rate: float = 0.8
    majority_sign: Literal["total", "frequency"] = "total"
    keep_rule: KeepRule = "exact"
    seed: int = 0

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
    """Defaults of MLLMerging's "TIES w/ DARE" (``LLaMA-Factory/model_merging.py``,
    ``merge_models(merge_method="dare ties")``): DARE with drop_rate 0.2 and
    rescale, then full TIES with its magnitude trim.

    prune_rate: TIES trim after DARE (0.8 keeps the top 20%); 0 skips the trim,
    which is peft's ``dare_ties``. keep_rule: as TiesParams, default
    ``released`` (the reference's ``>= kthvalue``). zero_sign: the sign elected
    where the vote is 0: ``majority`` (the reference: the sign of the sum of the
    elected signs of the tensor) or ``positive`` (peft)."""

    method: ClassVar[str] = "dare_ties"
    drop_rate: float = 0.2
    prune_rate: float = 0.8
    majority_sign: Literal["total", "frequency"] = "total"
    keep_rule: KeepRule = "released"
    zero_sign: Literal["majority", "positive"] = "majority"

    def validate(self) -> None:
        super().validate()
        self._check_fraction("prune_rate")


def _sparsified(
    inputs: ModuleInputs,
    params: MethodParams,
    sparsify,
    *,
    elect: bool,
    sign_method: str = "total",
    zero_sign: str = "positive",
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
    sign = elect_sign(stacked, sign_method, zero_sign)
    # The disjoint mean is entry by entry: done in flat blocks of every input (temporaries
    # of cache size; each block summed over the inputs as the whole stack is), the same numbers.
    flat, flat_sign = stacked.view(inputs.n, -1), sign.reshape(-1)
    merged = torch.empty(flat.shape[1], dtype=stacked.dtype)
    for s, e in flat_blocks(flat.shape[1]):
        blk, sg = flat[:, s:e], flat_sign[s:e]
        count = torch.zeros(e - s, dtype=stacked.dtype)
        for i, wi in enumerate(w):  # one task at a time
            row = blk[i]
            agree = torch.mul(row, sg).gt_(
                0
            )  # 1.0 where it agrees, else 0.0 (zeros and an elected 0 never do)
            count += agree
            # row where it agrees, else +0: x * 1 = x; x * 0 = +-0, and +-0 + 0.0 = +0 (a masked fill's zeros)
            row.mul_(agree).add_(0.0)
            if wi != 1.0:  # x * 1.0 is x
                row.mul_(wi)
        merged[s:e] = blk.sum(dim=0).div_(count.clamp_(min=1))
    return Dense(merged.view(inputs.shape).mul_(params.scaling))


@register(
    "ties",
    params=TiesParams,
    summary="TIES: trim to top-k by magnitude, elect sign, disjoint mean (on dense deltas)",
    reference_url="https://arxiv.org/abs/2306.01708",
    min_inputs=2,
    elementwise=True,
)
def ties(
    inputs: ModuleInputs, params: TiesParams, *, generator: torch.Generator | None = None
) -> MergeResult:
    """TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

    ``t_n = trim(delta_n)`` (keep the top ``1 - prune_rate`` by magnitude, per
    tensor); ``gamma = sign(sum_n t_n)``; ``delta_m = lambda * sum_n w_n t_n [sign
    t_n = gamma] / #{n : sign t_n = gamma}``.
    Variant: equals ``peft.utils.merge_utils.ties(deltas, weights, density=1 -
    prune_rate, majority_sign_method)`` times ``scaling``: per-tensor top-k, sign
    elected on the *unweighted* trimmed deltas (0 votes elect +), divided by the
    *count* of agreeing entries (>= 1); ties at the trim threshold drawn by a
    seeded permutation (peft's ``topk`` takes an unspecified subset).
    ``keep_rule=released`` keeps every tie (MLLMerging's ``ties_merging``).
    """
    return _sparsified(
        inputs,
        params,
        lambda d: prune_magnitude(d, params.prune_rate, rule=params.keep_rule, generator=generator),
        elect=True,
        sign_method=params.majority_sign,
    )


@register(
    "dare",
    params=DareParams,
    summary="DARE + task arithmetic: random drop p, rescale 1/(1-p), weighted sum",
    reference_url="https://arxiv.org/abs/2311.03099",
    elementwise=True,
)
def dare(inputs: ModuleInputs, params: DareParams, *, generator: torch.Generator) -> MergeResult:
    """DARE (Yu et al., ICML 2024, arXiv 2311.03099) followed by task arithmetic.

    ``t_n = m_n * delta_n / (1 - p)``, ``m_n ~ Bernoulli(1 - p)`` elementwise;
    ``delta_m = lambda * sum_n w_n t_n``.
    Variant: as peft's ``dare_linear``; the masks come from a generator seeded by
    (seed, module name), drawn for the inputs in order, so a merge is reproducible.
    """
    return _sparsified(
        inputs,
        params,
        lambda d: prune_random(d, params.drop_rate, generator, rescale=params.rescale),
        elect=False,
    )


@register(
    "dare_ties",
    params=DareTiesParams,
    summary="DARE-TIES: random drop + rescale, then TIES (magnitude trim, sign election, disjoint mean)",
    reference_url="https://arxiv.org/abs/2311.03099",
    min_inputs=2,
    elementwise=True,
)
def dare_ties(inputs: ModuleInputs, params: DareTiesParams, *, generator: torch.Generator) -> MergeResult:
    """DARE-TIES: DARE's random drop and rescale, then TIES.

    ``d_n = m_n * delta_n / (1 - p)``; ``t_n = trim(d_n)`` (top ``1 - prune_rate``
    by magnitude, ``keep_rule``); ``gamma = sign(sum_n t_n)`` (0 votes:
    ``zero_sign``); ``delta_m = lambda * sum_n w_n t_n [sign t_n = gamma] /
    #{n : sign t_n = gamma}``.

    Reference: MLLMerging ``LLaMA-Factory/model_merging.py`` (github.com/
    WalkerWorldPeace/MLLMerging), ``merge_models("dare ties")``: DARE
    (``mask_input_with_mask_rate``, rate 0.2, rescale) then ``ties_merging``
    (``param_value_mask_rate=0.8``); the defaults compute it with our seeded
    masks in place of its unseeded ``torch.bernoulli``.
    Variant: ``prune_rate=0 zero_sign=positive`` is peft's ``dare_ties`` (no
    trim; measured gap to the default 0.57 relative Frobenius at p=0.2).
    """

    def sparsify(d: torch.Tensor) -> torch.Tensor:
        t = prune_random(d, params.drop_rate, generator, rescale=params.rescale)
        if params.prune_rate > 0:
            if params.keep_rule == "released" and t.dtype == torch.float32 and t.device.type == "cpu":
                # prune_magnitude's released path, its threshold counting DARE's zeros first
                # (the same threshold; no selection where the drop left >= j zeros)
                return keep_at_least(t, released_threshold_zeros_first(t, 1.0 - params.prune_rate))
            t = prune_magnitude(t, params.prune_rate, rule=params.keep_rule, generator=generator)
        return t

    return _sparsified(
        inputs,
        params,
        sparsify,
        elect=True,
        sign_method=params.majority_sign,
        zero_sign=params.zero_sign,
    )
