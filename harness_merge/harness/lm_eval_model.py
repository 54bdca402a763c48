"""lm-eval 0.4.13 model ``merged`` (text-only causal LMs): a merged model built on load.

lm-eval 0.4.13 has no plugin discovery: importing this module registers the
model (``@register_model("merged")``), which the ``lm-eval-merged`` command
does before running lm-eval's CLI (newer lm-eval versions read the
``lm_eval.models`` entry point declared in pyproject)::

    lm-eval-merged --model merged \\
      --model_args pretrained=BASE,adapters=[a,b],method=ties,prune_rate=0.8 \\
      --tasks hellaswag --output_path out/

Arguments: as for lmms-eval (``harness_merge.harness.model_args``). What was
merged is logged to stderr and stored under ``config.merge`` in the results
JSON (lm-eval merges ``get_model_info()`` into the config).

lm-eval 0.4.13's ``get_model`` loads its built-in models (``hf``, ``vllm``,
...) only while its registry is empty, so ``lm_eval.models`` is imported
before ``merged`` is registered (``harness._compat.register_lm_eval_model``):
both stay available in one process (``lm-eval-merged --model hf`` runs
lm-eval's own model).

Scoring follows lm-eval's ``hf`` model: a loglikelihood request's context and
continuation are encoded as ``LM._encode_pair`` does (trailing whitespace
moved into the continuation, the whole string encoded and split), see
``harness_merge.backends.base.encode_pair``.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM

from ..backends.base import GenRequest, LLRequest
from . import _compat, load_merged, report_failure
from .model_args import ModelArgsError, parse_model_args, split_arg_string

# the run id (results' model_name, output folder) of the model 'merged' loaded last
_ACTIVE_NAME: str | None = None


class MergedLM(LM):
    """Requests: ``loglikelihood`` args ``(context, continuation)``,
    ``loglikelihood_rolling`` args ``(text,)``, ``generate_until`` args
    ``(context, gen_kwargs)`` with ``until``, ``max_gen_toks``,
    ``do_sample``, ``temperature``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        try:
            defaults = {k: kwargs.pop(k) for k in ("batch_size", "device", "max_batch_size") if k in kwargs}
            self.hargs = parse_model_args(kwargs, defaults=defaults)
            if self.hargs.prompt_profile is not None:
                raise ModelArgsError(
                    "model_args: prompt_profile applies to lmms-eval only; lm-eval's requests are raw text, "
                    "scored as lm-eval's hf model does (use --apply_chat_template for chat models)"
                )
            # backend=vllm answers as lm-eval's own vllm class: vLLM's output text, special
            # tokens kept (skip_special_tokens=False); hf decodes as lm-eval's hf model does
            loaded = load_merged(
                self.hargs,
                extra_opts={"decode": "vllm", "skip_special_tokens": False}
                if self.hargs.backend == "vllm"
                else None,
            )
        except Exception as e:
            report_failure(e, "lm-eval model 'merged': load")
            raise
        self.backend = loaded.backend
        self.artifact = loaded.artifact
        self.merge_record = loaded.record
        global _ACTIVE_NAME
        _ACTIVE_NAME = self.merge_record["model_name"]
        _compat.install_lm_eval_run_name(lambda: _ACTIVE_NAME)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Our own splitting: lm-eval's splits ``adapters=[a,b]`` on its comma.
        The CLI's ``--batch_size``/``--device`` apply unless model_args set them."""
        try:
            args = split_arg_string(arg_string or "")
        except Exception as e:
            report_failure(e, "lm-eval model 'merged': model_args")
            raise
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**dict(arg_dict), **extra)

    def get_model_info(self) -> dict:
        return {"merge": self.merge_record}

    # -- chat templates (--apply_chat_template) --------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.hargs.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        tok = getattr(self.backend, "tokenizer", None)
        if not chat_template or tok is None:
            return None
        return chat_template if isinstance(chat_template, str) and "{" in chat_template else tok.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        tok = getattr(self.backend, "tokenizer", None)
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(f"--apply_chat_template: the base {self.hargs.pretrained} has no chat template")
        return tok.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- requests ------------------------------------------------------------
    def _run(self, name: str, fn, reqs):
        try:
            return fn(reqs)
        except Exception as e:
            report_failure(e, f"lm-eval model 'merged': {name}")
            raise

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        reqs = [LLRequest(context=ctx, continuation=cont) for ctx, cont in (r.args[:2] for r in requests)]
        out = self._run("loglikelihood", self.backend.loglikelihood, reqs)
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self._run("loglikelihood_rolling", self.backend.loglikelihood_rolling, texts)
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, o)
        return out

    def _eos_text(self) -> str | None:
        tok = getattr(self.backend, "tokenizer", None)
        if tok is None or tok.eos_token_id is None:
            return None
        return tok.decode(tok.eos_token_id) or getattr(tok, "eos_token", None)

    def generate_until(self, requests) -> list[str]:
        reqs = []
        for r in requests:
            ctx, gk = r.args[0], dict(r.args[1] or {})
            until = gk.get("until") or []
            if isinstance(until, str):
                until = [until]
            eos = self._eos_text()
            if eos and eos not in until:  # as lm-eval's handle_stop_sequences (hf and vllm)
                until = [*until, eos]
            temperature = float(gk.get("temperature", 0.0) or 0.0)
            do_sample = bool(gk.get("do_sample", False)) and temperature > 0
            mnt = gk.get("max_gen_toks", gk.get("max_new_tokens"))
            reqs.append(
                GenRequest(
                    prompt=ctx,
                    until=tuple(until),
                    max_new_tokens=int(mnt) if mnt else None,
                    temperature=temperature,
                    do_sample=do_sample,
                    top_p=gk.get("top_p"),
                )
            )
        out = self._run("generate_until", self.backend.generate, reqs)
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("generate_until", r.args, o)
        return out


# lm-eval's built-ins first, then "merged" (see the module docstring)
_compat.register_lm_eval_model("merged", MergedLM)

__all__ = ["MergedLM"]
