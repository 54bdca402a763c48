"""File access shared by the input readers: resolve a folder or hub id, open
tensors lazily (safetensors or torch .bin), check values."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable

import torch

from ..dtypes import from_safetensors
from ..errors import InputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_ref(ref: str, allow_patterns: Iterable[str] | None = None) -> Path:
    """A local folder as is; otherwise a hub id downloaded with huggingface_hub
    (only ``allow_patterns``). Errors name the reference."""
    p = Path(os.path.expanduser(str(ref)))
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{ref}: is a file, expected a folder (PEFT adapter or model checkpoint)")
        if not os.access(p, os.R_OK | os.X_OK):
            raise InputError(f"{ref}: folder is not readable")
        return p.resolve()
    if not _HUB_ID.match(str(ref)) or str(ref).startswith((".", "/", "~")):
        raise InputError(f"{ref}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(ref), allow_patterns=list(allow_patterns) if allow_patterns else None)
    except Exception as e:  # network, auth, missing repo
        raise InputError(
            f"{ref}: not a local folder, and downloading it from the hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return Path(local)


class TensorFile:
    """Lazy access to one weights file (.safetensors via safe_open, .bin via
    ``torch.load(mmap=True, weights_only=True)``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._st = safe_open(str(self.path), framework="pt", device="cpu")
                self._sd = None
            else:
                self._st = None
                self._sd = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise InputError(f"{self.path}: cannot read weights ({type(e).__name__}: {e})") from None

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> str:
        """torch dtype name (``float16``, ``bfloat16``, ``float32``, ...)."""
        if self._st is not None:
            st = str(self._st.get_slice(key).get_dtype())
            return from_safetensors(st)
        return str(self._sd[key].dtype).replace("torch.", "")

    def get(self, key: str) -> torch.Tensor:
        t = self._st.get_tensor(key) if self._st is not None else self._sd[key]
        return t


def checked_float(t: torch.Tensor, where: str, *, stored_dtype: bool = False) -> torch.Tensor:
    """float32 copy of ``t`` (``stored_dtype``: ``t`` itself, floating dtypes
    only); NaN/Inf is an error naming ``where``."""
    x = t if stored_dtype and t.is_floating_point() else t.to(torch.float32)
    # One reduction instead of a boolean map: NaN/Inf propagate into the sum; a sum
    # that overflows (finite values, possible in float16) falls back to the exact map.
    # The sum's check as a Python float: one torch call fewer (~45 us each on 7B factors).
    if not math.isfinite(x.sum().item()) and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{where}: {bad} NaN/Inf value(s); refusing to merge non-finite weights")
    return x
