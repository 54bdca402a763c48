"""Where a merge comes from: one frozen record, built once, that yields both the
cache key and the manifest written beside the artifact.

The cache key is the sha256 of :meth:`Provenance.record` (code version,
method, params, input kind, the inputs' digests, the base's digest when the
output holds base weights, format, rank, dtype, the DoRA rule, and the content
hash when it is not sha256); the manifest (:meth:`Provenance.manifest`) adds
what a reader wants but what does not change the result (references, the
method's URL, the package version). Digests are named by their algorithm
(``{"ref": ..., "xxh3_128": ...}``; ``"content_hash"`` at the top unless it
is sha256). With
``content_hash=sha256`` keys are byte-for-byte those of the dicts ``api.merge``
built before this class existed (pinned in ``tests/artifact/test_provenance_pin.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cache as _cache


@dataclass(frozen=True)
class Provenance:
    code_version: str
    package_version: str
    method: str
    params: dict[str, Any]
    reference_url: str | None
    inputs_kind: str
    adapter_refs: tuple[str, ...]
    adapter_hashes: tuple[str, ...]
    base_ref: str | None
    base_hash: str | None  # only when the output holds base weights (format full, or checkpoints)
    format: str
    rank: int | None
    dtype: str
    dora: dict | None = None  # the DoRA merge rule (merge_dora.RECORD) for DoRA inputs
    non_lora: dict | None = None  # LLaVA-repo replaced tensors: manifest only, as before
    content_hash: str = "sha256"  # the algorithm of adapter_hashes / base_hash (fsio.HASHES)

    @classmethod
    def build(
        cls,
        *,
        inputs,
        mspec,
        params,
        fmt: str,
        dtype: str,
        base: str | None,
        rank: int | None,
        hasher: _cache.FileHasher,
        base_free: bool = False,
    ) -> Provenance:
        """Hash the inputs (and the base when the output holds its weights, unless
        ``base_free``: a merge that never reads the base, which then has no hash)
        and collect the fields; ``inputs`` is an opened input set, ``mspec`` /
        ``params`` the method and its validated parameters. Inputs are hashed on
        ``merge_threads(factor_threads())`` threads (the hashes release the GIL), with the
        hasher's algorithm."""
        from concurrent.futures import ThreadPoolExecutor

        from .. import __version__
        from ..inputs import resolve_ref
        from ..merge_loop import factor_threads, merge_threads

        base_files = None
        if base is not None and (fmt == "full" or inputs.kind == "dense") and not base_free:
            base_dir = Path(resolve_ref(base))
            base_files = sorted(p for p in base_dir.iterdir() if p.is_file() and p.name != _cache.MANIFEST)
        with ThreadPoolExecutor(
            merge_threads(factor_threads()), thread_name_prefix="harness-merge-hash"
        ) as ex:
            jobs = [ex.submit(hasher.many, files) for files in inputs.files]
            base_job = ex.submit(hasher.many, base_files) if base_files is not None else None
            adapter_hashes = tuple(j.result() for j in jobs)
            base_hash = base_job.result() if base_job is not None else None
        dora = None
        if getattr(inputs, "dora", False):
            from ..merge_dora import RECORD as DORA_RECORD

            dora = DORA_RECORD
        non_lora = None
        tensors = list(getattr(inputs, "non_lora_names", None) or [])
        if tensors:
            from ..merge_non_lora import RECORD as NON_LORA_RECORD

            non_lora = {**NON_LORA_RECORD, "tensors": tensors, "layout": "llava_repo"}
        return cls(
            code_version=_cache.code_version(),
            package_version=__version__,
            method=mspec.name,
            params=params.as_dict(),
            reference_url=mspec.reference_url,
            inputs_kind=inputs.kind,
            adapter_refs=tuple(inputs.refs),
            adapter_hashes=adapter_hashes,
            base_ref=base,
            base_hash=base_hash,
            format=fmt,
            rank=rank,
            dtype=dtype,
            dora=dora,
            non_lora=non_lora,
            content_hash=hasher.algo,
        )

    def record(self) -> dict:
        """What the result depends on: the input of :meth:`cache_key`."""
        rec = {
            "code_version": self.code_version,
            "method": self.method,
            "params": self.params,
            "inputs_kind": self.inputs_kind,
            "adapters": list(self.adapter_hashes),
            "base": self.base_hash,
            "format": self.format,
            "rank": self.rank,
            "dtype": self.dtype,
        }
        if self.dora is not None:
            rec["dora"] = self.dora
        if self.content_hash != "sha256":  # sha256 records keep the keys they had before the choice
            rec["content_hash"] = self.content_hash
        return rec

    def cache_key(self) -> str:
        return _cache.cache_key(self.record())

    def manifest(self) -> dict:
        """The manifest written as ``harness_merge.json`` (before the build adds
        ``result`` and ``merge_seconds``); a fresh dict on every call."""
        man = {
            "harness_merge_version": self.package_version,
            "method": self.method,
            "params": self.params,
            "reference_url": self.reference_url,
            "inputs_kind": self.inputs_kind,
            "adapters": [
                {"ref": r, self.content_hash: h} for r, h in zip(self.adapter_refs, self.adapter_hashes)
            ],
            "base": {"ref": self.base_ref, self.content_hash: self.base_hash} if self.base_ref else None,
            "format": self.format,
            "rank_requested": self.rank,
            "dtype": self.dtype,
            "code_version": self.code_version,
        }
        if self.content_hash != "sha256":
            man["content_hash"] = self.content_hash
        if self.dora is not None:
            man["dora"] = self.dora
        if self.non_lora is not None:
            man["non_lora"] = self.non_lora
        return man


__all__ = ["Provenance"]
