"""The merge API used by the CLI, the harness models and the leaderboard.

``merge(MergeSpec(...)) -> Artifact``: validate, look the result up in the
content-addressed cache, otherwise stream the merge module by module and write
the artifact atomically.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import methods
from .artifact import fsio
from .artifact.cache import MANIFEST, FileHasher, MergeCache, read_files_record
from .artifact.provenance import Provenance
from .artifact.publish import check_out_dir, publish, publish_built
from .artifact.writer import (
    write_full_base_free,
    write_full_from_checkpoints,
    write_full_from_lora,
    write_lora,
)
from .cost import check_cost
from .errors import ArtifactError, MethodParamError
from .inputs import open_inputs
from .inputs.fit import check_lora_fits
from .merge_loop import iter_merged, iter_merged_base_free, validate_plan

log = logging.getLogger("harness_merge")

Format = Literal["auto", "lora", "full"]


@dataclass(frozen=True)
class MergeSpec:
    """What to merge. ``params`` may hold strings (from a CLI) or typed values."""

    adapters: tuple[str, ...]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    format: Format = "auto"
    rank: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(str(a) for a in self.adapters))
        if self.format not in ("auto", "lora", "full"):
            raise MethodParamError(f"format must be auto, lora or full, got {self.format!r}")
        if self.rank is not None and int(self.rank) < 1:
            raise MethodParamError(f"rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: Literal["lora", "full"]
    manifest: dict
    cache_hit: bool


def _resolve_format(spec: MergeSpec, inputs, mspec, params) -> str:
    if getattr(inputs, "non_lora_names", None):  # LLaVA-repo checkpoints: the projector replaces the base's
        if spec.format == "lora" or spec.base is None:
            raise ArtifactError(
                f"{inputs.refs[0]}: LLaVA-repo checkpoints carry a trained mm_projector "
                f"(non_lora_trainables.bin), which a LoRA artifact cannot hold: write full weights "
                f"(--format full/auto with --base, the llava-hf base model)"
            )
        return "full"
    if spec.format == "full" and spec.base is None:
        raise ArtifactError("format=full writes base + merged update: pass the base model (--base)")
    if spec.format != "auto":
        if spec.format == "lora" and spec.rank is None and inputs.kind == "dense":
            log.warning(
                "LoRA from full checkpoints by exact SVD can be as large as the model; consider --rank"
            )
        return spec.format
    if inputs.kind == "dense":
        return "full"
    if mspec.returns_lowrank(params):
        return "lora"
    return "full" if spec.base is not None else "lora"


def _io_error(e: BaseException, doing: str) -> ArtifactError:
    """An OS-level failure while writing, as the one-line error of the README."""
    code = fsio.io_errno(e)
    hint = {
        errno.ENOSPC: "free some space, or write elsewhere (--out / --cache-dir)",
        errno.EDQUOT: "free some space, or write elsewhere (--out / --cache-dir)",
        errno.EROFS: "the file system is read-only: write elsewhere (--out / --cache-dir) or pass --no-cache",
        errno.EACCES: "no permission: write elsewhere (--out / --cache-dir)",
        errno.EPERM: "no permission: write elsewhere (--out / --cache-dir)",
        errno.ENOTDIR: "a path component is a file, not a folder",
        errno.EEXIST: "a file is in the way",
    }.get(code, "nothing was published")
    return ArtifactError(f"{doing}: {fsio.os_error_text(e)} ({hint})")


def _stage(msg: str) -> None:
    print(f"[harness-merge] {msg}", file=sys.stderr, flush=True)


def _is_io_error(e: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(e, OSError) or (isinstance(e, SafetensorError) and fsio.io_errno(e) is not None)


def merge(
    spec: MergeSpec,
    *,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    force: bool = False,
    trust_remote_code: bool = False,
    content_hash: str | None = None,
) -> Artifact:
    """Merge ``spec.adapters`` with ``spec.method``; see ``MergeSpec``.

    Everything checkable is checked before any tensor is read; on error nothing
    is written. With ``out``, the artifact is (also) published there.
    LoRA inputs are checked to fit ``spec.base`` when one is given
    (:func:`harness_merge.inputs.fit.check_lora_fits`, the base built on the
    meta device; ``trust_remote_code`` for its config).
    A merge estimated beyond ``HARNESS_MERGE_MAX_SECONDS`` is refused before it
    starts (:mod:`harness_merge.cost`) unless ``force`` (or a cache hit).
    ``content_hash`` (``xxh3_128`` | ``sha256``; default ``HARNESS_MERGE_HASH``
    or ``xxh3_128``) names the digest of the inputs and of the entry's files.
    """
    mspec = methods.get(spec.method)
    params = mspec.make_params(spec.params)
    try:
        content_hash = fsio.content_hash_name(content_hash)
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None:
        check_out_dir(out_path)
    inputs = open_inputs(spec.adapters, base=spec.base)
    validate_plan(inputs, mspec, params)
    fmt = _resolve_format(spec, inputs, mspec, params)
    if spec.base is not None:
        check_lora_fits(inputs, spec.base, trust_remote_code=trust_remote_code)
    dtype = spec.dtype or inputs.weight_dtype()
    say = _stage if progress else (lambda msg: None)

    cache = MergeCache(cache_dir, content_hash=content_hash) if use_cache else None
    n_bytes = sum(p.stat().st_size for files in inputs.files for p in files)
    say(
        f"{mspec.name}: {len(inputs.refs)} {'LoRA adapters' if inputs.kind == 'lora' else 'checkpoints'}, "
        f"{len(inputs.module_names)} modules -> {fmt}; hashing the inputs ({n_bytes / 2**20:.1f} MiB)"
    )
    # e.g. wa (lambda 1) on checkpoints as full weights: the base is neither read nor hashed
    base_free = inputs.kind == "dense" and fmt == "full" and not params.needs_base()
    prov = Provenance.build(
        inputs=inputs,
        mspec=mspec,
        params=params,
        fmt=fmt,
        dtype=dtype,
        base=spec.base,
        rank=spec.rank,
        hasher=cache.hasher if cache is not None else FileHasher(None, content_hash),
        base_free=base_free,
    )
    build = _Build(spec, inputs, mspec, params, fmt, dtype, prov, progress, base_free)
    doing = "writing the merge"
    try:
        if cache is not None:
            key = prov.cache_key()
            if cache.lookup(key) is None:  # a hit is never refused for its cost
                check_cost(inputs, mspec, params, fmt, force=force)
            doing = f"writing the merge cache entry under {cache.merges}"
            path, hit = cache.get_or_build(key, build)
            if out_path is not None:
                doing = f"publishing {out_path}"
                path = _publish_entry(cache, key, path, out_path, build)
        else:
            check_cost(inputs, mspec, params, fmt, force=force)
            parent = out_path.parent if out_path is not None else Path.cwd()
            doing = f"writing the merge in {parent}"
            path, hit = _build_uncached(parent, build), False
            if out_path is not None:
                doing = f"publishing {out_path}"
                publish_built(path, out_path)
                path = out_path
        final_manifest = json.loads((path / MANIFEST).read_text())
    except Exception as e:
        if _is_io_error(e):
            raise _io_error(e, doing) from None
        raise
    log.info("merge %s (%s): %s%s", mspec.name, fmt, path, " [cache hit]" if hit else "")
    return Artifact(path=path, kind=fmt, manifest=final_manifest, cache_hit=hit)


@dataclass(frozen=True)
class _Build:
    """``build(tmp)``: stream the merge into ``tmp`` and write the manifest last."""

    spec: MergeSpec
    inputs: Any
    mspec: Any
    params: Any
    fmt: str
    dtype: str
    prov: Provenance
    progress: bool
    base_free: bool = False  # the method does not use the base (e.g. wa): only the fine-tunes are read

    def _results(self, *, blockwise: bool = False):
        inputs, mspec, params, progress = self.inputs, self.mspec, self.params, self.progress
        if getattr(inputs, "dora", False):
            from .merge_dora import iter_merged_dora

            results = iter_merged_dora(inputs, mspec, params, progress=progress)
        else:
            # The LoRA writer only casts factors (no truncation without --rank): as stored is enough.
            stored = self.fmt == "lora" and self.spec.rank is None
            results = iter_merged(
                inputs, mspec, params, progress=progress, stored_dtype=stored, blockwise=blockwise
            )
        if self.prov.non_lora is not None:
            import itertools

            from .merge_non_lora import iter_non_lora

            results = itertools.chain(results, iter_non_lora(inputs))
        return results

    def _write(self, tmp: Path) -> dict:
        spec, inputs, mspec, params = self.spec, self.inputs, self.mspec, self.params
        # The checkpoint writers stream each tensor: pointwise work comes to them block by block.
        results = self._results(blockwise=self.fmt != "lora" and inputs.kind == "dense")
        if self.fmt == "lora":
            base_name = spec.base or (inputs.base_model_name() if inputs.kind == "lora" else None)
            return write_lora(results, tmp, dtype=self.dtype, rank=spec.rank, base_model_name=base_name)
        if inputs.kind == "lora":
            # The writer drives the merge in the base's storage order (streamed, shard by shard);
            # DoRA weights and replaced tensors come as one stream the writer places as they come.
            replaced = list(self.prov.non_lora["tensors"]) if self.prov.non_lora else []
            merged = (
                results
                if (getattr(inputs, "dora", False) or replaced)
                else (lambda names: iter_merged(inputs, mspec, params, progress=self.progress, names=names))
            )
            return write_full_from_lora(merged, inputs, spec.base, tmp, dtype=spec.dtype, replaced=replaced)
        if self.base_free:
            return write_full_base_free(
                iter_merged_base_free(inputs, mspec, params, progress=self.progress, blockwise=True),
                inputs,
                tmp,
            )
        return write_full_from_checkpoints(results, inputs, tmp)

    def __call__(self, tmp: Path) -> None:
        t0 = time.perf_counter()
        info = self._write(tmp)
        manifest = self.prov.manifest()
        manifest["result"] = info
        manifest["merge_seconds"] = round(time.perf_counter() - t0, 3)
        if "svd_rel_error" in info:
            e = info["svd_rel_error"]
            log.warning(
                "low-rank approximation: relative Frobenius error max %.3g, mean %.3g over %d modules",
                e["max"],
                e["mean"],
                e["modules"],
            )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _publish_entry(cache: MergeCache, key: str, entry: Path, out_path: Path, build: _Build) -> Path:
    """Copy a cache entry to ``out_path``; an entry damaged after it verified is
    moved aside, rebuilt and copied again (never served)."""
    try:
        publish(entry, out_path, files=read_files_record(entry))
    except fsio.CopyMismatch as e:
        cache.move_aside(key, str(e))
        entry, _ = cache.get_or_build(key, build)
        publish(entry, out_path, files=read_files_record(entry))
    return out_path


def _build_uncached(parent: Path, build: _Build) -> Path:
    """``--no-cache``: build in a temp folder under ``parent`` (removed on failure)."""
    parent.mkdir(parents=True, exist_ok=True)
    fsio.clean_stale(parent, ".hm-build-")  # builds of killed --no-cache merges
    tmp = fsio.make_temp_dir(parent, ".hm-build-")
    try:
        build(tmp)
        fsio.fault("build.written")
    except BaseException:
        fsio.rmtree(tmp)
        raise
    return tmp
