"""The vLLM backend: the merge artifact served by a vLLM engine.

- artifact "lora": the base's engine with ``enable_lora=True,
  max_lora_rank=R`` and a ``LoRARequest`` on every request. ``R`` is the
  smallest value vLLM allows (1, 8, 16, 32, 64, 128, 256, 320, 512) that holds
  the artifact's rank. An artifact whose rank is above the user's
  ``max_lora_rank`` or above 512 is refused BEFORE vLLM is imported or an
  engine starts (vLLM would kill the engine at the first request). LoRA on
  vision-tower / connector modules turns on ``enable_tower_connector_lora``
  (without it vLLM silently ignores them).
- artifact "full": an engine on ``artifact.path`` (the folder has the base's
  tokenizer/processor files). None: the base model alone.
- prompts: rendered exactly as the hf backend does (``base.render_prompt`` with
  the base's processor / tokenizer); images go as ``multi_modal_data``. All
  requests of a call go to vLLM in ONE ``generate`` call, one
  ``SamplingParams`` per request (:func:`.._common.sampling`: ``until`` ->
  ``stop``, ``max_new_tokens``, temperature / top_p).
- loglikelihood: ``prompt_logprobs=0`` on context + continuation token ids
  (tokenised as the hf backend does), summed over the continuation;
  is_greedy = every continuation token has rank 1.

Engines come from an :class:`~.engine_pool.EnginePool` (option ``pool``; the
process-wide default pool when none is given): see :mod:`.engine_pool`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._common import is_multimodal_config, load_config, load_processor, sampling, set_chat_template
from ..base import (
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
from .engine_pool import MM_PROCESSOR_KEYS, EnginePool, VLLMEngine, default_pool, import_vllm, on_cpu
from .engine_pool import engine_opts as llm_kwargs
from .lora import LoraInfo, check_lora_rank, check_lora_supported, inspect_lora

log = logging.getLogger("harness_merge.backends.vllm")

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
    "pool",
    "decode",
    "skip_special_tokens",
)
# decode="vllm": the answer is vLLM's own output text (its incremental detokenizer), as
# lm-eval's vllm class returns it; skip_special_tokens=False keeps special tokens in it
# (lm-eval's vllm class: skip_special_tokens=False, spaces_between_special_tokens=False)
OPTIONS = COMMON_OPTIONS + VLLM_OPTIONS + EXTRA_OPTIONS
DEFAULT_MAX_NEW_TOKENS = 256


def _kind(artifact: Any) -> str | None:
    kind = getattr(artifact, "kind", None) if artifact is not None else None
    if kind not in (None, "lora", "full"):
        raise BackendError(f"unknown artifact kind {kind!r} (expected 'lora' or 'full')")
    return kind


def prepare_engine(
    base: str,
    artifacts: Sequence[Any] = (),
    *,
    max_images: int | None = None,
    pool: EnginePool | None = None,
    **opts: Any,
) -> VLLMEngine:
    """Declare up front the LoRA artifacts one engine on ``base`` will serve:
    checks every rank (refused before any start), sizes ``max_lora_rank``
    (largest rank), ``max_loras`` (``opts['max_loras']`` or min(N, 4) adapters per
    batch), the CPU LoRA cache (N) and tower LoRA, starts the engine once and
    keeps it (``keep=True``) until ``engine.close()`` / ``pool.close()``.
    Later ``load(artifact, base, pool=pool, **same_opts)`` calls reuse it
    (``pool``: the :class:`EnginePool` to use, default :func:`default_pool`)."""
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
    eng = (pool or default_pool()).get(base, keep=True, **opts)
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

    Extra options (Python callers): ``pool`` (the :class:`EnginePool` whose
    engines it uses; default :func:`default_pool`), ``engine`` (a
    :class:`VLLMEngine` to use), ``share`` (default True: reuse the pool's
    engine for the same model and engine options; False: a private engine,
    shut down with the backend), ``max_loras``, ``max_images`` (images per prompt the
    engine starts with; grown on demand), ``seed``, ``max_num_seqs``.
    """
    _check_options(opts)
    kind = _kind(artifact)
    info = None
    served = None
    if kind == "lora":
        info = inspect_lora(artifact.path)
        if info.dora:  # vLLM has no DoRA: serve the folded weights
            artifact, served = fold_dora(artifact, base)
            info = None
        else:
            check_lora_rank(info, opts.get("max_lora_rank"))  # before vllm is even imported
            check_lora_supported(base, bool(opts.get("trust_remote_code")))
    check_processor_files(str(artifact.path) if kind in ("full",) or served else base)
    backend = VLLMBackend(artifact, base, info, **opts)
    if served:
        backend.info.extra["served"] = served
    return backend


def check_processor_files(model: str) -> None:
    """Refuse (before vLLM starts) a local InternVL folder without
    ``video_preprocessor_config.json``: vLLM's InternVL processor loads the video
    processor too and dies with "Can't load video processor" (vllm 0.32)."""
    p = Path(model)
    cfg = p / "config.json"
    if not cfg.is_file():
        return
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except ValueError:
        return
    if model_type == "internvl" and not (p / "video_preprocessor_config.json").is_file():
        raise BackendError(
            f"backend=vllm cannot serve {p}: vLLM's InternVL processor also loads the video processor, and the "
            f"folder has no video_preprocessor_config.json (checkpoints converted for transformers have one). "
            f"Save one there (transformers.InternVLVideoProcessor(...).save_pretrained(folder)) or use backend=hf."
        )


