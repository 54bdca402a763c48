"""vLLM backend (``load_backend("vllm", ...)``), in four modules:

- :mod:`.lora`: LoRA inspection and the checks that refuse what vLLM cannot
  serve (no torch, no vLLM);
- :mod:`.compat_copy`: LLaVA checkpoints saved by transformers 5, renamed for
  vLLM's loader and published through the merge cache;
- :mod:`.engine_pool`: :class:`VLLMEngine` and the :class:`EnginePool` that owns
  engines (the default pool, :func:`default_pool`, is closed by its owner with
  :func:`close_default_pool`);
- :mod:`.backend`: :func:`load`, :func:`prepare_engine`, :class:`VLLMBackend`.

vLLM itself is imported only when an engine starts.
"""

from __future__ import annotations

import os

# Read by vLLM's CPU platform (GiB of KV cache); a small default for the shared
# CPU machines. Harmless on GPU. Must be set before vllm is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from .backend import OPTIONS, VLLMBackend, load, load_many, prepare_engine, sampling_kwargs  # noqa: E402
from .compat_copy import vllm_model_dir  # noqa: E402
from .engine_pool import EnginePool, VLLMEngine, close_default_pool, default_pool  # noqa: E402
from .lora import (  # noqa: E402
    ALLOWED_LORA_RANKS,
    MAX_LORA_RANK,
    LoraInfo,
    check_lora_rank,
    check_lora_supported,
    engine_lora_rank,
    inspect_lora,
)


def engines(pool: EnginePool | None = None) -> list[VLLMEngine]:
    """The engines of ``pool`` (default: the default pool)."""
    return (pool or default_pool()).engines()


def get_engine(model, *, pool: EnginePool | None = None, keep: bool = False, **opts) -> VLLMEngine:
    """``pool.get(model, keep=keep, **opts)`` (default: the default pool)."""
    return (pool or default_pool()).get(model, keep=keep, **opts)


def shutdown_engines() -> None:
    """Shut down the default pool's engines (:func:`close_default_pool`)."""
    close_default_pool()


__all__ = [
    "ALLOWED_LORA_RANKS",
    "MAX_LORA_RANK",
    "OPTIONS",
    "EnginePool",
    "LoraInfo",
    "VLLMBackend",
    "VLLMEngine",
    "check_lora_rank",
    "check_lora_supported",
    "close_default_pool",
    "default_pool",
    "engine_lora_rank",
    "engines",
    "get_engine",
    "inspect_lora",
    "load",
    "load_many",
    "prepare_engine",
    "sampling_kwargs",
    "shutdown_engines",
    "vllm_model_dir",
]
