"""PEFT DoRA adapter folders (``use_dora=true``) -> LoRA factors + magnitude vectors.

A DoRA module (Liu et al., ICML 2024, arXiv 2402.09353) computes

    W' = m * (W0 + s B A) / ||W0 + s B A||_row

with the learned magnitude ``m`` (``lora_magnitude_vector``, one entry per
output feature, PEFT's ``d_out``) and the norm of each output row (PEFT's
``torch.linalg.norm(weight, dim=1)`` for Linear layers). The direction part
``s B A`` is an ordinary LoRA update and is read by :class:`LoRAAdapter`; this
module adds the magnitude vectors. How a merge combines them is
:mod:`harness_merge.merge_dora`'s business.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from .files import checked_float
from .headers import MAGNITUDE, read_adapter_config
from .peft_lora import LoRAAdapter, LoRASet


def is_dora_dir(d: Path) -> bool:
    """A PEFT adapter folder whose config says ``use_dora: true``."""
    try:
        return bool(read_adapter_config(d).get("use_dora"))
    except InputError:
        return False


class DoRAAdapter(LoRAAdapter):
    """One PEFT DoRA adapter: the LoRA factors plus one magnitude vector per module."""

    allows_dora = True

    def __init__(self, ref: str, path: Path):
        super().__init__(ref, path)
        self._mag_keys = self.header.magnitude_keys
        missing = sorted(set(self.modules) - set(self._mag_keys))
        if missing:
            raise InputError(
                f"{self.weights_file}: DoRA adapter (use_dora=true) without {MAGNITUDE.lstrip('.')} for "
                f"{len(missing)} module(s), e.g. {missing[0]}; the magnitude is part of the update, "
                f"merging without it would be silently wrong"
            )
        extra = sorted(set(self._mag_keys) - set(self.modules))
        if extra:
            raise InputError(
                f"{self.weights_file}: magnitude vector for {extra[0]}, which has no lora_A/lora_B"
            )
        for m, key in self._mag_keys.items():
            shape = self.header.tensors[key].shape
            if shape != (self.modules[m].d_out,):
                raise InputError(
                    f"{self.weights_file}: module {m}: {MAGNITUDE.lstrip('.')} has shape {list(shape)}, "
                    f"expected [{self.modules[m].d_out}] (one entry per output feature; only Linear DoRA "
                    f"is supported)"
                )

    def read_magnitude(self, module: str) -> torch.Tensor:
        return checked_float(
            self._file.get(self._mag_keys[module]), f"{self.weights_file} [{module}] magnitude"
        )


class DoRASet(LoRASet):
    """N DoRA adapters: a :class:`LoRASet` (the direction factors, read and
    checked as LoRA) plus their magnitude vectors."""

    adapter_cls = DoRAAdapter
    dora = True

    def read_magnitudes(self, module: str) -> tuple[torch.Tensor, ...]:
        return tuple(a.read_magnitude(module) for a in self.adapters)


__all__ = ["MAGNITUDE", "DoRAAdapter", "DoRASet", "is_dora_dir"]
