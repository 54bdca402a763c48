"""Write merge results: a PEFT LoRA adapter, or full merged weights.

LoRA artifacts have one rank ``r`` for every module (smaller merged ranks are
zero-padded: zero rows of A / columns of B change nothing) and ``lora_alpha = r``
(scale 1; every scale is folded into B), with exact module names as
``target_modules``, so PEFT and vLLM load them without rank/alpha patterns.
Merged DoRA modules (``DoRAUpdate``) add their ``lora_magnitude_vector`` and
``use_dora=true`` (PEFT loads it; vLLM has no DoRA: serve full weights), or,
as full weights, ``W = m * (W0 + dV) / ||W0 + dV||_row``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable

import torch

from .. import dtypes
from ..errors import ArtifactError
from ..types import Dense, DenseBlocks, DoRAUpdate, LowRank
from .full_weights import SafetensorsStreamWriter
from .full_weights import save_tensors as save_file  # streamed, no bytes copy
from .lowrank import factor_dense, truncate_factors

log = logging.getLogger("harness_merge")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "harness_merge.json"}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return dtypes.torch_dtype(name)
    except KeyError:
        raise ArtifactError(f"dtype must be one of {', '.join(dtypes.WEIGHT_DTYPES)}, got {name!r}") from None


def write_lora(
    results: Iterable[tuple[str, LowRank | Dense | None]],
    out_dir: Path,
    *,
    dtype: str,
    rank: int | None = None,
    base_model_name: str | None = None,
) -> dict:
    """Collect per-module factors (SVD for dense results), pad to one rank, save."""
    dt = torch_dtype(dtype)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    big: list[str] = []  # exact factorisations larger than the weight itself
    magnitudes: dict[str, torch.Tensor] = {}  # DoRA: written beside the factors (use_dora=true)
    for name, res in results:
        if res is None:
            continue
        if isinstance(res, DoRAUpdate):
            magnitudes[name] = res.magnitude.to(dt).contiguous()
            res = res.direction
        if isinstance(res, Dense):
            if res.delta.dim() != 2:
                raise ArtifactError(
                    f"module {name}: a {res.delta.dim()}-D update cannot be written as LoRA; "
                    f"write full weights (--format full --base ...)"
                )
            A, B, err = factor_dense(res.delta, rank)
            errors[name] = err
            if rank is None and A.shape[0] > min(res.delta.shape) // 2:
                big.append(name)
        else:
            A, B = res.A, res.B
            if rank is not None and A.shape[0] > rank:
                A, B, err = truncate_factors(A, B, rank)
                errors[name] = err
        # Keep the output dtype only: the artifact's size, not twice it in float32.
        factors[name] = (A.to(dt), B.to(dt))
    if not factors:
        raise ArtifactError("the merge changed no module: nothing to write")
    if big:
        log.warning(
            "%d module(s) (e.g. %s) have a merged update of rank above half their size: as a LoRA they "
            "take more room than the weights; write full weights (--base) or truncate (--rank R)",
            len(big),
            big[0],
        )
    r = max(A.shape[0] for A, _ in factors.values())
    tensors = {}
    for name, (A, B) in factors.items():
        pad = r - A.shape[0]
        if pad:
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
        if name in magnitudes:
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = magnitudes[name]
    from peft import LoraConfig

    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model_name,
        inference_mode=True,
        use_dora=bool(magnitudes),
    )
    cfg.save_pretrained(str(out_dir))
    _normalise_adapter_config(Path(out_dir) / "adapter_config.json")
    save_file(tensors, str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
    info = {"rank": r, "modules": len(factors)}
    if magnitudes:
        info["dora"] = True
    if errors:
        vals = list(errors.values())
        info["svd_rel_error"] = {"max": max(vals), "mean": sum(vals) / len(vals), "modules": len(vals)}
    return info


def _normalise_adapter_config(path: Path) -> None:
    """PEFT stores ``target_modules`` as a set and writes it in hash-seed order:
    sort every set-like list so two identical merges give identical bytes."""
    cfg = json.loads(path.read_text())
    for k in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k], key=str)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Tokenizer, processor and config files of the base (everything but weights)."""
    for p in Path(base_dir).iterdir():
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _SKIP_FILES:
            if not (Path(out_dir) / p.name).exists():
                shutil.copy2(p, Path(out_dir) / p.name)


