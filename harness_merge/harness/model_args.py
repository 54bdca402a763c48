"""One ``model_args`` parser for lmms-eval and lm-eval.

``pretrained=BASE,adapters=[a,b,c],method=copa,prune_rate=0.8,backend=hf``

The string is parsed once into typed parts (:class:`HarnessArgs`):

- what to merge: ``pretrained`` (folder or hub id), ``adapters`` (``[a,b,c]``,
  ``a;b;c``, a single path or a Python list), ``method`` (a registered method,
  or ``none`` to serve the base alone: the zero-shot reference of a leaderboard);
- the method's parameters: ``params={prune_rate=0.8,weights=[0.5,0.5]}``, or
  flat by their own names (``prune_rate=0.8``) where the name is not also one
  of the keys below. A method parameter that shares its name with a serving or
  artifact key (wudi's ``device``, wudi2's ``rank``) can be set only inside
  ``params={...}``; the flat key always means the serving/artifact key, so a
  collision cannot happen. Values are passed on as given (the method's
  dataclass converts and validates);
- the artifact: ``format`` (auto|lora|full), ``rank`` (truncation rank of a
  LoRA made by SVD), ``cache_dir``;
- serving: ``backend`` (hf|vllm), ``dtype``, ``device``, ``batch_size`` (a
  number; ``auto`` is refused), ``max_new_tokens``, ``system_prompt``,
  ``prompt_profile`` (qwen2_vl|llava_hf|vllm|plain|auto, see
  :mod:`.profiles`), ``max_pixels`` / ``min_pixels`` (image processor bounds),
  ``revision`` / ``subfolder`` (of a hub base), ``chat_template`` (a template
  or a file), ``trust_remote_code``; hf only: ``fold`` (fold the LoRA into the
  weights), ``device_map``, ``attn_implementation``, ``loglikelihood``
  (``sum``, the default: the continuation's summed log-probabilities;
  ``llava_hf``: lmms-eval's ``llava_hf`` class's number, its mean loss, see
  :mod:`harness_merge.backends.hf`); vLLM pass-throughs
  ``tensor_parallel_size``, ``data_parallel_size``, ``gpu_memory_utilization``,
  ``max_model_len``, ``enforce_eager``, ``max_lora_rank``.
- modality merging (:mod:`harness_merge.modality`): ``modalities={vision=/m/llava,
  audio=/m/qwen2audio,video=/m/videollava}`` with ``pretrained=`` the shared text
  LLM and ``method=`` any method: only the shared LLM is merged, each
  modality keeps its encoder and connector, and model 'merged' routes image /
  audio / video requests to the matching modality. ``pretrained=`` a
  modality-merged artifact folder with ``method=none`` serves it as is;
  ``num_frames`` (hf): frames sampled per video (default 8).
- ``conv_template``: render requests with an original-repo conversation
  template (``vicuna_v1``: LLaVA-1.5's) instead of the profile's chat template.

Unknown keys are an error that lists the valid ones. Values from the harness
may be strings (our own splitting) or already typed (lmms-eval / lm-eval guess
types); both are accepted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import MergeError, MethodParamError

BACKEND_KEYS = (
    "backend",
    "dtype",
    "device",
    "batch_size",
    "max_new_tokens",
    "system_prompt",
    "fold",
    "trust_remote_code",
    "prompt_profile",
    "max_pixels",
    "min_pixels",
    "device_map",
    "attn_implementation",
    "revision",
    "subfolder",
    "chat_template",
    "num_frames",
    "loglikelihood",
    "min_patches",
    "max_patches",
)
VLLM_KEYS = (
    "tensor_parallel_size",
    "data_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "enforce_eager",
    "max_lora_rank",
)
# keys of backend=hf only
HF_ONLY_KEYS = ("fold", "device_map", "attn_implementation", "subfolder", "num_frames")
MERGE_KEYS = ("pretrained", "adapters", "method", "params", "format", "rank", "cache_dir", "modalities")
# A method parameter whose name is also one of the keys above (wudi's ``device``,
# wudi2's ``rank``) can only be set inside ``params={...}``: a flat key always
# means the serving / artifact key.
# request rendering done by the harness model itself (see .conv_templates)
PROMPT_KEYS = ("conv_template",)
RESERVED_KEYS = (
    frozenset(BACKEND_KEYS) | frozenset(VLLM_KEYS) | frozenset(MERGE_KEYS) | frozenset(PROMPT_KEYS)
)
# keys the harnesses add on their own (CLI --batch_size / --device / --max_batch_size)
IGNORED_KEYS = ("max_batch_size",)
_BOOL_TRUE = ("1", "true", "yes", "on")
_BOOL_FALSE = ("0", "false", "no", "off", "")


# ``method=none``: no merge, serve the base (zero-shot reference).
NO_MERGE = "none"


class ModelArgsError(MethodParamError):
    """A bad ``--model_args`` entry (unknown key, bad value, missing key)."""


@dataclass(frozen=True)
class HarnessArgs:
    """``model_args`` parsed once, in typed parts: what to merge (``pretrained``,
    ``adapters``, ``method`` and its ``params``), the artifact (``format``,
    ``rank``, ``cache_dir``), the serving backend and its options, and the
    prompt profile (``prompt_profile``; None = chosen from the base's model type)."""

    pretrained: str
    adapters: tuple[str, ...]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    format: str = "auto"
    rank: int | None = None
    cache_dir: str | None = None
    backend: str = "hf"
    backend_opts: dict[str, Any] = field(default_factory=dict)
    prompt_profile: str | None = None
    conv_template: str | None = None
    modalities: dict[str, str] | None = None

    def merge_spec(self):
        """The merge to run, or None for ``method=none`` (the base alone)."""
        from ..api import MergeSpec

        if self.modalities:
            raise ModelArgsError(
                "model_args: modalities={...} is a modality merge (harness_merge.modality), served by "
                "lmms-eval's model 'merged' only; it has no adapter merge spec"
            )
        if self.method == NO_MERGE:
            return None
        return MergeSpec(
            adapters=self.adapters,
            method=self.method,
            params=dict(self.params),
            base=self.pretrained,
            format=self.format,
            rank=self.rank,
        )


def split_arg_string(s: str) -> dict[str, str]:
    """``k=v,k2=[a,b],k3="x,y"`` -> dict of raw strings; commas inside quotes,
    ``[]`` or ``{}`` do not split. A piece without ``=`` is an error."""
    parts, cur, depth, quote = [], [], 0, None
    for ch in s.strip():
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if cur:
        parts.append("".join(cur))
    out: dict[str, str] = {}
    for p in (p.strip() for p in parts):
        if not p:
            continue
        if "=" not in p:
            raise ModelArgsError(
                f"model_args: {p!r} is not key=value. Lists need brackets or semicolons: "
                f"adapters=[a,b,c] or adapters=a;b;c"
            )
        k, v = p.split("=", 1)
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = v[1:-1]
        out[k.strip()] = v
    return out


def parse_list(value: Any) -> tuple[str, ...]:
    """``[a,b]``, ``a;b``, ``a`` or a list/tuple -> tuple of non-empty strings."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        items = [str(x) for x in value]
    else:
        s = str(value).strip()
        if s.startswith("[") and s.endswith("]"):
            s = s[1:-1]
        sep = ";" if ";" in s else ","
        items = s.split(sep)
    return tuple(i.strip().strip("\"'") for i in items if i.strip().strip("\"'"))


def _to_bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _BOOL_TRUE:
        return True
    if s in _BOOL_FALSE:
        return False
    raise ModelArgsError(f"model_args: {key} must be true or false, got {v!r}")


def _to_int(key: str, v: Any, *, allow_none: bool = False, minimum: int | None = None) -> int | None:
    if v is None or (allow_none and str(v).strip().lower() in ("", "none", "null")):
        if allow_none:
            return None
        raise ModelArgsError(f"model_args: {key} must be an integer, got {v!r}")
    try:
        f = float(v)
        if not f.is_integer():
            raise ValueError
        i = int(f)
    except (TypeError, ValueError):
        raise ModelArgsError(f"model_args: {key} must be an integer, got {v!r}") from None
    if minimum is not None and i < minimum:
        raise ModelArgsError(f"model_args: {key} must be >= {minimum}, got {i}")
    return i


def _to_float(key: str, v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ModelArgsError(f"model_args: {key} must be a number, got {v!r}") from None


def _batch_size(v: Any) -> int:
    s = str(v).strip().lower()
    if s.startswith("auto"):
        raise ModelArgsError(
            f"model_args: batch_size={v} (automatic batch-size search) is not supported by model 'merged'; "
            f"give a number, e.g. --batch_size 8 (requests are batched up to it)"
        )
    return _to_int("batch_size", v, minimum=1)  # type: ignore[return-value]


def parse_params(value: Any) -> dict[str, Any]:
    """``params={prune_rate=0.8,weights=[0.5,0.5]}`` (``:`` works as ``=``; a dict too)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    s = str(value).strip()
    if not (s.startswith("{") and s.endswith("}")):
        raise ModelArgsError(f"model_args: params must be written params={{name=value,...}}, got {value!r}")
    body = s[1:-1].strip()
    if not body:
        return {}
    out: dict[str, Any] = {}
    for k, v in split_arg_string(body.replace(":", "=") if "=" not in body else body).items():
        out[k.strip().strip("\"'")] = v
    return out


def parse_model_args(args: str | Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> HarnessArgs:
    """Parse the harness's ``model_args`` (a string, or the kwargs the harness
    passes). ``defaults`` (e.g. the CLI's ``--batch_size``/``--device``) apply
    where ``args`` do not set a key; None values there are ignored."""
    raw: dict[str, Any] = dict(split_arg_string(args)) if isinstance(args, str) else dict(args)
    for k, v in (defaults or {}).items():
        if v is not None and k not in raw:
            raw[k] = v
    for k in IGNORED_KEYS:
        raw.pop(k, None)

    from .. import methods

    method = raw.pop("method", None)
    if method is None or str(method).strip() == "":
        raise ModelArgsError(
            f"model_args: method is required, e.g. method=copa; available: {', '.join(methods.available())}"
        )
    method = str(method).strip()
    if method == NO_MERGE:  # the base alone: the zero-shot reference row of a leaderboard
        spec, param_names = None, []
    else:
        spec = methods.get(method)  # unknown method -> MethodParamError with the list
        param_names = spec.params_cls.field_names()

    flat_params = [n for n in param_names if n not in RESERVED_KEYS]
    nested = [n for n in param_names if n in RESERVED_KEYS]
    valid = set(RESERVED_KEYS) | set(flat_params)
    unknown = [k for k in raw if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(valid), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ModelArgsError(
            f"model_args: unknown key(s) {', '.join(hints)}. Valid keys: "
            f"merge: {', '.join(MERGE_KEYS)}; method {method} parameters: {', '.join(flat_params)}"
            + (f" (and, inside params={{...}} only: {', '.join(nested)})" if nested else "")
            + f"; serving: {', '.join(BACKEND_KEYS + PROMPT_KEYS)}; vllm: {', '.join(VLLM_KEYS)}"
        )

    pretrained = raw.pop("pretrained", None)
    if not pretrained:
        raise ModelArgsError("model_args: pretrained=<base model folder or hub id> is required")
    adapters = parse_list(raw.pop("adapters", None))
    modalities = None
    if "modalities" in raw:
        modalities = {k: str(v).strip() for k, v in parse_params(raw.pop("modalities")).items()}
        if spec is None:
            raise ModelArgsError(
                f"model_args: modalities={{...}} merges the modality models' shared LLM; give a method "
                f"(method={NO_MERGE} serves one model: point pretrained= at a modality-merged artifact instead)"
            )
        if adapters:
            raise ModelArgsError("model_args: give either adapters=... or modalities={...}, not both")
        if len(modalities) < 2 or not all(modalities.values()):
            raise ModelArgsError(
                f"model_args: modalities needs two or more name=folder entries, e.g. "
                f"modalities={{vision=/m/llava,audio=/m/audio}}; got {modalities}"
            )
    if spec is None and adapters:
        raise ModelArgsError(f"model_args: method={NO_MERGE} serves the base model alone; drop adapters=...")
    if spec is not None and not adapters and not modalities:
        raise ModelArgsError(
            "model_args: adapters is required, e.g. adapters=[/ad/a,/ad/b] or adapters=/ad/a;/ad/b"
        )

    params = parse_params(raw.pop("params", None))
    if spec is None and params:
        raise ModelArgsError(f"model_args: method={NO_MERGE} merges nothing; drop params=...")
    bad = [k for k in params if k not in param_names]
    if bad:
        raise ModelArgsError(
            f"model_args: params: {', '.join(repr(k) for k in bad)} "
            f"{'is not a parameter' if len(bad) == 1 else 'are not parameters'} of method {method}; "
            f"its parameters: {', '.join(param_names)}"
        )
    for k in [k for k in list(raw) if k in flat_params]:
        if k in params:
            raise ModelArgsError(f"model_args: {k} is given twice (flat and inside params={{...}}); keep one")
        params[k] = raw.pop(k)
    if (
        "weights" in params
        and not isinstance(params["weights"], (list, tuple))
        and params["weights"] is not None
    ):
        params["weights"] = ",".join(parse_list(params["weights"]))

    fmt = str(raw.pop("format", "auto")).strip().lower()
    if fmt not in ("auto", "lora", "full"):
        raise ModelArgsError(f"model_args: format must be auto, lora or full, got {fmt!r}")
    rank = _to_int("rank", raw.pop("rank", None), allow_none=True, minimum=1)
    cache_dir = raw.pop("cache_dir", None)
    backend = str(raw.pop("backend", "hf")).strip().lower()
    if backend not in ("hf", "vllm"):
        raise ModelArgsError(f"model_args: backend must be hf or vllm, got {backend!r}")

    conv_template = raw.pop("conv_template", None)
    if conv_template is not None:
        from .conv_templates import get_template

        try:
            conv_template = get_template(str(conv_template).strip()).name
        except MergeError as e:
            raise ModelArgsError(f"model_args: {e}") from None
    opts: dict[str, Any] = {}
    if "dtype" in raw:
        opts["dtype"] = str(raw.pop("dtype")).strip().lower()
    if "device" in raw:
        opts["device"] = str(raw.pop("device")).strip()
    if "batch_size" in raw:
        opts["batch_size"] = _batch_size(raw.pop("batch_size"))
    if "max_new_tokens" in raw:
        opts["max_new_tokens"] = _to_int("max_new_tokens", raw.pop("max_new_tokens"), minimum=1)
    if "system_prompt" in raw:
        opts["system_prompt"] = str(raw.pop("system_prompt"))
    for k in ("fold", "trust_remote_code"):
        if k in raw:
            opts[k] = _to_bool(k, raw.pop(k))
    for k in ("max_pixels", "min_pixels", "min_patches", "max_patches"):
        if k in raw:
            opts[k] = _to_int(k, raw.pop(k), minimum=1)
    for lo, hi in (("min_pixels", "max_pixels"), ("min_patches", "max_patches")):
        if lo in opts and hi in opts and opts[lo] > opts[hi]:
            raise ModelArgsError(f"model_args: {lo}={opts[lo]} is above {hi}={opts[hi]}")
    if "loglikelihood" in raw:
        mode = str(raw.pop("loglikelihood")).strip().lower()
        if mode not in ("sum", "llava_hf"):
            raise ModelArgsError(f"model_args: loglikelihood must be sum or llava_hf, got {mode!r}")
        if mode == "llava_hf" and backend != "hf":
            raise ModelArgsError(
                "model_args: loglikelihood=llava_hf (lmms-eval llava_hf's mean loss) is computed by "
                f"backend=hf only (this run uses backend={backend}); add backend=hf or drop it"
            )
        if mode != "sum":  # sum: every backend's own scoring
            opts["loglikelihood"] = mode
    if "num_frames" in raw:
        opts["num_frames"] = _to_int("num_frames", raw.pop("num_frames"), minimum=1)
    for k in ("device_map", "attn_implementation", "revision", "subfolder", "chat_template"):
        if k in raw:
            v = str(raw.pop(k)).strip()
            if v:
                opts[k] = v
    profile = raw.pop("prompt_profile", None)
    if profile is not None:
        from .profiles import PROFILES

        profile = str(profile).strip().lower()
        if profile == "auto":
            profile = None
        elif profile not in PROFILES:
            raise ModelArgsError(
                f"model_args: prompt_profile must be one of {', '.join(PROFILES)} or auto, got {profile!r}"
            )
    vllm_given = [k for k in VLLM_KEYS if k in raw]
    if vllm_given and backend != "vllm":
        raise ModelArgsError(
            f"model_args: {', '.join(vllm_given)} appl{'ies' if len(vllm_given) == 1 else 'y'} to backend=vllm only "
            f"(this run uses backend={backend}); add backend=vllm or drop them"
        )
    hf_only = [k for k in HF_ONLY_KEYS if k in opts]
    if hf_only and backend == "vllm":
        raise ModelArgsError(
            f"model_args: {', '.join(hf_only)} appl{'ies' if len(hf_only) == 1 else 'y'} to backend=hf only"
            + (" (vLLM serves a LoRA artifact as a LoRA)" if "fold" in hf_only else "")
        )
    for k in ("tensor_parallel_size", "data_parallel_size", "max_model_len", "max_lora_rank"):
        if k in raw:
            opts[k] = _to_int(k, raw.pop(k), minimum=1)
    if "gpu_memory_utilization" in raw:
        opts["gpu_memory_utilization"] = _to_float(
            "gpu_memory_utilization", raw.pop("gpu_memory_utilization")
        )
    if "enforce_eager" in raw:
        opts["enforce_eager"] = _to_bool("enforce_eager", raw.pop("enforce_eager"))
    assert not raw, raw  # every valid key is consumed above

    return HarnessArgs(
        pretrained=str(pretrained),
        adapters=adapters,
        method=spec.name if spec else NO_MERGE,
        params=params,
        format=fmt,
        rank=rank,
        cache_dir=str(cache_dir) if cache_dir else None,
        backend=backend,
        backend_opts=opts,
        prompt_profile=profile,
        conv_template=conv_template,
        modalities=modalities,
    )


__all__ = [
    "HarnessArgs",
    "ModelArgsError",
    "RESERVED_KEYS",
    "parse_list",
    "parse_model_args",
    "parse_params",
    "split_arg_string",
]
