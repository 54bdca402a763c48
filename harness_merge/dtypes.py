"""The one table of dtype names (torch-free; every layer imports it from here).

- :data:`SAFETENSORS` maps a safetensors header code (``"BF16"``) to the torch
  name (``"bfloat16"``);
- :data:`ALIASES` maps what users may write (``fp16``, ``bf16``, ``torch.float32``
  without the prefix, any case) to the torch name;
- :func:`torch_dtype` turns a name into a ``torch.dtype`` (imports torch only then).
"""

from __future__ import annotations

SAFETENSORS: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
"""safetensors header dtype code -> torch dtype name."""

ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float": "float32",  # torch.float / torch.half
    "half": "float16",
}
"""User-facing float dtype names -> torch dtype name."""

WEIGHT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""The dtypes a merge can be written in and a backend can load a model in."""


def from_safetensors(code: str) -> str:
    """Torch name of a safetensors dtype code (unknown codes: lower-cased)."""
    return SAFETENSORS.get(code, code.lower())


def canonical(name: object) -> str | None:
    """Torch name of a float dtype written as ``name`` (``"bf16"``,
    ``"torch.float16"``, a ``torch.dtype``), or None when it is not one."""
    return ALIASES.get(str(name).strip().lower().removeprefix("torch."))


def torch_dtype(name: object):
    """``torch.dtype`` of a name :func:`canonical` knows; ``KeyError`` otherwise."""
    import torch

    c = canonical(name)
    if c is None:
        raise KeyError(name)
    return getattr(torch, c)


__all__ = ["ALIASES", "SAFETENSORS", "WEIGHT_DTYPES", "canonical", "from_safetensors", "torch_dtype"]
