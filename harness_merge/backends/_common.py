"""Helpers both backends (``hf``, ``vllm``) use, written once.

- :data:`DTYPES` / :func:`dtype_name`: the dtype names a backend accepts
  (``auto`` and :data:`harness_merge.dtypes.ALIASES`).
- :func:`load_config`, :func:`is_multimodal_config`: the base's config and
  "does it take more than text" (a ``vision_config`` or an ``audio_config``).
- :func:`load_processor` (with the image-only fallback for processors whose
  video half needs torchvision) and :func:`set_chat_template`.
- :func:`sampling`: a :class:`~.base.GenRequest`'s generation settings in one
  neutral form (the harness's semantics: greedy unless ``do_sample`` AND a
  temperature > 0), which each backend maps to its own keywords.

Imports transformers only inside the functions that need it; never torch or vLLM.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes
from .base import BackendError, GenRequest

DTYPES = dtypes.ALIASES  # accepted name -> canonical name (the torch dtype's name, which vLLM takes as is)


def dtype_name(dtype: Any) -> str:
    """``"auto"`` or the canonical name of ``dtype`` (a string or a torch dtype);
    anything else is a :class:`BackendError` naming the accepted values."""
    if dtype is None or str(dtype).lower() in ("auto", ""):
        return "auto"
    name = dtypes.canonical(dtype)
    if name is None:
        raise BackendError(
            f"dtype must be auto, float32, bfloat16 or float16 (or {', '.join(k for k in DTYPES if k != DTYPES[k])}), "
            f"got {dtype!r}"
        )
    return name


def load_config(path: str | Path, trust_remote_code: bool = False, **hub: Any):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **hub)


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings, backend-neutral."""

    max_new_tokens: int
    greedy: bool
    temperature: float | None  # None when greedy
    top_p: float | None  # None: the backend's default (no nucleus cut)
    stop: tuple[str, ...]


def sampling(req: GenRequest, default_max_new_tokens: int) -> Sampling:
    greedy = req.greedy
    return Sampling(
        max_new_tokens=int(req.max_new_tokens or default_max_new_tokens),
        greedy=greedy,
        temperature=None if greedy else float(req.temperature),
        top_p=None if greedy or req.top_p is None else float(req.top_p),
        stop=tuple(s for s in req.until if s),
    )


def is_multimodal_config(config) -> bool:
    """Takes more than text: a vision tower (``vision_config``) or an audio encoder."""
    return getattr(config, "vision_config", None) is not None or has_audio_encoder(config)


def has_audio_encoder(config) -> bool:
    return getattr(config, "audio_config", None) is not None


def has_video_input(config) -> bool:
    return getattr(config, "video_token_index", getattr(config, "video_token_id", None)) is not None


def load_processor(
    base: str,
    trust_remote_code: bool = False,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    **image_kwargs: Any,
):
    """``(processor or None, tokenizer)`` of a base model folder / hub id
    (``revision`` / ``subfolder`` as in ``from_pretrained``). ``image_kwargs``
    (e.g. ``min_pixels``, ``max_pixels``) go to the image processor, as
    ``AutoProcessor.from_pretrained(base, **image_kwargs)`` does."""
    from transformers import AutoTokenizer

    hub = {k: v for k, v in (("revision", revision), ("subfolder", subfolder)) if v}
    if subfolder and Path(base, subfolder).is_dir():  # a local folder: read the subfolder itself
        base, hub = str(Path(base, subfolder)), {k: v for k, v in hub.items() if k != "subfolder"}
    image_kwargs = {k: v for k, v in image_kwargs.items() if v is not None}
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code, **hub)
    config = load_config(base, trust_remote_code, **hub)
    if not is_multimodal_config(config):
        return None, tok
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code, **hub, **image_kwargs)
        if hasattr(proc, "image_processor") or hasattr(proc, "feature_extractor"):
            return proc, getattr(proc, "tokenizer", tok)
        first_error: Exception | None = None
    except Exception as e:  # noqa: BLE001 - fall back below, re-raise if that fails too
        first_error = e
    try:
        return _image_only_processor(base, config, tok, **image_kwargs), tok
    except Exception as e:  # noqa: BLE001
        raise BackendError(
            f"cannot build the processor of {base}: AutoProcessor failed ({first_error}); "
            f"image-only fallback failed ({e})"
        ) from e


def set_chat_template(processor, tokenizer, chat_template: str) -> None:
    """``chat_template=``: a Jinja string or a path to a template file."""
    text = chat_template
    if "{" not in chat_template:
        p = Path(chat_template)
        if not p.is_file():
            raise BackendError(f"chat_template={chat_template!r} is neither a template nor a file")
        text = p.read_text()
    for obj in (processor, tokenizer, getattr(processor, "tokenizer", None)):
        if obj is not None:
            obj.chat_template = text


def _image_only_processor(base: str, config, tok, **image_kwargs: Any):
    """The family's processor class built from tokenizer + image processor only
    (its video processor, which needs torchvision, left out)."""
    import transformers
    from transformers import AutoImageProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    proc_cfg: dict = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = Path(base) / name
        if p.is_file():
            data = json.loads(p.read_text())
            if name == "processor_config.json":
                proc_cfg = data
            break
    cls_name = proc_cfg.get("processor_class") or PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if isinstance(cls_name, (tuple, list)):
        cls_name = cls_name[0]
    proc_cls = getattr(transformers, cls_name)
    try:
        image_processor = AutoImageProcessor.from_pretrained(base, **image_kwargs)
    except Exception:  # noqa: BLE001 - e.g. a torchvision-backed fast class
        image_processor = AutoImageProcessor.from_pretrained(base, use_fast=False, **image_kwargs)

    from .._compat import image_only_processor_class

    image_only = image_only_processor_class(proc_cls)
    sig = inspect.signature(proc_cls.__init__).parameters
    kwargs = {
        k: v
        for k, v in proc_cfg.items()
        if k in sig and k not in ("image_processor", "tokenizer", "video_processor")
    }
    template = tok.chat_template
    if (Path(base) / "chat_template.jinja").is_file():
        template = (Path(base) / "chat_template.jinja").read_text()
    kwargs["chat_template"] = template
    if "video_processor" in sig:
        kwargs["video_processor"] = None
    return image_only(image_processor=image_processor, tokenizer=tok, **kwargs)
