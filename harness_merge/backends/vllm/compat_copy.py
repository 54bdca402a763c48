"""LLaVA checkpoints saved by transformers 5, made loadable by vLLM.

transformers 5 saves LLaVA's CLIP/SigLIP tower as ``vision_tower.<x>``;
vLLM's loader wants ``vision_tower.vision_model.<x>`` (the layout of the hub
checkpoints). Such a folder is rewritten once (weights with renamed keys, the
other files copied) and published through the merge cache
(:class:`harness_merge.artifact.cache.MergeCache`: content-addressed by the
source files' digests, built in a temp folder, sealed, renamed into place under
a lock, verified on every hit). Anything else is served as is.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .._common import load_config
from .lora import safetensors_keys

log = logging.getLogger("harness_merge.backends.vllm")

LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")
COMPAT_KIND = "vllm-compat/llava-vision-tower"
COMPAT_VERSION = 1  # bump when the rename changes: a new cache key


def _needs_rename(key: str) -> bool:
    return key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.")


def _renamed(key: str) -> str:
    return "vision_tower.vision_model." + key[len("vision_tower.") :] if _needs_rename(key) else key


def vllm_model_dir(model_dir: str | Path, config=None, *, cache_dir: str | Path | None = None) -> str:
    """The folder vLLM should load for ``model_dir``: the folder itself, or its
    renamed copy in the merge cache (``cache_dir``, default the package's one
    cache root, ``HARNESS_MERGE_CACHE`` / ``~/.cache/harness_merge``)."""
    p = Path(model_dir)
    if not p.is_dir():
        return str(model_dir)  # a hub id: hub checkpoints have the layout vLLM expects
    config = config if config is not None else load_config(p)
    if getattr(config, "model_type", None) not in LLAVA_TYPES:
        return str(p)
    shards = sorted(p.glob("*.safetensors"))
    if not any(_needs_rename(k) for f in shards for k in safetensors_keys(f)):
        return str(p)

    from ...artifact.cache import FILES_RECORD, MANIFEST, MergeCache, cache_key

    cache = MergeCache(Path(cache_dir) if cache_dir is not None else None)
    sources = sorted(f for f in p.iterdir() if f.is_file() and f.name != FILES_RECORD)
    key = cache_key({"kind": COMPAT_KIND, "version": COMPAT_VERSION, "files": cache.hasher.many(sources)})

    def build(tmp: Path) -> None:
        from safetensors.torch import load_file, save_file

        for f in sources:
            if not f.name.endswith(".safetensors") and f.name not in (
                "model.safetensors.index.json",
                MANIFEST,
            ):
                shutil.copy2(f, tmp / f.name)
        weight_map = {}
        for f in shards:
            renamed = {}
            for k, v in load_file(str(f)).items():
                renamed[_renamed(k)] = v
                weight_map[_renamed(k)] = f.name
            save_file(renamed, str(tmp / f.name), metadata={"format": "pt"})
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
        src_manifest = None
        if (p / MANIFEST).is_file():
            try:
                src_manifest = json.loads((p / MANIFEST).read_text())
            except ValueError:
                src_manifest = None
        (tmp / MANIFEST).write_text(
            json.dumps(
                {
                    "kind": COMPAT_KIND,
                    "version": COMPAT_VERSION,
                    "source": str(p),
                    "source_manifest": src_manifest,
                },
                indent=1,
            )
        )

    out, hit = cache.get_or_build(key, build)
    if not hit:
        log.warning(
            "vLLM: %s has LLaVA vision-tower keys in transformers-5 layout; serving a renamed copy %s", p, out
        )
    return str(out)
