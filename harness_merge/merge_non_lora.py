"""Non-LoRA trainables of LLaVA-repo checkpoints (the ``mm_projector``).

Rule (the released CoPA-Merging / RobustMerge code, ``llava/model/builder.py``
``load_and_merge_pretrained_model``: ``coef = 1/len(model_paths)``): every
non-LoRA trained tensor is the plain average over the N checkpoints,
``p = mean_n p_n``, whatever the method (which merges only the LoRA factors).
The averaged tensors replace the base's (they are trained values, not updates
of the base's), so the artifact is full weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .types import Replacement

RECORD = {"non_lora_trainables": "mean_n p_n (released code: coef = 1/N), replacing the base's values"}


def iter_non_lora(inputs) -> Iterator[tuple[str, Replacement]]:
    for name in inputs.non_lora_names:
        yield (
            name,
            Replacement(torch.stack(inputs.read_non_lora(name)).mean(dim=0), info={"policy": "average"}),
        )


__all__ = ["RECORD", "iter_non_lora"]
