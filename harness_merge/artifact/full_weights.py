"""Full merged weights from a LoRA merge, streamed shard by shard.

``base + delta`` is written in the base checkpoint's own layout: the same
shards, the same tensor names (transformers 5 renames keys on load, e.g.
Qwen2-VL's ``model.layers.*`` become ``model.language_model.layers.*``; the
LoRA modules carry the loaded names, the files keep the stored ones), a
safetensors index at the end when the base has several shards.

Memory: base tensors are read one at a time with plain file reads (no model,
no memory map), each output tensor is written to its place in the output file
as soon as it is ready (the safetensors header is known up front: the base's
shapes with the output dtype), and the merge is driven in the base's storage
order, so a merged module is added the moment its base tensor comes by. Peak
memory is about one base tensor plus one merged update, whatever the model's
size.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS
from ..errors import InputError
from ..inputs.files import resolve_ref
from ..inputs.fit import meta_model
from ..inputs.headers import safetensors_layout
from ..types import Dense, DoRAUpdate, MergeResult, Replacement
from . import fsio

log = logging.getLogger("harness_merge")

INDEX = "model.safetensors.index.json"

# safetensors code -> torch dtype, from the one table (codes this torch lacks are left out)
_ST_TO_TORCH = {st: getattr(torch, name) for st, name in SAFETENSORS.items() if hasattr(torch, name)}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}

MergeModules = Callable[[list[str]], Iterable[tuple[str, "MergeResult | None"]]]


class SafetensorsReader:
    """One safetensors file: header parsed up front, tensors read on demand by
    ``readinto`` (no memory map, so nothing stays resident after a tensor is dropped)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header, self.metadata, self.data_start = safetensors_layout(self.path)  # the one header parser
        self.entries: dict[str, dict] = header
        for name, e in header.items():
            if e.get("dtype") not in _ST_TO_TORCH:
                raise InputError(
                    f"{self.path}: tensor {name}: unsupported safetensors dtype {e.get('dtype')!r}"
                )

    def names_in_file_order(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _ST_TO_TORCH[self.entries[name]["dtype"]]

    def read(self, name: str, f=None) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        own = f is None
        f = open(self.path, "rb") if own else f  # noqa: SIM115 (closed below; a caller may pass its own)
        try:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise InputError(
                    f"{self.path}: tensor {name} is truncated (file shorter than its header says)"
                )
        finally:
            if own:
                f.close()
        dt = self.dtype(name)
        if not buf:
            return torch.empty(self.shape(name), dtype=dt)
        return torch.frombuffer(buf, dtype=dt).reshape(self.shape(name))


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes,
    shapes, offsets) is written first, then each tensor in the declared order."""

    def __init__(
        self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None
    ):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((name, nbytes))
            offset += nbytes
        self.total_size = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._f = fsio.HashingWriter(self.path)  # hashed on the way out: the seal need not re-read
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        want, nbytes = self._order[self._next]
        if name != want:
            raise RuntimeError(f"{self.path}: tensor {name} written out of order (expected {want})")
        t = t.contiguous()
        if t.numel():
            data = t.reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != nbytes:
                raise RuntimeError(
                    f"{self.path}: tensor {name} has {data.nbytes} bytes, the header says {nbytes}"
                )
            self._f.write(memoryview(data))
        self._next += 1

    def write_parts(self, name: str, parts) -> None:
        """Write tensor ``name`` from consecutive flat pieces (``parts``, an
        iterable of tensors whose bytes, in order, are the tensor's); their
        total size is checked against the header."""
        want, nbytes = self._order[self._next]
        if name != want:
            raise RuntimeError(f"{self.path}: tensor {name} written out of order (expected {want})")
        done = 0
        for t in parts:
            if not t.numel():
                continue
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            done += data.nbytes
            if done > nbytes:
                break
            self._f.write(memoryview(data))
        if done != nbytes:
            raise RuntimeError(f"{self.path}: tensor {name} has {done}+ bytes, the header says {nbytes}")
        self._next += 1

    def abort(self) -> None:
        """Close the file without checking it is complete (the caller removes it)."""
        self._f.close()

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.abort()
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensor(s) never written")
        self._f.close()


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` without its copy of every tensor into a
    Python ``bytes`` (each tensor's memory is written as it is): same format,
    half the peak memory and less time for large artifacts."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    w = SafetensorsStreamWriter(
        Path(path),
        [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
        metadata=metadata or {"format": "pt"},
    )
    try:
        for k, t in tensors.items():
            w.write(k, t)
    except BaseException:
        w.abort()
        raise
    w.close()


def _shard_files(base_dir: Path) -> list[str]:
    idx = base_dir / INDEX
    if idx.is_file():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{idx}: unreadable shard index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not files:
        bins = list(base_dir.glob("*.bin"))
        hint = " (found .bin files: convert them to safetensors)" if bins else ""
        raise InputError(
            f"{base_dir}: no *.safetensors weights{hint}; full weights are written from a safetensors base"
        )
    for fn in files:
        if not (base_dir / fn).is_file():
            raise InputError(f"{base_dir}: shard {fn} listed in {INDEX} is missing")
    return files


def loaded_names(model, checkpoint_keys: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """``checkpoint key -> (the name transformers loads it as, whether a
    converter (fuse/split/transpose) is involved)``, by transformers' own
    renaming rules for this model (identity on transformers without them)."""
    keys = list(checkpoint_keys)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # transformers 4.x: checkpoints load under their own names
        return {k: (k, False) for k in keys}
    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    out = {}
    for k in keys:
        new, conv = rename_source_key(k, renamings, converters, prefix, meta_sd)
        if new not in meta_sd and k in meta_sd:  # as transformers does: keep the name, maybe the prefix
            new, conv = rename_source_key(k, [], [], prefix, meta_sd)
        out[k] = (new, conv is not None)
    return out


def plan_lora_targets(
    lora_set,
    base_ref: str,
    base_dir: Path,
    shards: list[str],
    readers: dict[str, SafetensorsReader],
    replaced=(),
):
    """``{checkpoint key: module}`` for every LoRA module, and ``{checkpoint key: parameter}``
    for every ``replaced`` parameter (loaded names), checked before anything is written."""
    from ..inputs.fit import check_lora_fits_model

    model = meta_model(base_dir)
    shapes = {m: lora_set.shape(m) for m in lora_set.module_names}
    check_lora_fits_model(model, shapes, base_ref=base_ref, adapter_ref=lora_set.refs[0])
    stored = {k: fn for fn in shards for k in readers[fn].entries}
    by_loaded: dict[str, str] = {}
    converted: dict[str, str] = {}
    for k, (new, conv) in loaded_names(model, stored).items():
        (converted if conv else by_loaded)[new] = k
    targets: dict[str, str] = {}
    for m in lora_set.module_names:
        want = f"{m}.weight"
        key = by_loaded.get(want)
        if key is None:
            if want in converted:
                raise InputError(
                    f"{base_ref}: module {m}: its weight is stored as {converted[want]} and converted on load "
                    f"(fused, split or transposed); full weights cannot be streamed for it - write a LoRA "
                    f"(--format lora) instead"
                )
            raise InputError(f"{base_ref}: module {m}: no tensor of the base checkpoint loads as {want}")
        shape = readers[stored[key]].shape(key)
        if shape != tuple(shapes[m]):
            raise InputError(
                f"{base_ref}: module {m}: stored tensor {key} has shape {list(shape)}, the adapters' update "
                f"{list(shapes[m])}"
            )
        targets[key] = m
    for p in replaced:
        key = by_loaded.get(p)
        if key is None:
            raise InputError(
                f"{base_ref}: no tensor of the base checkpoint loads as {p}, which the merge replaces"
                + (f" (stored as {converted[p]} and converted on load)" if p in converted else "")
            )
        targets[key] = p
    return targets


class _aborting:
    """Close a stream writer's file when the block fails (the build folder is discarded)."""

    def __init__(self, w: SafetensorsStreamWriter):
        self.w = w

    def __enter__(self):
        return self.w

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.w.abort()
        return False


def _results_in_order(results, order: list[str]) -> Iterator[tuple[str, MergeResult | None]]:
    """Results in ``order``: from ``results(order)`` when it is a callable (the
    merge runs in that order, nothing held), else from an iterable in any order
    (results held until their tensor comes; cheap for LoRA results)."""
    if callable(results):
        yield from results(order)
        return
    held: dict[str, MergeResult | None] = {}
    it = iter(results)
    for want in order:
        while want not in held:
            try:
                name, res = next(it)
            except StopIteration:
                raise RuntimeError(f"the merge yielded no result for module {want}") from None
            held[name] = res
        yield want, held.pop(want)


def stream_full_from_lora(
    results: MergeModules | Iterable,
    lora_set,
    base_ref: str,
    out_dir: Path,
    *,
    dtype: str | None,
    replaced=(),
) -> dict:
    """Write ``base + merged update`` shard by shard in the base's layout.

    A ``DoRAUpdate`` result writes its DoRA weight ``m * (W0 + dV) / ||W0 + dV||_row``;
    a ``Replacement`` (a ``replaced`` parameter) writes its value instead of the base's.

    ``results``: a callable ``names -> iterator of (module, result)`` (the merge,
    driven in storage order), or an iterable of results in any order.
    ``dtype``: output dtype of floating tensors (default: each tensor's stored dtype).
    """
    from .writer import copy_side_files, torch_dtype

    base_dir = resolve_ref(base_ref)
    out_dir = Path(out_dir)
    shards = _shard_files(base_dir)
    readers = {fn: SafetensorsReader(base_dir / fn) for fn in shards}
    targets = plan_lora_targets(lora_set, base_ref, base_dir, shards, readers, replaced)
    out_dt = torch_dtype(dtype) if dtype else None
    order = [targets[k] for fn in shards for k in readers[fn].names_in_file_order() if k in targets]
    stream = _results_in_order(results, order)
    out_names = {fn: (fn if len(shards) > 1 else "model.safetensors") for fn in shards}
    weight_map: dict[str, str] = {}
    total, n = 0, 0
    for fn in shards:
        rd = readers[fn]
        names = rd.names_in_file_order()

        def out_dtype(k, rd=rd):
            dt = rd.dtype(k)
            return out_dt if out_dt is not None and dt.is_floating_point else dt

        w = SafetensorsStreamWriter(
            out_dir / out_names[fn],
            [(k, out_dtype(k), rd.shape(k)) for k in names],
            metadata=rd.metadata or {"format": "pt"},
        )
        with open(rd.path, "rb") as f, _aborting(w):
            for k in names:
                t = rd.read(k, f)
                if k in targets:
                    m, res = next(stream)
                    if m != targets[k]:
                        raise RuntimeError(f"merge order broken: got {m}, expected {targets[k]}")
                    if isinstance(res, Replacement):
                        if tuple(res.value.shape) != tuple(t.shape):
                            raise InputError(
                                f"{base_ref}: {m}: the merged tensor {list(res.value.shape)} does not "
                                f"match the base's {k} {list(t.shape)}"
                            )
                        t = res.value
                        n += 1
                    elif isinstance(res, DoRAUpdate):
                        t = res.weight(t)
                        n += 1
                    elif res is not None:
                        delta = res.delta if isinstance(res, Dense) else res.delta()
                        t = t.float().add_(delta)
                        n += 1
                        del delta
                    del res
                w.write(k, t.to(out_dtype(k)))
                weight_map[k] = out_names[fn]
                del t
        w.close()
        total += w.total_size
    if len(shards) > 1:
        (out_dir / INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    copy_side_files(base_dir, out_dir)
    if dtype:
        _set_config_dtype(out_dir / "config.json", dtype)
    return {"modules": n, "shards": len(shards), "streamed": True}


def _set_config_dtype(path: Path, dtype: str) -> None:
    """Record the written dtype in config.json (``dtype``/``torch_dtype``, also in sub-configs)."""
    if not path.is_file():
        return
    from .writer import torch_dtype

    name = str(torch_dtype(dtype)).replace("torch.", "")
    cfg = json.loads(path.read_text())

    def fix(d):
        if isinstance(d, dict):
            for key in ("dtype", "torch_dtype"):
                if key in d:
                    d[key] = name
            for v in d.values():
                fix(v)

    fix(cfg)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


__all__ = [
    "SafetensorsReader",
    "SafetensorsStreamWriter",
    "loaded_names",
    "meta_model",
    "save_tensors",
    "stream_full_from_lora",
]
