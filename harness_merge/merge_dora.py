"""Merging DoRA adapters: the direction through the LoRA path, the magnitude by one rule.

A DoRA module of adapter n is ``W_n = m_n * (W0 + s_n B_n A_n) / ||W0 + s_n B_n A_n||_row``
(magnitude ``m_n``, one entry per output feature; row norms as PEFT computes
them for Linear layers). Every method merges DoRA adapters the same way:

1. **direction**: the method runs on the LoRA factors ``(A_n, B_n, s_n)``
   exactly as for plain LoRA adapters (its pruning, scaling, lambda, ...) and
   returns the direction update ``dV`` (``LowRank`` or ``Dense``);
2. **magnitude**: the vectors ``m_n`` are 1-D tensors and get the policy
   :mod:`harness_merge.merge_loop` applies to every 1-D tensor: the plain
   average ``m = mean_n m_n`` (no lambda, no weights, no pruning);
3. the merged module is ``W = m * (W0 + dV) / ||W0 + dV||_row``
   (:meth:`harness_merge.types.DoRAUpdate.weight`).

For one adapter and a method that returns its input (``ta`` with scaling 1,
``wa``) this is that adapter's own DoRA model. RobustMerge (NeurIPS text,
Table 9) reports TA / TIES / RobustMerge on DoRA adapters but states no rule
for the magnitudes, and its released code has no DoRA-specific merge; the rule
above is ours and is recorded in the artifact's manifest (``dora``).

Artifacts: a PEFT DoRA adapter (``use_dora=true``, the merged factors and
``lora_magnitude_vector``s; PEFT recomputes the row norm from the base) or full
weights ``W`` (for servers without DoRA, e.g. vLLM).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .merge_loop import iter_merged
from .types import Dense, DoRAUpdate

MAGNITUDE_RULE = "average"
RECORD = {
    "peft_variant": "dora",
    "direction": "the method on the LoRA factors (s_n B_n A_n)",
    "magnitude": "mean_n m_n (the 1-D tensor policy)",
    "weight": "m * (W0 + dV) / ||W0 + dV||_row",
}


def merge_magnitudes(magnitudes) -> torch.Tensor:
    """``mean_n m_n`` (see the module docstring)."""
    return torch.stack(list(magnitudes)).mean(dim=0)


def iter_merged_dora(inputs, spec, params, *, progress: bool = True) -> Iterator[tuple[str, DoRAUpdate]]:
    """``iter_merged`` on the direction factors, each result paired with the
    merged magnitude of its module."""
    for name, res in iter_merged(inputs, spec, params, progress=progress):
        if res is None:  # not produced for LoRA inputs; keep the magnitude anyway
            res = Dense(torch.zeros(inputs.shape(name)))
        mag = merge_magnitudes(inputs.read_magnitudes(name))
        yield name, DoRAUpdate(direction=res, magnitude=mag, info={"magnitude_rule": MAGNITUDE_RULE})


__all__ = ["MAGNITUDE_RULE", "RECORD", "iter_merged_dora", "merge_magnitudes"]
