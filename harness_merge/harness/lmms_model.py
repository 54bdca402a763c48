"""lmms-eval 0.7.3 model ``merged``: a merged model built on load.

Registered through the ``lmms_eval.models`` entry point
(:func:`harness_merge.harness.lmms_plugin.manifest` returns the
``ModelManifest``; lmms-eval loads this module only when ``--model merged`` is
asked for). A "simple" model: lmms-eval hands it
``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)`` per generation
request and ``(ctx, target, doc_to_visual, doc_id, task, split)`` per
log-likelihood request; the doc is ``self.task_dict[task][split][doc_id]``.

::

    lmms_eval --model merged \\
      --model_args pretrained=BASE,adapters=[a,b],method=copa,prune_rate=0.8 \\
      --tasks pope,mme --output_path out/

What was merged (method, params, adapter hashes, artifact, cache hit) is
logged to stderr and stored under ``config.merge`` in the results JSON.

Audio and video tasks: a visual that is an audio dict (``{"array",
"sampling_rate"}``) or a video file path is sent as the request's ``audios`` /
``videos`` (message items ``{"type": "audio"}`` / ``{"type": "video"}`` before
the text, as lmms-eval's qwen2_audio / video classes build them). A
modality merge (``modalities={...}``, or ``pretrained=`` a modality-merged
artifact with ``method=none``) loads one backend per modality and routes each
request to the modality its inputs need (see :mod:`.modality_serving`; audio +
video in one request: the composed model of :mod:`harness_merge.backends.composed_av`)::

    lmms_eval --model merged \
      --model_args pretrained=LLM,modalities={vision=/m/v,audio=/m/a,video=/m/vid},method=ties \
      --tasks pope,clotho_aqa,nextqa_mc_test
"""

from __future__ import annotations

# First, before anything imports lmms-eval: an environment installed with the
# entry point ``harness_merge.harness.lmms_model:manifest`` (before it moved to
# lmms_plugin) finds ``manifest`` here when lmms-eval loads its entry points
# while this module is still half-initialized.
from .lmms_plugin import CLASS_PATH, MODEL_ID, manifest  # noqa: F401

# isort: split
import functools
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..backends.base import BackendError, GenRequest, LLRequest
from . import _compat, conv_templates, load_merged, report_failure
from . import profiles as P
from .model_args import parse_model_args

# The record of the model 'merged' loaded last: lmms-eval's results carry it
# under config["merge"] (``_compat.install_results_record``).
_ACTIVE_RECORD: dict | None = None


def _guard(where: str):
    """Report exceptions visibly (lmms-eval swallows them) and re-raise."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                report_failure(e, where)
                raise

        return wrapper

    return deco


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out.extend(_as_list(x) if isinstance(x, (list, tuple)) else [x])
        return out
    return [v]


def _model_type(hargs) -> str | None:
    """The base's ``model_type`` (config.json), without loading the model."""
    try:
        from transformers import AutoConfig

        hub = {k: hargs.backend_opts[k] for k in ("revision", "subfolder") if hargs.backend_opts.get(k)}
        cfg = AutoConfig.from_pretrained(
            hargs.pretrained, trust_remote_code=bool(hargs.backend_opts.get("trust_remote_code")), **hub
        )
        return getattr(cfg, "model_type", None)
    except Exception:  # noqa: BLE001 - the backend reports an unloadable base with its own error
        return None


def profile_of(hargs) -> P.PromptProfile:
    """The prompt profile of parsed model_args (``prompt_profile=`` or the base's
    model_type), with the user's system_prompt / pixel bounds applied."""
    bo = hargs.backend_opts
    return P.get_profile(
        hargs.prompt_profile,
        _model_type(hargs),
        system_prompt=bo.get("system_prompt"),
        min_pixels=bo.get("min_pixels"),
        max_pixels=bo.get("max_pixels"),
        pretrained=hargs.pretrained,
    )


