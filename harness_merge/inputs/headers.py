"""The one reader of LoRA / checkpoint headers: names, shapes and dtypes without
reading a tensor, and without importing torch for safetensors files.

- :func:`read_safetensors_header` parses a ``.safetensors`` header (8-byte
  little-endian length + JSON) into ``{key: TensorMeta(dtype, shape)}``.
- :func:`lora_header` reads a PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors`` / ``.bin``) into a :class:`LoraHeader`: per
  module ``(d_out, d_in, rank)``, the tensor keys of ``lora_A`` / ``lora_B`` /
  the DoRA magnitude, the config's ``r``, ``lora_alpha``, ``target_modules``,
  ``use_dora``, and every key that is none of these (``other``), so that each
  caller decides what to refuse. Module names are the PEFT names without the
  ``base_model.model.`` prefix, as PEFT matches them against the base.

Only ``adapter_model.bin`` (a pickle, no header) needs torch: it is opened with
``torch.load(mmap=True, weights_only=True)``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..dtypes import from_safetensors
from ..errors import InputError

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B, MAGNITUDE = ".lora_A.", ".lora_B.", ".lora_magnitude_vector"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header size


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # torch name: float32, bfloat16, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModuleShape:
    d_out: int
    d_in: int
    rank: int


def safetensors_layout(path: str | Path) -> tuple[dict[str, dict], dict, int]:
    """The raw header of a safetensors file: ``({key: {"dtype", "shape",
    "data_offsets"}}, __metadata__, offset of the data)``. A short or garbled
    header is an ``InputError`` naming the file."""
    p = Path(path)

    def bad(why: str) -> InputError:
        return InputError(f"{p}: cannot read weights (not a readable safetensors file: {why})")

    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise bad(f"{len(head)}-byte file, truncated header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise bad(f"header of {n} bytes")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{p}: cannot read weights ({type(e).__name__}: {e})") from None
    if len(raw) != n:
        raise bad(f"header of {n} bytes, file ends after {len(raw)}")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def read_safetensors_header(path: str | Path) -> dict[str, TensorMeta]:
    """``{tensor key: TensorMeta}`` of a safetensors file (``__metadata__`` left
    out), in the file's key order."""
    entries, _, _ = safetensors_layout(path)
    try:
        return {
            k: TensorMeta(from_safetensors(str(v["dtype"])), tuple(int(x) for x in v["shape"]))
            for k, v in entries.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"{path}: cannot read weights (not a readable safetensors file: bad tensor entry {e})"
        ) from None


def tensor_metas(path: str | Path) -> dict[str, TensorMeta]:
    """:func:`read_safetensors_header` for ``.safetensors``; a torch ``.bin``
    pickle is loaded memory-mapped (``weights_only=True``) to list the same."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return read_safetensors_header(p)
    try:
        import torch

        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        return {k: TensorMeta(str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in sd.items()}
    except Exception as e:  # noqa: BLE001 - pickled code, truncated file, not a dict of tensors
        raise InputError(f"{p}: cannot read weights ({type(e).__name__}: {e})") from None


def read_adapter_config(adapter_dir: str | Path) -> dict:
    cfg_path = Path(adapter_dir) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: unreadable adapter config (not a JSON object)")
    return cfg


def peft_module_name(key: str, marker: str) -> str:
    """The module a PEFT tensor key belongs to (``base_model.model.`` stripped)."""
    return key.split(marker)[0].removeprefix(PEFT_PREFIX)


@dataclass(frozen=True)
class LoraHeader:
    """What a PEFT adapter folder holds, read from its config and file header."""

    path: Path
    config: dict
    weights_file: Path
    tensors: dict[str, TensorMeta]
    a_keys: dict[str, str]  # module -> lora_A key
    b_keys: dict[str, str]  # module -> lora_B key
    magnitude_keys: dict[str, str]  # module -> lora_magnitude_vector key (DoRA)
    other: tuple[str, ...]  # keys that are none of the above, in file order
    modules: dict[str, ModuleShape] = field(default_factory=dict)  # modules with 2-D A and B of one rank

    @property
    def rank(self) -> int:
        """The largest rank: config ``r``, ``rank_pattern`` values and the saved tensors."""
        ranks = [int(self.config.get("r") or 0)]
        ranks += [int(v) for v in (self.config.get("rank_pattern") or {}).values()]
        ranks += [s.rank for s in self.modules.values()]
        return max(ranks)

    @property
    def alpha(self) -> float | None:
        a = self.config.get("lora_alpha")
        return None if a is None else float(a)

    @property
    def target_modules(self) -> tuple[str, ...]:
        tm = self.config.get("target_modules") or ()
        return (tm,) if isinstance(tm, str) else tuple(tm)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def has_magnitudes(self) -> bool:
        return bool(self.magnitude_keys)

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (d_out, d_in)}``, the input of the fit check."""
        return {m: (s.d_out, s.d_in) for m, s in self.modules.items()}

    def bad_factor(self, module: str) -> str | None:
        """Why ``module``'s A/B pair is not a Linear LoRA (None when it is)."""
        sa, sb = self.tensors[self.a_keys[module]].shape, self.tensors[self.b_keys[module]].shape
        if len(sa) != 2 or len(sb) != 2:
            return f"only Linear LoRA is supported, got A{sa} B{sb}"
        if sa[0] != sb[1]:
            return f"rank mismatch A{sa} vs B{sb}"
        return None


def lora_header(
    adapter_dir: str | Path, module_name: Callable[[str], str] | None = None, *, config: dict | None = None
) -> LoraHeader:
    """Read a PEFT adapter folder's config and weight-file header.

    ``module_name`` maps the PEFT module name (prefix stripped) to the name
    used downstream (the LLaVA-repo layout maps to llava-hf names). Modules
    whose A/B are not a 2-D pair of one rank are left out of ``modules``
    (:meth:`LoraHeader.bad_factor` says why); nothing is refused here but an
    unreadable config or weights file. ``config``: the already-read
    ``adapter_config.json``.
    """
    d = Path(adapter_dir)
    cfg = read_adapter_config(d) if config is None else config
    wf = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if wf is None:
        raise InputError(f"{d}: no {' or '.join(WEIGHT_FILES)} in {d}")
    tensors = tensor_metas(wf)
    name = module_name or (lambda m: m)
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    mag_keys: dict[str, str] = {}
    other: list[str] = []
    for key in sorted(tensors):
        if LORA_A in key and key.endswith("weight"):
            a_keys[name(peft_module_name(key, LORA_A))] = key
        elif LORA_B in key and key.endswith("weight"):
            b_keys[name(peft_module_name(key, LORA_B))] = key
        elif key.endswith((MAGNITUDE, MAGNITUDE + ".weight")):
            mag_keys[name(peft_module_name(key, MAGNITUDE))] = key
        else:
            other.append(key)
    h = LoraHeader(d, cfg, wf, tensors, a_keys, b_keys, mag_keys, tuple(other))
    for m in sorted(set(a_keys) & set(b_keys)):
        if h.bad_factor(m) is None:
            sa, sb = tensors[a_keys[m]].shape, tensors[b_keys[m]].shape
            h.modules[m] = ModuleShape(d_out=sb[0], d_in=sa[1], rank=sa[0])
    return h


__all__ = [
    "CONFIG",
    "PEFT_PREFIX",
    "WEIGHT_FILES",
    "LoraHeader",
    "ModuleShape",
    "TensorMeta",
    "lora_header",
    "peft_module_name",
    "read_adapter_config",
    "read_safetensors_header",
    "safetensors_layout",
    "tensor_metas",
]
