"""Serving a modality merge (:mod:`harness_merge.modality`) as lmms-eval's model
``merged``: one backend per modality folder of the artifact (its encoder and
connector on the merged LLM), each request sent to the modality its inputs
need.

Routing, by what the task's ``doc_to_visual`` returns (what lmms-eval 0.7.3
hands its own models: PIL images for image tasks; ``{"array", "sampling_rate"}``
dicts for audio tasks, as clotho_aqa / air_bench / muchomusic give
``doc["audio"]``; a video file path for video tasks, as nextqa / videomme /
activitynetqa give ``get_video(...)``):

- images -> the first modality named ``vision`` (else the first whose model
  takes images and no video);
- audio  -> the first modality whose model has an audio encoder;
- video  -> the first modality whose model takes videos;
- no visual -> the ``vision`` modality (any: they share the merged LLM).

A request mixing kinds that no single modality model takes is refused here
with the kinds and the modalities available; model 'merged' answers audio +
video (MUSIC-AVQA / AVQA) with the composed model of :mod:`harness_merge.backends.composed_av`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..backends.base import BackendError
from ..modality import MANIFEST

KINDS = ("image", "audio", "video")


def modality_manifest(path: str | Path) -> dict | None:
    """The manifest of a modality-merged artifact folder, or None."""
    p = Path(str(path)) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("mode") == "modality" else None


def _fingerprint(folder: str) -> list:
    """(name, size, mtime_ns) of a model folder's weight files: a changed model is a new merge."""
    d = Path(folder)
    if not d.is_dir():
        raise BackendError(f"model_args: modalities: {folder} is not a folder")
    return [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(d.iterdir())
        if f.suffix in (".safetensors", ".bin", ".json")
    ]


def _say(msg: str) -> None:
    import sys

    print(f"[harness-merge] {msg}", file=sys.stderr, flush=True)


def merged_artifact(hargs, say=_say) -> Path:
    """The artifact folder to serve: ``pretrained`` itself (method=none), or the
    modality merge of ``hargs.modalities`` onto the shared LLM ``pretrained``,
    written once under ``<cache>/modality/<key>`` (the key hashes the inputs'
    weight files, method and params) and reused."""
    if not hargs.modalities:
        return Path(hargs.pretrained)
    from ..artifact.cache import default_cache_dir
    from ..modality import merge_modalities

    payload = {
        "base": [str(Path(hargs.pretrained).resolve()), _fingerprint(hargs.pretrained)],
        "models": {k: [str(Path(v).resolve()), _fingerprint(v)] for k, v in hargs.modalities.items()},
        "method": hargs.method,
        "params": {k: str(v) for k, v in hargs.params.items()},
    }
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(hargs.cache_dir).expanduser() if hargs.cache_dir else default_cache_dir()
    out = root / "modality" / f"{hargs.method}-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(out.parent / f".{out.name}.lock")):  # data-parallel ranks: one merges, the others wait
        if modality_manifest(out) is not None:
            say(f"modality merge [cache hit] {out}")
            return out
        say(
            f"modality merge: shared LLM {hargs.pretrained}, modalities {dict(hargs.modalities)}, "
            f"method={hargs.method} params={dict(hargs.params) or '{}'} -> {out}"
        )
        merge_modalities(hargs.pretrained, dict(hargs.modalities), hargs.method, dict(hargs.params), out=out)
    return out


@dataclass
class Modality:
    name: str
    folder: Path
    backend: Any
    profile: Any
    image_token: str
    kinds: frozenset


def load_modalities(hargs, profile_of, loader, image_token_of) -> tuple[Path, dict, dict[str, Modality]]:
    """(artifact folder, its manifest, {modality: :class:`Modality`}): every
    modality folder loaded through ``loader(hargs_for_folder)`` (the harness's
    ``load_merged``) with its own prompt profile."""
    art = merged_artifact(hargs)
    man = modality_manifest(art)
    if man is None:
        raise BackendError(f"{art}: not a modality-merged artifact (no {MANIFEST} with mode 'modality')")
    mods: dict[str, Modality] = {}
    for name in man["modalities"]:
        folder = art / name
        h = replace(hargs, pretrained=str(folder), adapters=(), method="none", params={}, modalities=None)
        prof = profile_of(h)
        loaded = loader(h, prof)
        be = loaded.backend
        kinds = {
            k
            for k, ok in (
                ("image", getattr(be, "supports_images", False) and not getattr(be, "supports_video", False)),
                ("audio", getattr(be, "supports_audio", False)),
                ("video", getattr(be, "supports_video", False)),
            )
            if ok
        }
        mods[name] = Modality(
            name, folder, be, prof, image_token_of(getattr(be, "processor", None)), frozenset(kinds)
        )
    return art, man, mods


def route(mods: dict[str, Modality], kinds: set[str], task: str) -> Modality:
    """The modality that serves a request with inputs of ``kinds``."""
    if not kinds:
        return mods.get("vision") or next(iter(mods.values()))
    if kinds == {"image"} and "vision" in mods and "image" in mods["vision"].kinds:
        return mods["vision"]
    for m in mods.values():
        if kinds <= m.kinds:
            return m
    if kinds == {"image"}:  # a video model takes images too (Video-LLaVA)
        for m in mods.values():
            if getattr(m.backend, "supports_images", False):
                return m
    have = {n: sorted(m.kinds) for n, m in mods.items()}
    raise BackendError(
        f"task {task}: its requests carry {' + '.join(sorted(kinds))} inputs, which no modality of the merged "
        f"artifact takes on its own (modalities: {have})"
    )


__all__ = ["KINDS", "Modality", "load_modalities", "merged_artifact", "modality_manifest", "route"]
