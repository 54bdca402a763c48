"""Linear merges: weight average and task arithmetic.

On LoRA inputs both are exact in factor form: ``sum_n c_n B_n A_n`` equals the
product of the concatenations ``[c_1 B_1, ..., c_N B_N] @ [A_1; ...; A_N]``
(rank ``sum_n r_n``), so no dense delta is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..types import Dense, LowRank, MergeResult, ModuleInputs
from . import register
from ._params import MethodParams


@dataclass(frozen=True)
class TaskArithmeticParams(MethodParams):
    """scaling: lambda (Ilharco et al. tune it on validation data; 1.0 adds the
    deltas unchanged). weights: per-input coefficients (default 1)."""

    method: ClassVar[str] = "ta"
    scaling: float = 1.0


@dataclass(frozen=True)
class WeightAverageParams(MethodParams):
    """weights: per-input weights, normalised to sum to 1 (default uniform)."""

    method: ClassVar[str] = "wa"
    scaling: float = 1.0

    def validate(self) -> None:
        if self.weights is not None and sum(self.weights) <= 0:
            self._bad("weights", self.weights, "must have a positive sum")

    def needs_base(self) -> bool:
        """``theta_0 + lambda sum_n w_n tau_n / sum_n w_n`` is ``sum_n w_n theta_n /
        sum_n w_n`` for lambda = 1: no base. (The ``nonlinear=average`` tensors
        get ``mean_n theta_n``, no base either.)"""
        return self.scaling != 1.0


def linear_coefficients(params: MethodParams, n: int, *, normalise: bool) -> list[float]:
    w = params.weight_list(n)
    if normalise:
        total = sum(w)
        w = [x / total for x in w]
    return [params.scaling * x for x in w]


def linear_combination(inputs: ModuleInputs, coeffs: list[float]) -> MergeResult:
    """``sum_n c_n delta_n``; LowRank by concatenation on LoRA inputs:
    ``A = [A_1; ...; A_N]`` as the factors come (stored dtype or float32),
    ``B = [c_1 s_1 B_1, ..., c_N s_N B_N]`` computed in float32."""
    if inputs.kind == "lora":
        A = torch.cat([f.A for f in inputs.lora], dim=0)
        # One concatenation, then one float32 pass scaling adapter n's columns by c_n s_n:
        # the same products as scaling each B_n, without a float32 copy per adapter.
        B = torch.cat([f.B for f in inputs.lora], dim=1).float()
        col = torch.cat(
            [torch.full((f.rank,), c * f.scale, dtype=torch.float32) for c, f in zip(coeffs, inputs.lora)]
        )
        B.mul_(col)
        return LowRank(A=A, B=B)
    delta = torch.zeros_like(inputs.task_vectors[0])
    for c, tau in zip(coeffs, inputs.task_vectors):
        delta.add_(tau, alpha=c)
    return Dense(delta)


@register(
    "ta",
    params=TaskArithmeticParams,
    summary="Task arithmetic: lambda * sum_n w_n delta_n (exact low-rank on LoRA)",
    reference_url="https://arxiv.org/abs/2212.04089",
    lowrank_on_lora=True,
    elementwise=True,
    stored_dtype=True,
    pointwise=True,
)
def task_arithmetic(inputs: ModuleInputs, params: TaskArithmeticParams, *, generator=None) -> MergeResult:
    """Task arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089).

    ``delta_m = lambda * sum_n w_n delta_n`` with ``delta_n = scale_n B_n A_n``.
    Variant: weights default to 1; on LoRA the result is the exact rank-sum(r_n)
    concatenation, not an SVD approximation.
    """
    return linear_combination(inputs, linear_coefficients(params, inputs.n, normalise=False))


@register(
    "wa",
    params=WeightAverageParams,
    summary="Weight average: lambda * sum_n w_n delta_n / sum_n w_n (model soup)",
    reference_url="https://arxiv.org/abs/2203.05482",
    lowrank_on_lora=True,
    elementwise=True,
    stored_dtype=True,
    pointwise=True,
)
def weight_average(inputs: ModuleInputs, params: WeightAverageParams, *, generator=None) -> MergeResult:
    """Weight averaging / model soup (Wortsman et al., ICML 2022, arXiv 2203.05482).

    ``theta_m = theta_0 + lambda * sum_n w_n tau_n / sum_n w_n``, i.e. the
    average of the fine-tuned models for lambda = 1 and uniform weights.
    Variant: on LoRA, the average of the dense updates ``scale_n B_n A_n``
    (exact, by concatenation), not the average of A and of B separately.
    """
    return linear_combination(inputs, linear_coefficients(params, inputs.n, normalise=True))
