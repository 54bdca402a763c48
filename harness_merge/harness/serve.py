"""Merge and serve for the harness adapters: :func:`load_merged` (merge through
``harness_merge.api.merge``, then load a backend), the run id naming the
results (:func:`run_id`), data-parallel placement (:func:`dist_env`,
:func:`rank_device`) and whether a merge shows its bar (:func:`merge_progress`).
Imports no harness; transformers and the backends only when a model loads.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from ..artifact import fsio


@dataclass
class Loaded:
    backend: Any
    artifact: Any
    record: dict


def _say(msg: str) -> None:
    print(f"[harness-merge] {msg}", file=sys.stderr, flush=True)


def merge_progress() -> bool:
    """Whether a merge inside a harness shows its bar (on stderr): yes unless the
    harness runs quieter than INFO. lmms-eval exports ``--verbosity`` as
    ``$VERBOSITY``; lm-eval sets the level of the ``lm_eval`` logger.
    ``HARNESS_MERGE_PROGRESS=0|1`` decides over both."""
    import logging
    import os

    forced = os.environ.get("HARNESS_MERGE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    verbosity = os.environ.get("VERBOSITY")
    if verbosity:
        return (
            logging.getLevelName(verbosity.upper()) in (logging.DEBUG, logging.INFO)
            or verbosity.upper() == "TRACE"
        )
    lm_eval = logging.getLogger("lm_eval")
    return lm_eval.level == logging.NOTSET or lm_eval.level <= logging.INFO


def run_id(hargs, manifest: dict | None) -> str:
    """A readable id of what is served: ``<base name>__<method>-<hash8>``, the
    hash over the base reference (with revision/subfolder), the method, its
    resolved parameters, the adapters' digests and the artifact options; the base
    alone is ``<base name>__none``. Used as the results' ``model_name`` and
    output folder, so runs of different merges never mix."""
    import hashlib
    import json
    import re

    name = str(hargs.pretrained).rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    sub = hargs.backend_opts.get("subfolder")
    if sub:
        name = f"{name}-{str(sub).strip('/').replace('/', '-')}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    if hargs.method == "none" or not manifest:
        return f"{name}__none"
    payload = {
        "base": str(hargs.pretrained),
        "revision": hargs.backend_opts.get("revision"),
        "subfolder": sub,
        "method": manifest.get("method", hargs.method),
        "params": manifest.get("params", hargs.params),
        "adapters": [(fsio.digest_of(a) or (None, None))[1] for a in manifest.get("adapters", [])],
        "format": hargs.format,
        "rank": hargs.rank,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}__{payload['method']}-{digest}"


def dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` set by ``accelerate launch`` / ``torchrun``."""
    import os

    def _int(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return _int("RANK", 0), _int("LOCAL_RANK", 0), max(1, _int("WORLD_SIZE", 1))


def rank_device(opts: dict, backend: str) -> dict:
    """Data parallel (several processes, one model each): bind this process's
    model to ``cuda:<LOCAL_RANK>`` when the device is unset or a bare ``cuda``,
    as the harnesses' own models do; CPU runs stay on the CPU. vLLM places its
    engine itself (``tensor_parallel_size`` / ``data_parallel_size``)."""
    _, local_rank, world = dist_env()
    if world <= 1 or backend != "hf" or opts.get("device_map"):
        return opts
    dev = opts.get("device")
    if dev in (None, "", "auto", "cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return {**opts, "device": f"cuda:{local_rank}"}
        except ImportError:
            pass
        if dev in (None, "", "auto"):
            return {**opts, "device": "cpu"}
    return opts


def load_merged(hargs, extra_opts: dict | None = None) -> Loaded:
    """Merge ``hargs`` (a :class:`~.model_args.HarnessArgs`) and serve it.

    The merge goes through the content-addressed cache, so a second run with
    the same inputs does no merge work (``record["cache_hit"]``).
    ``extra_opts`` (a prompt profile's backend options) are passed to the
    backend under the user's own options.
    """
    from ..api import merge
    from ..backends import load_backend

    spec = hargs.merge_spec()
    t0 = time.perf_counter()
    served = None
    if spec is None:
        _say(f"serving the base model {hargs.pretrained} alone (method=none) with backend={hargs.backend}")
        art, m = None, {"method": "none", "adapters": []}
    else:
        _say(
            f"merging {len(spec.adapters)} adapter(s) onto {spec.base} with method={spec.method} "
            f"params={dict(spec.params) or '{}'} format={spec.format} backend={hargs.backend}"
        )
        asked = spec.format
        spec = _dora_for_backend(spec, hargs.backend)
        if spec.format != asked:
            served = {
                "as": "full",
                "why": "DoRA adapters with backend=vllm: vLLM has no DoRA support, format=auto wrote full weights",
            }
        art = merge(  # checks that the adapters fit the base (inputs.fit) before any tensor is read
            spec,
            cache_dir=hargs.cache_dir,
            progress=merge_progress(),
            trust_remote_code=bool(hargs.backend_opts.get("trust_remote_code", False)),
        )
        m = art.manifest
        hashes = ", ".join(
            f"{a.get('ref')}@{(fsio.digest_of(a) or ('', 'None'))[1][:12]}" for a in m.get("adapters", [])
        )
        _say(
            f"merge {'[cache hit] ' if art.cache_hit else ''}{m.get('method')} -> {art.kind} artifact {art.path} "
            f"in {time.perf_counter() - t0:.2f}s; params={m.get('params')}; adapters: {hashes}"
        )
    t_merge = time.perf_counter() - t0
    t1 = time.perf_counter()
    opts = rank_device({**(extra_opts or {}), **hargs.backend_opts}, hargs.backend)
    backend = load_backend(hargs.backend, art, hargs.pretrained, **opts)
    t_load = time.perf_counter() - t1
    info = getattr(backend, "info", None)
    _say(
        f"backend {hargs.backend} loaded in {t_load:.2f}s"
        + (
            f" ({info.model_class}, {info.dtype}, {info.device}{', LoRA folded' if info.folded else ''})"
            if info is not None
            else ""
        )
    )
    record = {
        "model_name": run_id(hargs, m if art is not None else None),
        "base": hargs.pretrained,
        "backend": hargs.backend,
        "backend_opts": {k: v for k, v in opts.items() if k != "system_prompt"},
        "artifact": {"path": str(art.path), "kind": art.kind} if art is not None else None,
        "cache_hit": bool(art.cache_hit) if art is not None else None,
        "merge_seconds": round(t_merge, 3),
        "load_seconds": round(t_load, 3),
        "manifest": m,
    }
    served = served or (getattr(info, "extra", None) or {}).get("served")
    if served:  # how the backend serves the merge when not as written (e.g. DoRA on vLLM: full weights)
        record["served"] = served
    return Loaded(backend=backend, artifact=art, record=record)


def _dora_for_backend(spec, backend: str):
    """vLLM has no DoRA: DoRA adapters with ``format=auto`` are served from full weights."""
    if backend != "vllm" or spec.format != "auto":
        return spec
    from dataclasses import replace
    from pathlib import Path

    from ..inputs.dora import is_dora_dir

    if any(is_dora_dir(Path(a)) for a in spec.adapters):
        _say("DoRA adapters with backend=vllm (no DoRA support there): writing full merged weights")
        return replace(spec, format="full")
    return spec


def close_backends() -> None:
    """Shut down the vLLM engines the run started (the vLLM backend's default
    :class:`~harness_merge.backends.vllm.EnginePool`); called by the harness
    CLIs when the evaluation ends. Imports nothing when vLLM was never used."""
    mod = sys.modules.get("harness_merge.backends.vllm")
    close = getattr(mod, "close_default_pool", None)
    if close is not None:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the results are written; say it and go on
            print(
                f"[harness-merge] closing the vLLM engines failed: {type(e).__name__}: {e}", file=sys.stderr
            )