def write_full_from_lora(
    results, lora_set, base_ref: str, out_dir: Path, *, dtype: str | None, replaced=()
) -> dict:
    """``base + merged update`` in the base's own layout, streamed shard by shard
    (see :mod:`harness_merge.artifact.full_weights`). ``results`` is a callable
    ``names -> iterator`` (the merge, driven in the base's storage order) or an
    iterable of ``(module, result)``; ``replaced`` names parameters whose
    ``Replacement`` results (e.g. LLaVA-repo's mm_projector) the iterable also yields."""
    from .full_weights import stream_full_from_lora

    return stream_full_from_lora(results, lora_set, base_ref, out_dir, dtype=dtype, replaced=replaced)


def _added_blocks(res: DenseBlocks, theta0: torch.Tensor):
    """``theta0 + delta`` block by block, each in place in the float32 block
    and cast to ``theta0``'s dtype (the same sums as the whole tensor's)."""
    flat, at = theta0.reshape(-1), 0
    for b in res.blocks():
        yield b.add_(flat[at : at + b.numel()]).to(theta0.dtype)
        at += b.numel()


def _stored_dtype(ck, name: str) -> torch.dtype:
    dt = getattr(torch, ck.dtype(name), None)  # from the header
    return dt if isinstance(dt, torch.dtype) else ck.get(name).dtype


def _stream_checkpoint_shards(results, ck, names: list[str], dtype_of, tensor, out_dir: Path) -> dict:
    """Write ``tensor(name, result)`` for each ``(name, result)`` of ``results``
    straight into its place in ``ck``'s shard layout (the output header - names
    in ``names`` order per shard, ``dtype_of(name)``, the stored shapes - is
    known before any tensor is merged), so only the tensor in hand is held,
    not a whole shard; ``results`` must come in ``names`` order. Writes the
    index for several shards and the side files; returns ``{"modules": n}``
    (results that were not None). A tensor's bytes may come in flat pieces
    (``tensor`` returning an iterator: a :class:`DenseBlocks` result)."""

    files = ck.file_names
    out_names = {fn: (fn if len(files) > 1 else "model.safetensors") for fn in files}
    layout: dict[str, list] = {fn: [] for fn in files}
    for name in names:
        layout[ck.where[name]].append((name, dtype_of(name), tuple(ck.shape(name))))
    weight_map, n = {}, 0
    current, w = None, None
    try:
        for name, res in results:
            fn = ck.where[name]
            if fn != current:
                if w is not None:
                    w.close()
                    w = None
                current = fn
                w = SafetensorsStreamWriter(
                    Path(out_dir) / out_names[fn], layout[fn], metadata={"format": "pt"}
                )
            out = tensor(name, res)
            if isinstance(out, torch.Tensor):
                w.write(name, out)
            else:  # the flat pieces of a DenseBlocks result, in order
                w.write_parts(name, out)
            n += res is not None
            weight_map[name] = out_names[fn]
        if w is not None:
            w.close()
            w = None
    finally:
        if w is not None:
            w.abort()
    if len(files) > 1:
        (Path(out_dir) / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
    copy_side_files(ck.path, out_dir)
    return {"modules": n}


def write_full_from_checkpoints(results, ckset, out_dir: Path) -> dict:
    """Stream the base's shards: each output tensor is base + merged update,
    in the base's dtype, written to its place in its shard as soon as it is
    merged (``results`` in ``ckset.module_names`` order)."""
    base = ckset.base

    def tensor(name, res):
        theta0 = base.get(name)
        if res is None:
            return theta0
        if isinstance(res, DenseBlocks):
            return _added_blocks(res, theta0)
        # delta + theta0 in place (float32, the same sums): no float32 copy of the base tensor
        return res.delta.add_(theta0).to(theta0.dtype)

    return _stream_checkpoint_shards(
        results, base, ckset.module_names, lambda name: _stored_dtype(base, name), tensor, out_dir
    )


def write_full_base_free(results, ckset, out_dir: Path) -> dict:
    """The merged weights themselves (``iter_merged_base_free``: ``Dense``
    results are weights, ``None`` means every checkpoint holds the same
    tensor), streamed in the first fine-tuned checkpoint's shard layout
    (``results`` in ``ckset.layout_names()`` order), each tensor in that
    checkpoint's dtype (from its header); the base's tensors are never read;
    side files from the first checkpoint."""
    first = ckset.checkpoints[0]

    def dtype_of(name):
        return _stored_dtype(first, name)

    def tensor(name, res):
        if res is None:
            return first.get(name)
        if isinstance(res, DenseBlocks):
            return (b.to(dtype_of(name)) for b in res.blocks())
        return res.delta.to(dtype_of(name))

    info = _stream_checkpoint_shards(results, first, ckset.layout_names(), dtype_of, tensor, out_dir)
    return {**info, "base_read": False}
