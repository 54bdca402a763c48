"""transformers backend: the base model with the merge artifact applied.

- base: ``AutoModelForImageTextToText`` when the config has a vision tower
  (Qwen2-VL, LLaVA, ...), else ``AutoModelForCausalLM``; the class named in
  ``config.architectures`` is the fallback.
- artifact "lora": attached with ``PeftModel.from_pretrained``; ``fold=True``
  folds it into the weights (``merge_and_unload``), which is faster per token.
- artifact "full": the artifact folder is loaded as the model; tokenizer,
  processor and chat template come from the base.
- processor: ``AutoProcessor``; where that fails offline (transformers 5's
  Qwen2-VL processor wants a torchvision video processor), the model family's
  processor is built from the tokenizer and the image processor alone.
- audio / video (requests' ``audios`` / ``videos``): a model with an audio
  encoder (``config.audio_config``, e.g. Qwen2-Audio) gets the waveforms through
  its processor (``audio=``, resampled to the feature extractor's rate); a
  model with a video token (``config.video_token_index``, e.g. Video-LLaVA)
  gets ``num_frames`` (default 8) uniformly sampled frames per video, through
  the processor's video processor where one loads, else through its image
  processor (the same CLIP transform for Video-LLaVA; torchvision-free).
- loglikelihood scoring (option ``loglikelihood``): ``sum`` (the default) is
  the sum of the continuation's log-probabilities given the rendered context,
  as every lm-eval class and lmms-eval's other classes return it.
  ``llava_hf`` returns what lmms-eval 0.7.3's ``llava_hf`` class
  (``models/simple/llava_hf.py``) returns, so its published numbers can be
  reproduced: the user turn and the user + assistant(continuation) turns are
  rendered with the *tokenizer's* chat template (Vicuna's, the class's
  fallback, when it has none); the value is the model's own mean
  cross-entropy (``labels=``, positive, higher = less likely) over every token
  after the first ``n`` of the full sequence, ``n`` the length of the user turn
  tokenized *without* expanding the image placeholder (so part of the image
  placeholder and the template's end-of-turn tokens are scored too); the
  greedy flag compares the argmax at positions ``n..`` with the tokens at the
  same positions (unshifted). It is not a log-likelihood (a mean loss, sign
  flipped, over other tokens), hence not the default.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from ._common import (  # noqa: F401 - load_processor / set_chat_template are part of this module's API
    dtype_name,
    has_audio_encoder,
    has_video_input,
    is_multimodal_config,
    load_config,
    load_processor,
    sampling,
    set_chat_template,
)
from .base import (
    BackendError,
    BackendInfo,
    GenRequest,
    LLRequest,
    _text_of,
    cut_at_stop,
    encode_pair,
    lm_encode,
    prefix_token_id,
    render_prompt,
    rolling_windows,
)

log = logging.getLogger("harness_merge.backends.hf")

OPTIONS = (
    "dtype",
    "device",
    "batch_size",
    "max_new_tokens",
    "system_prompt",
    "fold",
    "trust_remote_code",
    "eos_from",
    "min_pixels",
    "max_pixels",
    "min_patches",
    "max_patches",
    "device_map",
    "attn_implementation",
    "revision",
    "subfolder",
    "chat_template",
    "num_frames",
    "loglikelihood",
    "chat_template_from",
)
EOS_FROM = ("generation_config", "tokenizer")
LOGLIKELIHOOD_MODES = ("sum", "llava_hf")
# "processor": base.render_prompt (the processor's template, else the tokenizer's);
# "llava_hf": as lmms-eval's llava_hf class, the tokenizer's template, Vicuna's without one
CHAT_TEMPLATE_FROM = ("processor", "llava_hf")
# lmms-eval 0.7.3 llava_hf.py's VICUNA_CHAT_TEMPLATE: the class's template when the
# tokenizer has none (llava-hf/llava-1.5 checkpoints)
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an "
    "artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to "
    "the user's questions. USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: "
    "{{ message['content'] }} {% else %} ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def load(artifact: Any, base: str, **opts: Any) -> "HFBackend":
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise BackendError(
            f"backend=hf: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            + (
                "; tensor_parallel_size, gpu_memory_utilization, max_model_len, enforce_eager and "
                "max_lora_rank apply to backend=vllm only"
                if any(
                    k in unknown
                    for k in (
                        "tensor_parallel_size",
                        "gpu_memory_utilization",
                        "max_model_len",
                        "enforce_eager",
                        "max_lora_rank",
                    )
                )
                else ""
            )
        )
    return HFBackend(artifact, base, **opts)


def _resolve_dtype(dtype: str | torch.dtype | None):
    name = dtype_name(dtype)
    return "auto" if name == "auto" else getattr(torch, name)


def _resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s requested but CUDA is not available; using cpu", device)
        return "cpu"
    return device


def model_class_for(config):
    """The auto class for this config (image-text-to-text or causal LM)."""
    import transformers

    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText

        candidates = [AutoModelForImageTextToText]
    elif has_audio_encoder(config):  # audio-language (Qwen2-Audio): no auto class, the architecture's own
        candidates = []
    else:
        from transformers import AutoModelForCausalLM

        candidates = [AutoModelForCausalLM]
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            candidates.append(cls)
    return candidates


def _from_pretrained(candidates, path, **kw):
    errors = []
    for cls in candidates:
        try:
            return cls.from_pretrained(path, **kw)
        except (ValueError, KeyError) as e:  # config not mapped to this auto class
            errors.append(f"{getattr(cls, '__name__', cls)}: {e}")
    raise BackendError(f"cannot load a model from {path}: " + " | ".join(errors))


# ---------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------
def gen_kwargs(greedy: bool, temperature: float | None, top_p: float | None) -> dict[str, Any]:
    """transformers ``generate`` keywords of a :class:`~._common.Sampling`."""
    if greedy:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=float(temperature), top_p=top_p)


class HFBackend:
    name = "hf"

    def __init__(
        self,
        artifact: Any,
        base: str,
        *,
        dtype: str | None = "auto",
        device: str | None = None,
        batch_size: int = 1,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
        fold: bool = False,
        trust_remote_code: bool = False,
        eos_from: str = "generation_config",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        min_patches: int | None = None,
        max_patches: int | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        chat_template: str | None = None,
        num_frames: int | None = None,
        loglikelihood: str = "sum",
        chat_template_from: str = "processor",
    ) -> None:
        t0 = time.perf_counter()
        if eos_from not in EOS_FROM:
            raise BackendError(f"backend=hf: eos_from must be one of {', '.join(EOS_FROM)}, got {eos_from!r}")
        if loglikelihood not in LOGLIKELIHOOD_MODES:
            raise BackendError(
                f"backend=hf: loglikelihood must be one of {', '.join(LOGLIKELIHOOD_MODES)}, got {loglikelihood!r}"
            )
        self.loglikelihood_mode = loglikelihood
        if chat_template_from not in CHAT_TEMPLATE_FROM:
            raise BackendError(
                f"backend=hf: chat_template_from must be one of {', '.join(CHAT_TEMPLATE_FROM)}, "
                f"got {chat_template_from!r}"
            )
        self.chat_template_from = chat_template_from
        hub = {k: v for k, v in (("revision", revision), ("subfolder", subfolder)) if v}
        self.base = base
        self.batch_size = max(1, int(batch_size or 1))
        self.default_max_new_tokens = int(max_new_tokens) if max_new_tokens else 256
        self.system_prompt = system_prompt
        self.device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype)
        try:
            config = load_config(base, trust_remote_code, **hub)
            self.processor, self.tokenizer = load_processor(
                base,
                trust_remote_code,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                min_patches=min_patches,  # InternVL's tiling bounds (lmms-eval's internvl_hf_chat)
                max_patches=max_patches,
                **hub,
            )
            if chat_template:
                set_chat_template(self.processor, self.tokenizer, chat_template)
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"cannot load the base model {base!r}: {type(e).__name__}: {e}") from e
        self.supports_images = getattr(config, "vision_config", None) is not None
        self.supports_audio = has_audio_encoder(config)
        self.supports_video = has_video_input(config) and self.supports_images
        self.num_frames = int(num_frames) if num_frames else 8
        kind = getattr(artifact, "kind", None)
        model_path = str(artifact.path) if kind == "full" else base
        try:
            load_kw: dict[str, Any] = dict(hub) if kind != "full" else {}
            if attn_implementation:
                load_kw["attn_implementation"] = attn_implementation
            if device_map:
                load_kw["device_map"] = device_map
            model = _from_pretrained(
                model_class_for(config),
                model_path,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                **load_kw,
            )
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001
            what = "merged model" if kind == "full" else "base model"
            raise BackendError(f"cannot load the {what} from {model_path!r}: {type(e).__name__}: {e}") from e
        if kind == "lora":
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, str(artifact.path), is_trainable=False)
            except Exception as e:  # noqa: BLE001
                raise BackendError(
                    f"the merged LoRA {artifact.path} does not load onto the base {base}: {type(e).__name__}: {e}"
                ) from e
            if fold:
                model = model.merge_and_unload()
        elif kind not in (None, "full"):
            raise BackendError(f"unknown artifact kind {kind!r} (expected 'lora' or 'full')")
        self.model = (model if device_map else model.to(self.device)).eval()
        if device_map:  # placed by accelerate: inputs go to the first parameter's device
            self.device = str(next(self.model.parameters()).device)
        for tk in {
            id(self.tokenizer): self.tokenizer,
            id(getattr(self.processor, "tokenizer", None)): getattr(self.processor, "tokenizer", None),
        }.values():
            if tk is not None and tk.pad_token_id is None:
                tk.pad_token = tk.eos_token
        if (
            eos_from == "tokenizer"
        ):  # e.g. lmms-eval's qwen2_vl / llava_hf: eos_token_id=tokenizer.eos_token_id
            self.eos_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        else:
            eos = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
            self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
            if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.eos_ids:
                self.eos_ids.append(self.tokenizer.eos_token_id)
        self.max_length = int(
            getattr(getattr(config, "text_config", config), "max_position_embeddings", 2048) or 2048
        )
        self.info = BackendInfo(
            name="hf",
            model_class=type(self._inner_model()).__name__,
            artifact_kind=kind,
            folded=bool(fold and kind == "lora"),
            dtype=str(next(self.model.parameters()).dtype).replace("torch.", ""),
            device=self.device,
            extra={"load_seconds": round(time.perf_counter() - t0, 3)},
        )

    # -- helpers -----------------------------------------------------------
    def _inner_model(self):
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        return m

    def render(self, req: GenRequest | LLRequest) -> str:
        """The prompt text of a request (see ``base.render_prompt``; with
        ``chat_template_from="llava_hf"``, see :meth:`_render_llava_hf`)."""
        if (
            self.chat_template_from == "llava_hf"
            and req.messages is not None
            and all(isinstance(m["content"], str) for m in req.messages)
        ):  # the class's string messages (image / audio items: the processor's template)
            return self._render_llava_hf(req.messages)
        return render_prompt(req, self.processor, self.tokenizer, self.system_prompt)

    def _render_llava_hf(self, messages, continuation: str | None = None) -> str:
        """``messages`` as lmms-eval's ``llava_hf`` class renders them: text
        contents, the *tokenizer's* chat template (the processor's is not
        read), Vicuna's (the class's ``VICUNA_CHAT_TEMPLATE``) when the tokenizer
        has none; with ``continuation``: the assistant turn appended, no
        generation prompt (the class's ``prompt_and_continuation``)."""
        tok = getattr(self.processor, "tokenizer", None) or self.tokenizer
        msgs = [{**m, "content": _text_of(m["content"])} for m in messages]
        if self.system_prompt and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        if continuation is not None:
            msgs.append({"role": "assistant", "content": continuation})
        return tok.apply_chat_template(
            msgs,
            chat_template=getattr(tok, "chat_template", None) or VICUNA_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=continuation is None,
        )

    def _check_images(self, reqs) -> None:
        for what, ok, example in (
            ("audios", self.supports_audio, "Qwen2-Audio"),
            ("videos", self.supports_video, "Video-LLaVA"),
        ):
            k = sum(len(getattr(r, what, ())) for r in reqs)
            if k and not ok:
                raise BackendError(
                    f"the model {self.base} has no {what[:-1]} encoder but the task sent {k} {what}; "
                    f"serve {what[:-1]} tasks with a {what[:-1]}-language model ({example}, or the "
                    f"'{what[:-1]}' folder of a modality-merged artifact)"
                )
        n = sum(len(r.images) for r in reqs)
        if n and not self.supports_images:
            raise BackendError(
                f"the base model {self.base} is text-only (its config has no vision tower) but the task "
                f"sent {n} image(s); evaluate image tasks with a vision-language base (Qwen2-VL, LLaVA, ...) "
                f"or pick text-only tasks"
            )

    def _encode(self, texts: list[str], images: list, padding_side: str = "left", audios=(), videos=()):
        """Batch inputs (dict of tensors on the device)."""
        if self.processor is not None and (audios or videos):
            enc = self._encode_av(texts, images, padding_side, list(audios), list(videos))
        elif self.processor is not None:
            tok = self.processor.tokenizer
            tok.padding_side = padding_side
            enc = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        else:
            self.tokenizer.padding_side = padding_side
            # as lm-eval's hf model (HFLM.tok_batch_encode): the tokenizer's special
            # tokens unless the first text already starts with the BOS token
            bos = getattr(self.tokenizer, "bos_token", None)
            add = not (bos and texts and texts[0].startswith(bos))
            enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add)
        return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in enc.items()}

    def _encode_av(self, texts, images, padding_side, audios, videos):
        """Inputs with audio clips and/or videos (see the module docstring)."""
        from .media import audio_waveform, video_frames

        proc = self.processor
        proc.tokenizer.padding_side = padding_side
        kw: dict[str, Any] = {}
        if audios:
            fe = proc.feature_extractor
            kw["audio"] = [audio_waveform(a, fe.sampling_rate) for a in audios]
            kw["sampling_rate"] = fe.sampling_rate
        if images:
            kw["images"] = images
        if not videos:
            return proc(text=texts, padding=True, return_tensors="pt", **kw)
        clips = [video_frames(v, self.num_frames) for v in videos]
        vp = getattr(proc, "video_processor", None)
        if vp is not None:
            import numpy as np

            return proc(
                text=texts,
                videos=[np.stack([np.asarray(f) for f in c]) for c in clips],
                padding=True,
                return_tensors="pt",
                **kw,
            )
        # no video processor (torchvision missing): frames through the image processor,
        # each video placeholder expanded as the processor's own replace_video_token does
        ip = getattr(proc, "image_processor", None)
        if ip is None or not hasattr(proc, "replace_video_token") or not getattr(proc, "video_token", None):
            raise BackendError(
                f"the model {self.base}: video inputs need its processor's video processor, which did not load "
                f"(transformers' video processors need torchvision); install torchvision or serve video with a "
                f"model whose frames go through its image processor (Video-LLaVA)"
            )
        pv = [ip(images=c, return_tensors="pt")["pixel_values"] for c in clips]  # (T, 3, H, W) each
        token, out_texts, k = proc.video_token, [], 0
        for t in texts:
            parts = t.split(token)
            pieces = [parts[0]]
            for rest in parts[1:]:
                if k >= len(pv):
                    raise BackendError(f"more {token} placeholders than videos ({len(pv)})")
                pieces.append(proc.replace_video_token({"pixel_values_videos": [pv[k].numpy()]}, 0) + rest)
                k += 1
            out_texts.append("".join(pieces))
        if k != len(pv):
            raise BackendError(f"{len(pv)} video(s) but {k} {token} placeholder(s) in the prompts")
        enc = dict(proc(text=out_texts, padding=True, return_tensors="pt", **kw))
        enc["pixel_values_videos"] = torch.stack(pv)
        return enc

    # -- generate ----------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        requests = list(requests)
        self._check_images(requests)
        out: list[str | None] = [None] * len(requests)
        # group by generation settings, keep order inside a group, longest first is not needed on CPU
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            sp = sampling(r, self.default_max_new_tokens)
            groups.setdefault((sp.max_new_tokens, sp.greedy, sp.temperature, sp.top_p), []).append(i)
        for (max_new, greedy, temp, top_p), idxs in groups.items():
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s : s + self.batch_size]
                texts = [self.render(requests[i]) for i in chunk]
                images = [im for i in chunk for im in requests[i].images]
                enc = self._encode(
                    texts,
                    images,
                    "left",
                    audios=[a for i in chunk for a in requests[i].audios],
                    videos=[v for i in chunk for v in requests[i].videos],
                )
                kw: dict[str, Any] = dict(
                    max_new_tokens=int(max_new),
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.eos_ids or None,
                )
                kw.update(gen_kwargs(greedy, temp, top_p))
                seqs = self.model.generate(**enc, **kw)
                new = seqs[:, enc["input_ids"].shape[1] :]
                decoded = self.tokenizer.batch_decode(
                    new, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                for i, text in zip(chunk, decoded):
                    out[i] = cut_at_stop(text, requests[i].until)
        return [o if o is not None else "" for o in out]

    # -- loglikelihood -----------------------------------------------------
    def _score(self, pieces: list[tuple[dict, int]]) -> list[tuple[float, bool]]:
        """pieces: (model inputs for ONE sequence incl. continuation, n_cont tokens)."""
        res = []
        for enc, n_cont in pieces:
            logits = self.model(**enc).logits[0].float()
            ids = enc["input_ids"][0]
            L = ids.shape[0]
            logp = torch.log_softmax(logits[L - n_cont - 1 : L - 1], dim=-1)
            tgt = ids[L - n_cont :]
            ll = logp.gather(-1, tgt[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == tgt).all().item())
            res.append((ll, greedy))
        return res

    def _cont_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _score_token_batch(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Text-only scoring of (context_ids, continuation_ids), right-padded batches."""
        res: list[tuple[float, bool]] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            seqs = [(c + t)[-(self.max_length + 1) :] for c, t in chunk]
            inputs = [q[:-1] for q in seqs]
            L = max(len(q) for q in inputs)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, q in enumerate(inputs):
                ids[j, : len(q)] = torch.tensor(q, dtype=torch.long)
                mask[j, : len(q)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            logp_all = torch.log_softmax(logits, dim=-1)
            for j, ((_c, t), q) in enumerate(zip(chunk, seqs)):
                n = len(t)
                n_in = len(q) - 1
                lp = logp_all[j, n_in - n : n_in]
                tgt = torch.tensor(q[-n:], dtype=torch.long, device=lp.device)
                res.append(
                    (lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all().item()))
                )
        return res

    def _score_llava_hf(self, r: LLRequest) -> tuple[float, bool]:
        """lmms-eval 0.7.3 ``llava_hf.loglikelihood``'s number for one request
        (see the module docstring, ``loglikelihood=llava_hf``)."""
        if r.messages is None:
            raise BackendError(
                "backend=hf: loglikelihood=llava_hf reproduces lmms-eval's llava_hf class, which scores "
                "chat requests; this request is a raw-text context (lm-eval, or a context the task "
                "already templated): use loglikelihood=sum"
            )
        if r.audios or r.videos:
            raise BackendError("backend=hf: loglikelihood=llava_hf scores text and image requests only")
        if not all(isinstance(m["content"], str) for m in r.messages):
            raise BackendError(
                "backend=hf: loglikelihood=llava_hf scores requests rendered as lmms-eval's llava_hf class "
                "renders them (prompt_profile=llava_hf: one string message, <image> placeholders in the "
                "text); this request has content items (another prompt profile): use prompt_profile=llava_hf "
                "or loglikelihood=sum"
            )
        tok = getattr(self.processor, "tokenizer", None) or self.tokenizer
        prompt = self._render_llava_hf(r.messages)
        full = self._render_llava_hf(r.messages, r.continuation)
        enc_with = self.processor if self.processor is not None else tok
        if self.processor is not None:
            # images=None without images: the class passes [] and its processor's empty
            # pixel_values crash the vision tower, so text-only requests have no reference
            enc = self.processor(text=[full], images=list(r.images) or None, return_tensors="pt")
        else:
            enc = tok([full], return_tensors="pt")
        n_ctx = enc_with(text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        dtype = next(self.model.parameters()).dtype
        enc = {
            k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
            if hasattr(v, "to")
            else v
            for k, v in enc.items()
        }
        ids = enc["input_ids"]
        labels = ids.clone()
        labels[:, :n_ctx] = -100
        outputs = self.model(**enc, labels=labels)
        greedy = outputs["logits"].argmax(dim=-1)[:, n_ctx : ids.shape[1]]
        return float(outputs["loss"].item()), bool((greedy == ids[:, n_ctx:]).all())

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[LLRequest]) -> list[tuple[float, bool]]:
        requests = list(requests)
        self._check_images(requests)
        if self.loglikelihood_mode == "llava_hf":
            return [self._score_llava_hf(r) for r in requests]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        text_items, text_idx = [], []
        for i, r in enumerate(requests):
            cont = self._cont_ids(r.continuation)
            if not cont:
                out[i] = (0.0, True)
                continue
            ctx_text = self.render(r)
            if r.images or self.processor is not None:
                enc = self._encode([ctx_text], list(r.images), "right", audios=r.audios, videos=r.videos)
                ctx_ids = enc["input_ids"]
                cont_t = torch.tensor([cont], dtype=ctx_ids.dtype, device=ctx_ids.device)
                enc["input_ids"] = torch.cat([ctx_ids, cont_t], dim=1)
                enc["attention_mask"] = torch.ones_like(enc["input_ids"])
                if "mm_token_type_ids" in enc:
                    enc["mm_token_type_ids"] = torch.cat(
                        [enc["mm_token_type_ids"], torch.zeros_like(cont_t)], dim=1
                    )
                if "token_type_ids" in enc:
                    enc["token_type_ids"] = torch.cat(
                        [enc["token_type_ids"], torch.zeros_like(cont_t)], dim=1
                    )
                out[i] = self._score([(enc, len(cont))])[0]
            elif r.context is not None:  # raw text (lm-eval): encoded as lm-eval's hf model does
                ctx, cont = encode_pair(self.tokenizer, r.context, r.continuation)
                if not cont:
                    out[i] = (0.0, True)
                    continue
                text_items.append((ctx or [self._prefix_id()], cont))
                text_idx.append(i)
            else:
                ctx = self.tokenizer(ctx_text, add_special_tokens=False)["input_ids"]
                if not ctx:
                    ctx = [self._prefix_id()]
                text_items.append((ctx, cont))
                text_idx.append(i)
        for i, r in zip(text_idx, self._score_token_batch(text_items)):
            out[i] = r
        return [o for o in out]  # type: ignore[misc]

    def _prefix_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @torch.inference_mode()
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        out = []
        for text in texts:
            ids = lm_encode(self.tokenizer, text)  # as lm-eval's hf model (HFLM.tok_encode)
            windows = rolling_windows(ids, self._prefix_id(), self.max_length)
            out.append(sum(ll for ll, _ in self._score_token_batch(windows)))
        return out

    def close(self) -> None:
        self.model = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["HFBackend", "OPTIONS", "load", "load_processor"]
