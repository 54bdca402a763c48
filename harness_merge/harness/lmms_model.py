"""lmms-eval 0.7.3 model ``merged``: a merged model built on load.

Registered through the ``lmms_eval.models`` entry point (``manifest()`` returns
the ``ModelManifest``; lmms-eval loads this module only when ``--model merged``
is asked for). A "simple" model: lmms-eval hands it
``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)`` per generation
request and ``(ctx, target, doc_to_visual, doc_id, task, split)`` per
log-likelihood request; the doc is ``self.task_dict[task][split][doc_id]``.

::

    lmms_eval --model merged \\
      --model_args pretrained=BASE,adapters=[a,b],method=copa,prune_rate=0.8 \\
      --tasks pope,mme --output_path out/

What was merged (method, params, adapter hashes, artifact, cache hit) is
logged to stderr and stored under ``config.merge`` in the results JSON.
"""

from __future__ import annotations

import functools
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from ..backends.base import BackendError, GenRequest, LLRequest
from . import FAILURES, conv_templates, install_identity_hook, load_merged, report_failure  # noqa: F401  (FAILURES for tests)
from . import profiles as P
from .model_args import parse_model_args

MODEL_ID = "merged"
CLASS_PATH = "harness_merge.harness.lmms_model.MergedLMM"


def manifest() -> ModelManifest:
    """Entry point ``lmms_eval.models: merged``."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


# -- the merge record in the results file ------------------------------------
# lmms-eval builds results["config"] from the CLI's model_args string and then
# passes it through ``evaluator._redact_eval_config_secrets`` right before the
# results are returned and saved. We wrap that function (once) to add our
# record under config["merge"], so the results JSON says what was merged.
_ACTIVE_RECORD: dict | None = None


def _install_results_hook() -> None:
    import lmms_eval.evaluator as ev

    orig = getattr(ev, "_redact_eval_config_secrets", None)
    if orig is None or getattr(orig, "_harness_merge", False):
        return

    @functools.wraps(orig)
    def redact(value):
        if (
            _ACTIVE_RECORD is not None
            and isinstance(value, dict)
            and "model_args" in value
            and "model_backend" in value
            and "merge" not in value
        ):
            value = {**value, "merge": _ACTIVE_RECORD}
        return orig(value)

    redact._harness_merge = True  # type: ignore[attr-defined]
    ev._redact_eval_config_secrets = redact


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


def _keep_tuple(result: tuple[float, bool]):
    """lmms-eval 0.7.3 passes every model output through
    ``api.instance.unwrap_generation_output``, which turns a ``(logprob,
    is_greedy)`` tuple into its ``str()`` and breaks every loglikelihood /
    multiple_choice task. A ``GenerationResult`` is unwrapped as is, so the
    tuple reaches the task intact."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # other lmms-eval versions
        return result
    return GenerationResult(text=(float(result[0]), bool(result[1])))  # type: ignore[arg-type]


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
    opts = {**profile_of(hargs).backend_opts(), **hargs.backend_opts}
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
        loaded = load_merged(hargs, extra_opts=self.profile.backend_opts())
        self.backend = loaded.backend
        self.artifact = loaded.artifact
        self.merge_record = loaded.record
        self.merge_record["prompt_profile"] = self.profile.record()
        self.merge_record["first_prompt"] = None
        _ACTIVE_RECORD = self.merge_record
        _install_results_hook()
        from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

        install_identity_hook(GeneralConfigTracker, lambda: (_ACTIVE_RECORD or {}).get("model_name"))
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

    def _record_first(self, req) -> None:
        if self.merge_record.get("first_prompt") is None:
            try:
                self.merge_record["first_prompt"] = self.backend.render(req)
            except Exception as e:  # noqa: BLE001 - the record must not break the run
                self.merge_record["first_prompt"] = f"<not rendered: {type(e).__name__}: {e}>"

    # -- request translation ------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = _as_list(doc_to_visual(self.task_dict[task][split][doc_id]))
        for v in visuals:
            if not hasattr(v, "convert"):  # PIL images only
                raise BackendError(
                    f"task {task}: visual of type {type(v).__name__} (video/audio/path) is not supported by "
                    f"model 'merged'; only image tasks are"
                )
        if visuals and not getattr(self.backend, "supports_images", False):
            raise BackendError(
                f"task {task} sends images but the base model {self.hargs.pretrained} is text-only (no vision "
                f"tower); use a vision-language base (Qwen2-VL, LLaVA, ...) or text-only tasks"
            )
        return [v.convert("RGB") for v in visuals]

    def _templated_ctx(self, task: str, n_images: int) -> bool:
        if self._templated and n_images:
            raise BackendError(
                f"task {task}: --apply_chat_template with image tasks is not supported by model 'merged' "
                f"(its prompt profile {self.profile.name} renders the chat template with the images); "
                f"drop --apply_chat_template"
            )
        return self._templated

    @_guard("lmms-eval model 'merged': generate_until")
    def generate_until(self, requests: list[Instance]) -> list[str]:
        reqs = []
        for inst in requests:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args[:6]
            images = self._visuals(doc_to_visual, doc_id, task, split)
            if self.conv is not None:  # an original-repo conversation template decides over the profile
                reqs.append(
                    conv_templates.gen_request(
                        self.conv, ctx, P.gen_params(self.profile, gen_kwargs), images, self._image_token
                    )
                )
            elif self._templated_ctx(task, len(images)):
                reqs.append(GenRequest(prompt=ctx, **P.gen_params(self.profile, gen_kwargs)))
            else:
                reqs.append(P.gen_request(self.profile, ctx, gen_kwargs, images, self._image_token))
        if reqs:
            self._record_first(reqs[0])
        out = [P.finish(self.profile, a) for a in self.backend.generate(reqs)]
        for inst, ans in zip(requests, out):
            self.cache_hook.add_partial("generate_until", (inst.args[0], inst.args[1]), ans)
        return out

    @_guard("lmms-eval model 'merged': loglikelihood")
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        reqs = []
        for inst in requests:
            ctx, target, doc_to_visual, doc_id, task, split = inst.args[:6]
            if callable(target):  # output_type "loglikelihood" passes task.doc_to_target itself
                target = target(self.task_dict[task][split][doc_id])
            if isinstance(target, (list, tuple)):
                target = target[0]
            images = self._visuals(doc_to_visual, doc_id, task, split)
            if self.conv is not None:
                reqs.append(conv_templates.ll_request(self.conv, ctx, str(target), images, self._image_token))
            elif self._templated_ctx(task, len(images)):
                reqs.append(LLRequest(continuation=str(target), context=ctx))
            else:
                reqs.append(P.ll_request(self.profile, ctx, str(target), images, self._image_token))
        if reqs:
            self._record_first(reqs[0])
        return [_keep_tuple(r) for r in self.backend.loglikelihood(reqs)]

    def generate_until_multi_round(self, requests) -> list[str]:
        e = NotImplementedError("model 'merged' does not support multi-round generation tasks")
        report_failure(e, "lmms-eval model 'merged': generate_until_multi_round")
        raise e


__all__ = ["MergedLMM", "manifest", "profile_of", "serving_opts"]
