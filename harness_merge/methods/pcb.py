"""PCB-Merging: parameter competition balancing (element-wise, on dense deltas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..types import Dense, ModuleInputs
from . import register
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
    """

    method: ClassVar[str] = "pcb"

    prune_rate: float = 0.9
    clamp_ratio: float = 1e-4

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
    return torch.where(
        span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0
    )


def pcb_balance(
    tv: torch.Tensor, prune_rate: float, clamp_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
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
    intra = torch.exp(
        n * _minmax_rows(mag) ** 2
    )  # softmax(N * Norm(tau_i^2)) up to a per-task constant
    inter = torch.tanh(
        tv * tv.sum(dim=0, keepdim=True)
    )  # released code: tanh(tau_i * sum_j tau_j)
    beta = intra * inter
    if prune_rate > 0:
        thr = _sorted_at(beta, int(d * prune_rate))
        beta = torch.maximum(
            beta, thr
        )  # everything below the (1-r) quantile -> 0 after Norm
    score = _minmax_rows(beta)
    return clamped, score


@register(
    "pcb",
    params=PCBParams,
    summary="Parameter Competition Balancing: intra/inter-task balance, drop, rescale",
    reference_url="https://arxiv.org/abs/2410.02396",
    inputs=("lora", "dense"),
    min_inputs=2,
    elementwise=True,
)
def pcb(
    inputs: ModuleInputs, params: PCBParams, *, generator: torch.Generator
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

    Reference: https://arxiv.org/abs/2410.02396

    Variant: the released code (``pcb-merging.py``), not the paper text: the
    paper's inter-balance is ``sum_j Softmax(Norm(tau_i * tau_j))``, the code's is
    ``tanh(tau_i * sum_j tau_j)``; the code also clamps 1e-4 outliers. The
    evolutionary search of per-task lambdas is not run (pass ``weights``).
    Element-wise, so LoRA deltas are materialised for this module (``Dense``).
    """
    params.check_inputs(inputs.n)
    deltas = [d.to(torch.float32) for d in inputs.deltas()]
    shape = deltas[0].shape
    tv = torch.stack([d.reshape(-1) for d in deltas])
    clamped, score = pcb_balance(tv, params.prune_rate, params.clamp_ratio)
    w = torch.tensor(params.weight_list(inputs.n), dtype=torch.float32).unsqueeze(1)
    merged = (w * clamped * score).sum(0) / score.sum(0).clamp(min=1e-12)
    return Dense(
        (merged * params.scaling).reshape(shape).contiguous(), info={"method": "pcb"}
    )
