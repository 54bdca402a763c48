"""Modality merging: models that share one language model and differ in encoders
and connectors (the MLLM merging benchmark's Table 4 / Appendix D setting:
vision-, audio- and video-language models fine-tuned from the same LLM).

``merge_modalities(base_llm, {modality: checkpoint}, method, params, out)``:

1. **shared tensors**: each tensor of the text-only base LLM (``model.layers...``,
   ``model.embed_tokens``, ``model.norm``, ``lm_head``) is found in every
   modality checkpoint as the unique key that ends with ``"." + name`` and has
   the same shape (``language_model.model.layers.0...`` in LLaVA,
   ``language_model.model.model.layers.0...`` in Qwen2-Audio, ...). A base
   tensor missing from a checkpoint is an error: the models must share the LLM.
2. only those are merged, as task vectors ``tau_m = theta_m - theta_base``, with
   any registered method (streamed through :func:`harness_merge.merge_loop.iter_merged`,
   the same 1-D/embedding policy as full-checkpoint merges);
3. every other tensor of a checkpoint (its encoder and connector) is kept
   **bit for bit**.

The artifact is one folder holding one servable model per modality,
``<out>/<modality>/`` (the modality's own config, processor and encoder/connector
weights, with the merged LLM), and ``harness_merge.json`` recording the method,
the shared and the kept tensors per modality. Each modality is served through
the merged LLM by pointing a backend at its folder (``pretrained=<out>/vision``);
lmms-eval's model ``merged`` serves all of them at once, each request routed to
the modality its inputs need (``pretrained=<out>,method=none``, or
``modalities={...}`` merged on load; :mod:`harness_merge.harness.modality_serving`).
CLI: ``harness-merge merge-modalities --base LLM --modality vision=DIR ... --method M --out OUT``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file

from . import __version__, methods
from .artifact import fsio
from .errors import InputError, MethodParamError
from .inputs.checkpoint import _EMBEDDING_LIKE, Checkpoint
from .inputs.files import checked_float, resolve_ref
from .merge_loop import iter_merged, validate_plan
from .types import Dense, ModuleInputs

MANIFEST = "harness_merge.json"


def shared_key_map(base: Checkpoint, model: Checkpoint) -> dict[str, str]:
    """{base tensor name: the model's tensor name} for the shared language model."""
    out: dict[str, str] = {}
    keys = list(model.where)
    for b in base.where:
        hits = [k for k in keys if (k == b or k.endswith("." + b)) and model.shape(k) == base.shape(b)]
        if len(hits) != 1:
            what = "no tensor" if not hits else f"{len(hits)} tensors ({', '.join(hits[:3])})"
            raise InputError(
                f"{model.ref}: {what} ending in {b!r} with shape {list(base.shape(b))}: the modality models "
                f"must share the base language model {base.ref}"
            )
        out[b] = hits[0]
    return out


class SharedLLMSet:
    """The shared language-model tensors of N modality checkpoints, as task
    vectors against the base LLM (the ``InputSet`` protocol of merge_loop)."""

    kind = "dense"

    def __init__(self, base: Checkpoint, models: list[Checkpoint]):
        self.base, self.models = base, models
        self.maps = [shared_key_map(base, m) for m in models]

    @property
    def refs(self) -> list[str]:
        return [m.ref for m in self.models]

    @property
    def module_names(self) -> list[str]:
        return sorted(self.base.where)

    def shape(self, name):
        return self.base.shape(name)

    def is_matrix(self, name) -> bool:
        return len(self.base.shape(name)) == 2 and not _EMBEDDING_LIKE.search(name)

    def weight_dtype(self) -> str:
        return self.base.dtype(next(iter(self.base.where)))

    def read(self, name: str) -> ModuleInputs:
        th0 = checked_float(self.base.get(name), f"{self.base.ref} [{name}]")
        taus = tuple(
            checked_float(m.get(mp[name]), f"{m.ref} [{mp[name]}]") - th0
            for m, mp in zip(self.models, self.maps)
        )
        return ModuleInputs(name=name, task_vectors=taus, base=th0)


def merge_modalities(
    base_llm: str,
    models: Mapping[str, str],
    method: str,
    params: dict | None = None,
    *,
    out: str | Path,
    progress: bool = False,
) -> dict:
    """Merge the shared LLM of ``models`` ({modality name: checkpoint folder})
    and write ``out`` (see the module docstring). Returns the manifest."""
    if len(models) < 2:
        raise MethodParamError(f"modality merging needs at least two models, got {list(models)}")
    for name in models:
        if not name or "/" in name or name.startswith("."):
            raise MethodParamError(f"modality name {name!r} must be a plain folder name")
    mspec = methods.get(method)
    mparams = mspec.make_params(dict(params or {}))
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise InputError(f"{out}: exists and is not a harness-merge artifact; choose another folder")
    base = Checkpoint(base_llm, resolve_ref(base_llm))
    cks = [Checkpoint(str(p), resolve_ref(str(p))) for p in models.values()]
    inputs = SharedLLMSet(base, cks)
    validate_plan(inputs, mspec, mparams)

    # not fsync'ed (as before); an existing artifact of ours is replaced
    with fsio.atomic_dir(out, replace=True, durable=False) as tmp:
        merged: dict[
            str, object
        ] = {}  # base name -> merged tensor (the LLM only: small next to the encoders)
        for name, res in iter_merged(inputs, mspec, mparams, progress=progress):
            th0 = base.get(name)
            if res is None:
                merged[name] = th0
            else:
                delta = res.delta if isinstance(res, Dense) else res.delta()
                merged[name] = (th0.float() + delta).to(th0.dtype)
        record = {
            "harness_merge_version": __version__,
            "mode": "modality",
            "method": mspec.name,
            "params": mparams.as_dict(),
            "reference_url": mspec.reference_url,
            "base_llm": base_llm,
            "shared_tensors": len(merged),
            "modalities": {},
        }
        for (mod_name, ref), ck, mp in zip(models.items(), cks, inputs.maps):
            d = tmp / mod_name
            d.mkdir()
            inverse = {v: k for k, v in mp.items()}
            weight_map = {}
            for fn in ck.file_names:
                sd = {}
                for k, f in ck.where.items():
                    if f != fn:
                        continue
                    sd[k] = (merged[inverse[k]] if k in inverse else ck.get(k)).contiguous()
                    weight_map[k] = fn
                save_file(sd, str(d / fn), metadata={"format": "pt"})
            if len(ck.file_names) > 1:
                (d / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {}, "weight_map": weight_map})
                )
            for p in ck.path.iterdir():
                if (
                    p.is_file()
                    and not p.name.endswith((".safetensors", ".bin"))
                    and p.name not in ("model.safetensors.index.json", MANIFEST)
                ):
                    shutil.copy2(p, d / p.name)
            kept = sorted(set(ck.where) - set(inverse))
            record["modalities"][mod_name] = {
                "ref": ref,
                "kept_tensors": len(kept),
                "kept_prefixes": sorted({k.split(".")[0] for k in kept}),
            }
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


__all__ = ["SharedLLMSet", "merge_modalities", "shared_key_map"]
