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
from . import FAILURES, conv_templates, load_merged, report_failure  # noqa: F401  (FAILURES re-exported for tests)
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


class MergedLMM(lmms):
    """lmms-eval model ``merged``; see the module docstring."""

    is_simple = True

    @_guard("lmms-eval model 'merged': load")
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        global _ACTIVE_RECORD
        defaults = {k: kwargs.pop(k) for k in ("batch_size", "device", "max_batch_size") if k in kwargs}
        self.hargs = parse_model_args(kwargs, defaults=defaults)
        loaded = load_merged(self.hargs)
        self.backend = loaded.backend
        self.artifact = loaded.artifact
        self.merge_record = loaded.record
        _ACTIVE_RECORD = self.merge_record
        _install_results_hook()
        self._batch_size = int(self.hargs.backend_opts.get("batch_size", 1))
        self._device = getattr(getattr(self.backend, "info", None), "device", "cpu")
        self.conv = conv_templates.get_template(self.hargs.conv_template) if self.hargs.conv_template else None
        self._image_token = conv_templates.image_token_of(getattr(self.backend, "processor", None))
        if self.conv is not None:
            self.merge_record["conv_template"] = self.conv.name

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

    @staticmethod
    def _messages(ctx: str, n_images: int) -> tuple[dict, ...]:
        text = ctx.replace("<image>", "").strip() if n_images else ctx
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return ({"role": "user", "content": content},)

    @staticmethod
    def _gen_params(gen_kwargs: dict) -> dict:
        gk = dict(gen_kwargs or {})
        until = gk.get("until") or []
        if isinstance(until, str):
            until = [until]
        temperature = float(gk.get("temperature", 0.0) or 0.0)
        do_sample = bool(gk.get("do_sample", temperature > 0))
        mnt = gk.get("max_new_tokens")
        return dict(
            until=tuple(until),
            max_new_tokens=int(mnt) if mnt else None,
            temperature=temperature,
            do_sample=do_sample and temperature > 0,
            top_p=gk.get("top_p"),
        )

    @_guard("lmms-eval model 'merged': generate_until")
    def generate_until(self, requests: list[Instance]) -> list[str]:
        reqs = []
        for inst in requests:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = inst.args[:6]
            images = self._visuals(doc_to_visual, doc_id, task, split)
            if self.conv is not None:
                reqs.append(conv_templates.gen_request(self.conv, ctx, self._gen_params(gen_kwargs), images,
                                                       self._image_token))
                continue
            reqs.append(GenRequest(messages=self._messages(ctx, len(images)), images=tuple(images),
                                   **self._gen_params(gen_kwargs)))
        out = self.backend.generate(reqs)
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
                continue
            reqs.append(LLRequest(continuation=str(target), messages=self._messages(ctx, len(images)),
                                  images=tuple(images)))
        return [_keep_tuple(r) for r in self.backend.loglikelihood(reqs)]

    def generate_until_multi_round(self, requests) -> list[str]:
        e = NotImplementedError("model 'merged' does not support multi-round generation tasks")
        report_failure(e, "lmms-eval model 'merged': generate_until_multi_round")
        raise e


__all__ = ["MergedLMM", "manifest"]