def serving_opts(hargs) -> dict:
    """The backend options model 'merged' loads its backend with (the profile's
    under the user's, system prompt left to the profile)."""
    opts = {**profile_of(hargs).backend_opts(hargs.backend), **hargs.backend_opts}
    opts.pop("system_prompt", None)
    return opts


class MergedLMM(lmms):
    """lmms-eval model ``merged``; see the module docstring."""

    is_simple = True

    @_guard("lmms-eval model 'merged': load")
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        global _ACTIVE_RECORD
        defaults = {k: kwargs.pop(k) for k in ("batch_size", "device", "max_batch_size") if k in kwargs}
        self.hargs = parse_model_args(kwargs, defaults=defaults)
        self.profile = profile_of(self.hargs)
        # the profile puts the system message into the request itself
        hargs = self.hargs
        if "system_prompt" in hargs.backend_opts:
            from dataclasses import replace

            hargs = replace(
                hargs, backend_opts={k: v for k, v in hargs.backend_opts.items() if k != "system_prompt"}
            )
        self.modalities = None
        from .modality_serving import modality_manifest

        if self.hargs.modalities or (
            self.hargs.method == "none" and modality_manifest(self.hargs.pretrained)
        ):
            loaded = self._load_modalities()
        else:
            loaded = load_merged(hargs, extra_opts=self.profile.backend_opts(hargs.backend))
        self.backend = loaded.backend
        self.artifact = loaded.artifact
        self.merge_record = loaded.record
        self.merge_record["prompt_profile"] = self.profile.record()
        self.merge_record["first_prompt"] = None
        _ACTIVE_RECORD = self.merge_record
        _compat.install_results_record(lambda: _ACTIVE_RECORD)
        _compat.install_lmms_run_name(lambda: (_ACTIVE_RECORD or {}).get("model_name"))
        self._ll_result = _compat.loglikelihood_result()
        self._batch_size = int(self.hargs.backend_opts.get("batch_size", 1))
        self._device = getattr(getattr(self.backend, "info", None), "device", "cpu")
        self.conv = (
            conv_templates.get_template(self.hargs.conv_template) if self.hargs.conv_template else None
        )
        self._image_token = conv_templates.image_token_of(getattr(self.backend, "processor", None))
        if self.conv is not None:
            self.merge_record["conv_template"] = self.conv.name
        self._templated = False
        # data parallel (accelerate launch / torchrun): lmms-eval shards the
        # requests by these (and sets them again itself when WORLD_SIZE > 1)
        from . import dist_env

        self._rank, _, self._world_size = dist_env()
        self.merge_record["world_size"] = self._world_size

    def _load_modalities(self):
        """One backend per modality of the (merged on load, cached) artifact;
        ``self.backend`` / ``self.profile`` are the text/image default's."""
        from dataclasses import replace

        from . import Loaded
        from .modality_serving import load_modalities, route

        def loader(h, prof):
            h = replace(h, backend_opts={k: v for k, v in h.backend_opts.items() if k != "system_prompt"})
            return load_merged(h, extra_opts=prof.backend_opts(h.backend))

        art, man, self.modalities = load_modalities(
            self.hargs, profile_of, loader, conv_templates.image_token_of
        )
        default = route(self.modalities, set(), "")
        self.profile = default.profile
        record = {
            "model_name": f"{art.name}__modality-{man.get('method')}",
            "mode": "modality",
            "base": self.hargs.pretrained,
            "backend": self.hargs.backend,
            "artifact": {"path": str(art), "kind": "modality"},
            "manifest": man,
            "modalities": {
                n: {"folder": str(m.folder), "kinds": sorted(m.kinds), "prompt_profile": m.profile.name}
                for n, m in self.modalities.items()
            },
        }
        return Loaded(backend=default.backend, artifact=None, record=record)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Our own splitting (raw strings, ``[a,b]`` and ``a;b`` lists); the
        CLI's ``--batch_size``/``--device`` apply unless model_args set them."""
        try:
            from .model_args import split_arg_string

            args = dict(arg_string) if isinstance(arg_string, dict) else split_arg_string(arg_string or "")
        except Exception as e:
            report_failure(e, "lmms-eval model 'merged': model_args")
            raise
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- properties lmms-eval reads ---------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    def get_model_info(self) -> dict:
        return {"merge": self.merge_record}

    # -- --apply_chat_template ---------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The base's chat template (lmms-eval records it with --apply_chat_template)."""
        for obj in (getattr(self.backend, "processor", None), getattr(self.backend, "tokenizer", None)):
            t = getattr(obj, "chat_template", None)
            if t:
                return t
        return None

    @property
    def tokenizer_name(self) -> str:
        return str(self.hargs.pretrained).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """lmms-eval's task builds the context with this under --apply_chat_template;
        such a context is then sent as is (no second template)."""
        tok = getattr(self.backend, "tokenizer", None)
        if tok is None or not self.chat_template:
            raise BackendError(
                f"--apply_chat_template: the base {self.hargs.pretrained} has no chat template"
            )
        self._templated = True
        hist = [
            {
                **m,
                "content": m["content"]
                if isinstance(m.get("content"), str)
                else "".join(c.get("text", "") for c in m["content"] if c.get("type") == "text"),
            }
            for m in chat_history
        ]
        if tok.chat_template != self.chat_template:
            return tok.apply_chat_template(
                hist,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
            )
        return tok.apply_chat_template(hist, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _record_first(self, req, backend=None) -> None:
        if self.merge_record.get("first_prompt") is None:
            try:
                self.merge_record["first_prompt"] = (backend or self.backend).render(req)
            except Exception as e:  # noqa: BLE001 - the record must not break the run
                self.merge_record["first_prompt"] = f"<not rendered: {type(e).__name__}: {e}>"

    # -- request translation ------------------------------------------------
    def _media(self, doc_to_visual, doc_id, task, split) -> tuple[list, list, list]:
        """(images, audios, videos) of one request (see the module docstring)."""
        from ..backends.media import as_audio_dict, is_audio, is_video

        if doc_to_visual is None:
            return [], [], []
        images, audios, videos = [], [], []
        for v in _as_list(doc_to_visual(self.task_dict[task][split][doc_id])):
            if hasattr(v, "convert"):
                images.append(v)
            elif is_audio(v):
                audios.append(as_audio_dict(v))
            elif is_video(v):
                videos.append(str(v))
            else:
                raise BackendError(
                    f"task {task}: visual of type {type(v).__name__} ({str(v)[:80]!r}) is not supported by model "
                    f"'merged'; it takes PIL images, audio dicts {{'array', 'sampling_rate'}} and video file paths"
                )
        return images, audios, videos

    def _target(self, kinds: set, task: str):
        """(backend, profile, image token, conv template) that serve a request with inputs ``kinds``."""
        if self.modalities is None:
            return self.backend, self.profile, self._image_token, self.conv
        from .modality_serving import route

        try:
            m = route(self.modalities, kinds, task)
        except BackendError:
            if kinds != {"audio", "video"}:
                raise
            return self._composed_av(task), self._composed_profile, self._image_token, self.conv
        return m.backend, m.profile, m.image_token, self.conv

    def _composed_av(self, task: str):
        """The composed audio+video model over the merge's video and audio modalities
        (see :mod:`harness_merge.backends.composed_av`), built once."""
        if getattr(self, "_composed", None) is None:
            from ..backends.composed_av import ComposedAV

            vid = [m for m in self.modalities.values() if "video" in m.kinds]
            aud = [m for m in self.modalities.values() if "audio" in m.kinds]
            if not vid or not aud or self.hargs.backend != "hf":
                raise BackendError(
                    f"task {task}: audio + video requests need a video and an audio modality served by "
                    f"backend=hf (modalities: {sorted(self.modalities)}, backend={self.hargs.backend})"
                )
            self._composed = ComposedAV(vid[0].backend, aud[0].backend)
            self._composed_profile = vid[0].profile
            self.merge_record.setdefault("composed", f"{vid[0].name}+{aud[0].name}")
        return self._composed

    @staticmethod
    def _audio_chunks(backend, audios: list) -> list:
        """Each clip resampled to the backend's feature extractor rate and split into
        its ``n_samples`` chunks, one audio item each (lmms-eval qwen2_audio's handling)."""
        from ..backends.media import audio_waveform, split_audio

        fe = getattr(getattr(backend, "processor", None), "feature_extractor", None)
        if fe is None or not audios:
            return audios
        sr, n = int(fe.sampling_rate), int(getattr(fe, "n_samples", 0) or 0)
        out = []
        for a in audios:
            w = audio_waveform(a, sr)
            out.extend({"array": c, "sampling_rate": sr} for c in (split_audio(w, n) if n else [w]))
        return out

    def _av_messages(self, profile, ctx: str, images, audios, videos, task: str) -> tuple[dict, ...]:
        if self.conv is not None or self._templated:
            raise BackendError(
                f"task {task}: audio/video inputs are rendered with the model's chat template; drop "
                f"{'conv_template' if self.conv is not None else '--apply_chat_template'}"
            )
        msgs: list[dict] = []
        if profile.system_prompt:
            msgs.append({"role": "system", "content": profile.system_prompt})
        text = ctx  # as lmms-eval's qwen2_audio / video classes: the context as is, media items first
        for ph in ("<image>", "<video>", "<audio>"):  # a task's own placeholder: the items stand for it
            if ph in text:
                text = text.replace(ph, "").strip()
        content = (
            [{"type": "image"} for _ in images]
            + [{"type": "video"} for _ in videos]
            + [{"type": "audio"} for _ in audios]
            + [{"type": "text", "text": text}]
        )
        msgs.append({"role": "user", "content": content})
        return tuple(msgs)

    def _check_av_support(self, audios, videos, task, backend) -> None:
        """Audio/video only to a backend that says it takes them (a backend without
        the flags, e.g. vLLM's today, would drop them silently)."""
        for what, xs in (("audio", audios), ("video", videos)):
            if xs and not getattr(backend, f"supports_{what}", False):
                raise BackendError(
                    f"task {task} sends {what} inputs but the model {getattr(backend, 'base', self.hargs.pretrained)} "
                    f"(backend={getattr(backend, 'name', self.hargs.backend)}) takes none; serve {what} tasks with "
                    f"backend=hf and a {what}-language model, or a modality merge that has one"
                )

    def _check_image_support(self, visuals, task, backend) -> list:
        if visuals and not getattr(backend, "supports_images", False):
            raise BackendError(
                f"task {task} sends images but the base model {self.hargs.pretrained} is text-only (no vision "
                f"tower); use a vision-language base (Qwen2-VL, LLaVA, ...) or text-only tasks"
            )
        return [v.convert("RGB") for v in visuals]

    def _kinds(self, images, audios, videos) -> set:
        return {k for k, xs in (("image", images), ("audio", audios), ("video", videos)) if xs}

    def _templated_ctx(self, task: str, n_images: int) -> bool:
        if self._templated and n_images:
            raise BackendError(
                f"task {task}: --apply_chat_template with image tasks is not supported by model 'merged' "
                f"(its prompt profile {self.profile.name} renders the chat template with the images); "
                f"drop --apply_chat_template"
            )
        return self._templated

    def _route(self, doc_to_visual, doc_id, task, split):
        """One request's media, the backend and profile that answer it (by the
        kinds of its inputs), checked against what that backend takes:
        ``(backend, profile, image_token, conv, images, audios, videos)``."""
        images, audios, videos = self._media(doc_to_visual, doc_id, task, split)
        backend, profile, image_token, conv = self._target(self._kinds(images, audios, videos), task)
        images = self._check_image_support(images, task, backend)
        self._check_av_support(audios, videos, task, backend)
        audios = self._audio_chunks(backend, audios)
        return backend, profile, image_token, conv, images, audios, videos

    @_guard("lmms-eval model 'merged': generate_until")
    def generate_until(self, requests: list[Instance]) -> list[str]:
        reqs, targets = [], []
        for inst in requests:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args[:6]
            backend, profile, image_token, conv, images, audios, videos = self._route(
                doc_to_visual, doc_id, task, split
            )
            targets.append((backend, profile))
            if audios or videos:
                ims = P.prepare_images(profile, images)
                reqs.append(
                    GenRequest(
                        messages=self._av_messages(profile, ctx, ims, audios, videos, task),
                        images=tuple(ims),
                        audios=tuple(audios),
                        videos=tuple(videos),
                        **P.gen_params(profile, gen_kwargs),
                    )
                )
            elif conv is not None:  # an original-repo conversation template decides over the profile
                reqs.append(
                    conv_templates.gen_request(
                        conv, ctx, P.gen_params(profile, gen_kwargs), images, image_token
                    )
                )
            elif self._templated_ctx(task, len(images)):
                reqs.append(GenRequest(prompt=ctx, **P.gen_params(profile, gen_kwargs)))
            else:
                reqs.append(P.gen_request(profile, ctx, gen_kwargs, images, image_token))
        if reqs:
            self._record_first(reqs[0], targets[0][0])
        out = [
            P.finish(prof, a) for a, (_, prof) in zip(self._per_backend(reqs, targets, "generate"), targets)
        ]
        for inst, ans in zip(requests, out):
            self.cache_hook.add_partial("generate_until", (inst.args[0], inst.args[1]), ans)
        return out

    @_guard("lmms-eval model 'merged': loglikelihood")
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        reqs, targets = [], []
        for inst in requests:
            ctx, target, doc_to_visual, doc_id, task, split = inst.args[:6]
            if callable(target):  # output_type "loglikelihood" passes task.doc_to_target itself
                target = target(self.task_dict[task][split][doc_id])
            if isinstance(target, (list, tuple)):
                target = target[0]
            backend, profile, image_token, conv, images, audios, videos = self._route(
                doc_to_visual, doc_id, task, split
            )
            targets.append((backend, profile))
            if audios or videos:
                ims = P.prepare_images(profile, images)
                reqs.append(
                    LLRequest(
                        continuation=str(target),
                        messages=self._av_messages(profile, ctx, ims, audios, videos, task),
                        images=tuple(ims),
                        audios=tuple(audios),
                        videos=tuple(videos),
                    )
                )
            elif conv is not None:
                reqs.append(conv_templates.ll_request(conv, ctx, str(target), images, image_token))
            elif self._templated_ctx(task, len(images)):
                reqs.append(LLRequest(continuation=str(target), context=ctx))
            else:
                reqs.append(P.ll_request(profile, ctx, str(target), images, image_token))
        if reqs:
            self._record_first(reqs[0], targets[0][0])
        return [self._ll_result(r) for r in self._per_backend(reqs, targets, "loglikelihood")]

    def _per_backend(self, reqs: list, targets: list, call: str) -> list:
        """``backend.<call>`` on each backend's share of ``reqs``; results in request order."""
        groups: dict[int, list[int]] = {}
        for i, (be, _) in enumerate(targets):
            groups.setdefault(id(be), []).append(i)
        out: list = [None] * len(reqs)
        for idxs in groups.values():
            be = targets[idxs[0]][0]
            for i, r in zip(idxs, getattr(be, call)([reqs[i] for i in idxs])):
                out[i] = r
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        e = NotImplementedError("model 'merged' does not support multi-round generation tasks")
        report_failure(e, "lmms-eval model 'merged': generate_until_multi_round")
        raise e


__all__ = ["MergedLMM", "manifest", "profile_of", "serving_opts"]
