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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__, methods
from .artifact import fsio
from .artifact.cache import (
    MANIFEST,
    FileHasher,
    MergeCache,
    cache_key,
    code_version,
    read_files_record,
)
from .artifact.publish import check_out_dir, publish, publish_built
from .artifact.writer import (
    write_full_base_free,
    write_full_from_checkpoints,
    write_full_from_lora,
    write_lora,
)
from .cost import check_cost
from .errors import ArtifactError, MethodParamError
from .inputs import open_inputs, resolve_ref
from .merge_loop import iter_merged, iter_merged_base_free, merge_threads, validate_plan

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
) -> Artifact:
    """Merge ``spec.adapters`` with ``spec.method``; see ``MergeSpec``.

    Everything checkable is checked before any tensor is read; on error nothing
    is written. With ``out``, the artifact is (also) published there.
    A merge estimated beyond ``HARNESS_MERGE_MAX_SECONDS`` is refused before it
    starts (:mod:`harness_merge.cost`) unless ``force`` (or a cache hit).
    """
    mspec = methods.get(spec.method)
    params = mspec.make_params(spec.params)
    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None:
        check_out_dir(out_path)
    inputs = open_inputs(spec.adapters, base=spec.base)
    validate_plan(inputs, mspec, params)
    fmt = _resolve_format(spec, inputs, mspec, params)
    dtype = spec.dtype or inputs.weight_dtype()
    say = _stage if progress else (lambda msg: None)

    cache = MergeCache(cache_dir) if use_cache else None
    hasher = cache.hasher if cache is not None else FileHasher(None)
    n_bytes = sum(p.stat().st_size for files in inputs.files for p in files)
    say(
        f"{mspec.name}: {len(inputs.refs)} {'LoRA adapters' if inputs.kind == 'lora' else 'checkpoints'}, "
        f"{len(inputs.module_names)} modules -> {fmt}; hashing the inputs ({n_bytes / 2**20:.1f} MiB)"
    )
    base_files = None
    # wa (lambda 1) on checkpoints as full weights: the base is neither read nor hashed
    base_free = inputs.kind == "dense" and fmt == "full" and not params.needs_base()
    if spec.base is not None and (fmt == "full" or inputs.kind == "dense") and not base_free:
        base_dir = resolve_ref(spec.base)
        base_files = sorted(p for p in base_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    # One input per thread: hashlib and file reads release the GIL.
    with ThreadPoolExecutor(merge_threads(), thread_name_prefix="harness-merge-hash") as ex:
        jobs = [ex.submit(hasher.many, files) for files in inputs.files]
        base_job = ex.submit(hasher.many, base_files) if base_files is not None else None
        adapter_hashes = [j.result() for j in jobs]
        base_hash = base_job.result() if base_job is not None else None
    record = {
        "code_version": code_version(),
        "method": mspec.name,
        "params": params.as_dict(),
        "inputs_kind": inputs.kind,
        "adapters": adapter_hashes,
        "base": base_hash,
        "format": fmt,
        "rank": spec.rank,
        "dtype": dtype,
    }
    dora = bool(getattr(inputs, "dora", False))
    if dora:
        from .merge_dora import RECORD as DORA_RECORD

        record["dora"] = DORA_RECORD
    manifest = {
        "harness_merge_version": __version__,
        "method": mspec.name,
        "params": params.as_dict(),
        "reference_url": mspec.reference_url,
        "inputs_kind": inputs.kind,
        "adapters": [{"ref": r, "sha256": h} for r, h in zip(inputs.refs, adapter_hashes)],
        "base": {"ref": spec.base, "sha256": base_hash} if spec.base else None,
        "format": fmt,
        "rank_requested": spec.rank,
        "dtype": dtype,
        "code_version": record["code_version"],
    }
    if dora:
        manifest["dora"] = DORA_RECORD
    non_lora = list(getattr(inputs, "non_lora_names", None) or [])
    if non_lora:
        from .merge_non_lora import RECORD as NON_LORA_RECORD

        manifest["non_lora"] = {**NON_LORA_RECORD, "tensors": non_lora, "layout": "llava_repo"}

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        if dora:
            from .merge_dora import iter_merged_dora

            results = iter_merged_dora(inputs, mspec, params, progress=progress)
        else:
            results = iter_merged(inputs, mspec, params, progress=progress)
        if non_lora:
            import itertools

            from .merge_non_lora import iter_non_lora

            results = itertools.chain(results, iter_non_lora(inputs))
        if fmt == "lora":
            base_name = spec.base or (inputs.base_model_name() if inputs.kind == "lora" else None)
            info = write_lora(results, tmp, dtype=dtype, rank=spec.rank, base_model_name=base_name)
        elif inputs.kind == "lora":
            # The writer drives the merge in the base's storage order (streamed, shard by shard);
            # DoRA weights and replaced tensors come as one stream the writer places as they come.
            merged = (
                results
                if (dora or non_lora)
                else (lambda names: iter_merged(inputs, mspec, params, progress=progress, names=names))
            )
            info = write_full_from_lora(merged, inputs, spec.base, tmp, dtype=spec.dtype, replaced=non_lora)
        elif base_free:
            info = write_full_base_free(
                iter_merged_base_free(inputs, mspec, params, progress=progress), inputs, tmp
            )
        else:
            info = write_full_from_checkpoints(results, inputs, tmp)
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

    doing = "writing the merge"
    try:
        if cache is not None:
            key = cache_key(record)
            if cache.lookup(key) is None:  # a hit is never refused for its cost
                check_cost(inputs, mspec, params, fmt, force=force)
            doing = f"writing the merge cache entry under {cache.merges}"
            path, hit = cache.get_or_build(key, build)
            final_manifest = json.loads((path / MANIFEST).read_text())
            if out_path is not None:
                doing = f"publishing {out_path}"
                try:
                    publish(path, out_path, files=read_files_record(path))
                except fsio.CopyMismatch as e:  # damaged after it verified: never serve it
                    cache.move_aside(key, str(e))
                    path, hit = cache.get_or_build(key, build)
                    final_manifest = json.loads((path / MANIFEST).read_text())
                    publish(path, out_path, files=read_files_record(path))
                path = out_path
        else:
            check_cost(inputs, mspec, params, fmt, force=force)
            parent = out_path.parent if out_path is not None else Path.cwd()
            doing = f"writing the merge in {parent}"
            parent.mkdir(parents=True, exist_ok=True)
            fsio.clean_stale(parent, ".hm-build-")  # builds of killed --no-cache merges
            tmp = fsio.make_temp_dir(parent, ".hm-build-")
            try:
                build(tmp)
                fsio.fault("build.written")
            except BaseException:
                fsio.rmtree(tmp)
                raise
            path, hit = tmp, False
            final_manifest = json.loads((path / MANIFEST).read_text())
            if out_path is not None:
                doing = f"publishing {out_path}"
                publish_built(tmp, out_path)
                path = out_path
    except Exception as e:
        if _is_io_error(e):
            raise _io_error(e, doing) from None
        raise
    log.info("merge %s (%s): %s%s", mspec.name, fmt, path, " [cache hit]" if hit else "")
    return Artifact(path=path, kind=fmt, manifest=final_manifest, cache_hit=hit)