def fold_dora(artifact: Any, base: str, *, cache_dir: Any = None) -> tuple[Any, dict]:
    """A DoRA LoRA artifact as full weights ``W = m * (W0 + s B A) / ||W0 + s B A||_row``
    (vLLM refuses DoRA adapters: "vLLM does not yet support DoRA"). Folded by
    the merge itself (``ta`` with scaling 1 on the one adapter returns it, see
    :mod:`harness_merge.merge_dora`), so it is written by the streaming
    full-weights writer and published through the merge cache (``cache_dir``,
    default the package's cache root). Returns ``(full artifact, record)``;
    the record (``served``) goes into the backend's info and the harness's
    ``config.merge``."""
    from ...api import MergeSpec, merge

    try:
        full = merge(
            MergeSpec(
                adapters=(str(artifact.path),), method="ta", params={"scaling": 1.0}, base=base, format="full"
            ),
            cache_dir=cache_dir,
            progress=False,
        )
    except Exception as e:
        raise BackendError(
            f"backend=vllm: the DoRA artifact {artifact.path} must be served as full weights (vLLM has no DoRA), "
            f"and folding it onto {base} failed: {type(e).__name__}: {e}"
        ) from e
    served = {
        "as": "full",
        "why": "vLLM has no DoRA support (vllm/lora/peft_helper.py: 'vLLM does not yet support DoRA')",
        "dora_artifact": str(artifact.path),
        "full_artifact": str(full.path),
        "fold": "m * (W0 + s B A) / ||W0 + s B A||_row, written by artifact/full_weights.py",
        "cache_hit": bool(full.cache_hit),
    }
    log.warning("backend=vllm: DoRA artifact %s served as full weights %s", artifact.path, full.path)
    return full, served


def sampling_kwargs(sp) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords of a :class:`~.._common.Sampling`."""
    kw: dict[str, Any] = {"max_tokens": sp.max_new_tokens, "stop": list(sp.stop) or None}
    if sp.greedy:
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=sp.temperature, top_p=sp.top_p if sp.top_p is not None else 1.0)
    return kw


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
        pool: EnginePool | None = None,
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
            for k, v in zip(MM_PROCESSOR_KEYS, (min_pixels, max_pixels, min_patches, max_patches))
            if v is not None
        }
        # engine options, translated by engine_opts (so prepare_engine(**same opts) finds this engine)
        engine_opts.update(pix, eos_from=eos_from)
        if revision:
            engine_opts["revision"] = revision
        import_vllm()
        self.base = base
        self.kind = _kind(artifact)
        self.lora_info = lora
        self.system_prompt = system_prompt
        if decode not in ("tokenizer", "vllm"):
            raise BackendError(f"backend=vllm: decode must be tokenizer or vllm, got {decode!r}")
        self.decode, self.skip_special_tokens = decode, bool(skip_special_tokens)
        self.default_max_new_tokens = int(max_new_tokens) if max_new_tokens else DEFAULT_MAX_NEW_TOKENS
        if device and str(device).startswith("cuda") and on_cpu():
            log.warning("backend=vllm: device=%s asked for but this vLLM build runs on the CPU", device)
        try:
            config = load_config(base, trust_remote_code)
            self.processor, self.tokenizer = load_processor(base, trust_remote_code, revision=revision, **pix)
            if chat_template:
                set_chat_template(self.processor, self.tokenizer, chat_template)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"cannot load the base model {base!r}: {type(e).__name__}: {e}") from e
        self.supports_images = is_multimodal_config(config)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = str(artifact.path) if self.kind == "full" else base
        eopts = dict(engine_opts, dtype=dtype, trust_remote_code=trust_remote_code or None)
        if engine is None:
            engine = (
                (pool or default_pool()).get(model, **eopts)
                if share
                else VLLMEngine(model=model, opts=llm_kwargs(eopts))
            )
        elif self.kind == "full" and engine.model != model:
            raise BackendError(f"engine serves {engine.model}, not the full artifact {model}")
        self.engine = engine
        engine.attach(self)
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
            self.engine.release(self)
            raise
        self.max_model_len = int(engine.llm.llm_engine.model_config.max_model_len)
        self.info = BackendInfo(
            name="vllm",
            model_class=(getattr(config, "architectures", None) or [type(config).__name__])[0],
            artifact_kind=self.kind,
            dtype=str(engine.llm.llm_engine.model_config.dtype).replace("torch.", ""),
            device="cpu" if on_cpu() else "cuda",
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
        _, SamplingParams, _ = import_vllm()
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
            kw = sampling_kwargs(sampling(r, self.default_max_new_tokens))
            if not self.skip_special_tokens:
                kw.update(skip_special_tokens=False, spaces_between_special_tokens=False)
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
        _, SamplingParams, _ = import_vllm()
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
        """Release the engine; it shuts down when no open backend uses it (unless
        it was prepared for a set: then ``engine.close()`` / ``pool.close()``).
        A backend dropped without ``close()`` stops counting as a user; its
        engine stays idle in the pool (see :mod:`.engine_pool`)."""
        if not getattr(self, "closed", True):
            self.closed = True
            self.engine.release(self)
