"""Prompt profiles: render lmms-eval requests exactly as a harness's own model class does.

A score of ``merged`` is comparable with a published score only when, with no
merge (``method=none``), it reproduces the model class that produced the
published number sample for sample. Each profile writes down what that class
does to a request (checked on lmms-eval 0.7.3):

``qwen2_vl`` (lmms-eval ``qwen2_vl``, ``simple/qwen2_vl.py``)
    system message "You are a helpful assistant."; ``<image>`` removed from the
    context (not stripped); images first, then the text; every image re-encoded
    as JPEG quality 85 and resized by ``qwen_vl_utils`` to multiples of 28
    within ``min_pixels=3136`` / ``max_pixels=602112``, which the processor is
    also given; generation stops at the tokenizer's EOS only; 128 new tokens
    unless the task says otherwise; the answer is cut at the first stop string
    and stripped.
``llava_hf`` (lmms-eval ``llava_hf``, ``simple/llava_hf.py``), generation
    the text ``"<image>\\n" + context`` (one ``<image>`` per image, joined by
    spaces) as one string message, rendered with the tokenizer's chat template
    (not the processor's), lmms-eval's Vicuna template when the tokenizer has
    none (backend=hf; vLLM renders with the processor's template);
    stop at the tokenizer's EOS; 1024 new tokens by default; stop strings are
    not applied (the class ignores ``until``). Loglikelihood: the context as
    the class renders it (``"<image>\n"`` per image, a bare ``"\n"`` without
    images), scored as the sum of the continuation's log-probabilities by
    default; ``loglikelihood=llava_hf`` (backend=hf) returns the class's own
    number, its mean loss (``harness_merge.backends.hf``; README, "Comparing
    with published scores").
``vllm`` (lmms-eval ``vllm``, ``simple/vllm.py``, its defaults)
    no system message; the context sent as is (``<image>`` kept, not stripped)
    as the first content item, the images after it (``image_first=False``);
    ``max_new_tokens`` is the larger of the task's and 1024; stop strings are
    not applied (the class gives vLLM none); the model's generation config
    decides EOS; the answer is vLLM's own output text (its incremental
    detokenizer holds back a trailing incomplete UTF-8 character, so a
    trailing U+FFFD is dropped). Images whose shorter
    side is under 28 px are scaled up to 28 (bicubic) when the model path
    names ``qwen2-vl`` / ``qwen2.5-vl``, as the class does.
``internvl`` (lmms-eval ``internvl_hf_chat``, ``chat/internvl_hf.py``, the class
    for transformers' native ``InternVLForConditionalGeneration``)
    lmms-eval builds its chat request itself (``_auto_doc_to_messages``): the
    images, then ``doc_to_text`` verbatim (``<image>`` kept, not stripped),
    rendered with the processor's chat template (so the checkpoint's own
    system message, if its template has one); bfloat16 weights (the class
    hard-codes them; ``dtype=`` overrides); stop at the tokenizer's EOS; 1024
    new tokens by default; stop strings are not applied; the answer is not
    stripped. The class gives the processor ``min_patches=1, max_patches=12``
    (over the checkpoint's config), and so does the profile. No loglikelihood
    (the class has none).
    lmms-eval's other InternVL classes (``internvl2``, ``internvl3``, ...) load
    the remote-code checkpoints and are not reproduced.
``plain``
    no system message; ``<image>`` removed and the context stripped; images
    first, then the text; the model's generation config decides EOS. This is
    what ``merged`` did before profiles existed.

The default follows the base's ``model_type`` (``qwen2_vl`` -> ``qwen2_vl``,
``llava`` -> ``llava_hf``, ``internvl`` -> ``internvl``, anything else -> ``plain``); ``prompt_profile=`` in
``model_args`` overrides it. ``system_prompt=``, ``max_pixels=`` and
``min_pixels=`` override the profile's values, as they do for lmms-eval's class
(``min_patches=`` / ``max_patches=`` the ``internvl`` profile's, through the
backend options, the user's over the profile's).

Pure request translation: no model, no harness import.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..backends.base import GenRequest, LLRequest
from ..errors import MergeError

QWEN2_VL_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptProfile:
    name: str
    reproduces: str  # the harness model class this profile renders as
    system_prompt: str | None = None
    strip_context: bool = True  # ctx.strip() after removing "<image>"
    # "items": image items then text; "image_tokens": "<image>\n" + text; "text_first": text then images
    layout: str = "items"
    jpeg_quality: int | None = None  # re-encode every image as JPEG of this quality
    qwen_resize: bool = False  # qwen_vl_utils.fetch_image resize (multiples of 28)
    min_pixels: int | None = None
    max_pixels: int | None = None
    default_max_new_tokens: int | None = None
    apply_until: bool = True  # cut answers at the task's stop strings
    strip_answer: bool = False
    eos_from: str = "generation_config"  # "generation_config" | "tokenizer"
    max_new_tokens_floor: int | None = None  # max_new_tokens = max(task's, this)
    upscale_path_patterns: tuple[str, ...] = ()  # model paths whose small images are scaled up
    upscale_min_side: int | None = None  # the shorter side images are scaled up to (resolved per path)
    upscale_to: int = 28
    # drop a trailing U+FFFD: vLLM's incremental detokenizer (what lmms-eval's vllm class
    # returns) holds back bytes that do not complete a UTF-8 character at the end
    drop_incomplete_tail: bool = False
    keep_image_token: bool = False  # "items" layout: the context verbatim ("<image>" kept, not stripped)
    dtype: str | None = None  # the weights' dtype the harness class loads (under the user's dtype=)
    min_patches: int | None = None  # InternVL tiling bounds the harness class gives the processor
    max_patches: int | None = None
    # "llava_hf": render with the tokenizer's chat template, Vicuna's without one (backend=hf)
    chat_template_from: str | None = None

    def backend_opts(self, backend: str = "hf") -> dict[str, Any]:
        """What the backend must know to render and decode as the harness class does."""
        opts: dict[str, Any] = {"eos_from": self.eos_from}
        if self.chat_template_from is not None and backend == "hf":
            opts["chat_template_from"] = self.chat_template_from
        if self.dtype is not None:
            opts["dtype"] = self.dtype
        for k in ("min_patches", "max_patches"):
            if getattr(self, k) is not None:
                opts[k] = int(getattr(self, k))
        if self.min_pixels is not None:
            opts["min_pixels"] = int(self.min_pixels)
        if self.max_pixels is not None:
            opts["max_pixels"] = int(self.max_pixels)
        return opts

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reproduces": self.reproduces,
            "system_prompt": self.system_prompt,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "jpeg_quality": self.jpeg_quality,
            "eos_from": self.eos_from,
            "dtype": self.dtype,
            "chat_template_from": self.chat_template_from,
        }


PROFILES: dict[str, PromptProfile] = {
    "qwen2_vl": PromptProfile(
        name="qwen2_vl",
        reproduces="lmms-eval qwen2_vl (lmms_eval/models/simple/qwen2_vl.py)",
        system_prompt=QWEN2_VL_SYSTEM,
        strip_context=False,
        jpeg_quality=85,
        qwen_resize=True,
        min_pixels=3136,
        max_pixels=602112,
        default_max_new_tokens=128,
        strip_answer=True,
        eos_from="tokenizer",
    ),
    "llava_hf": PromptProfile(
        name="llava_hf",
        reproduces="lmms-eval llava_hf (lmms_eval/models/simple/llava_hf.py), generate_until",
        strip_context=False,
        layout="image_tokens",
        default_max_new_tokens=1024,
        apply_until=False,
        eos_from="tokenizer",
        chat_template_from="llava_hf",
    ),
    "vllm": PromptProfile(
        name="vllm",
        reproduces="lmms-eval vllm (lmms_eval/models/simple/vllm.py), generate_until",
        strip_context=False,
        layout="text_first",
        default_max_new_tokens=1024,
        max_new_tokens_floor=1024,
        apply_until=False,
        upscale_path_patterns=("qwen2-vl", "qwen2.5-vl"),
        drop_incomplete_tail=True,
    ),
    "internvl": PromptProfile(
        name="internvl",
        reproduces="lmms-eval internvl_hf_chat (lmms_eval/models/chat/internvl_hf.py), generate_until",
        strip_context=False,
        keep_image_token=True,
        default_max_new_tokens=1024,
        apply_until=False,
        eos_from="tokenizer",
        dtype="bfloat16",
        min_patches=1,
        max_patches=12,
    ),
    "plain": PromptProfile(name="plain", reproduces="none: the base's chat template, images first"),
}
BY_MODEL_TYPE = {"qwen2_vl": "qwen2_vl", "llava": "llava_hf", "internvl": "internvl"}


class ProfileError(MergeError):
    """An unknown profile, or one whose image pipeline cannot run here."""


def get_profile(
    name: str | None,
    model_type: str | None = None,
    *,
    system_prompt: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    pretrained: str | None = None,
) -> PromptProfile:
    """The profile ``name`` (or the default for ``model_type`` when None), with
    the user's overrides applied. ``pretrained``: the model path or hub id
    (the ``vllm`` profile scales small images up only for Qwen-VL paths, as
    lmms-eval's class decides from the path)."""
    if name is None or name == "auto":
        name = BY_MODEL_TYPE.get(str(model_type or ""), "plain")
    if name not in PROFILES:
        raise ProfileError(f"prompt_profile must be one of {', '.join(PROFILES)} (or auto), got {name!r}")
    p = PROFILES[name]
    over: dict[str, Any] = {}
    if system_prompt is not None:
        over["system_prompt"] = system_prompt or None
    if min_pixels is not None:
        over["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        over["max_pixels"] = int(max_pixels)
    if (
        p.upscale_path_patterns
        and pretrained
        and any(k in str(pretrained).lower() for k in p.upscale_path_patterns)
    ):
        over["upscale_min_side"] = p.upscale_to
    return replace(p, **over) if over else p


def _jpeg(im, quality: int) -> str:
    """A data URL of ``im`` as JPEG (lmms-eval's ``encode_image_to_data_url``)."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def qwen_smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 602112
) -> tuple[int, int]:
    """``(height, width)`` the way ``qwen_vl_utils`` sizes an image: each side
    rounded to a multiple of ``factor`` (at least ``factor``); when the area
    leaves ``[min_pixels, max_pixels]``, both sides scaled by
    ``sqrt(area / bound)`` and floored (too big) or ceiled (too small) to the
    factor. Aspect ratios above 200 are refused, as there."""
    if max(height, width) / min(height, width) > 200:
        raise ProfileError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200, "
            f"which lmms-eval's qwen2_vl class (qwen_vl_utils) refuses"
        )
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _to_rgb(im):
    from PIL import Image

    if im.mode == "RGBA":  # qwen_vl_utils: alpha over a white background
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[3])
        return bg
    return im.convert("RGB")


def prepare_images(profile: PromptProfile, images: Sequence[Any]) -> list:
    """The images as the harness class hands them to its processor."""
    from PIL import Image

    out = []
    for im in images:
        if profile.jpeg_quality is not None:
            url = _jpeg(im, profile.jpeg_quality)
            im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            im.load()
        im = _to_rgb(im)
        side = profile.upscale_min_side
        if side and min(im.size) < side:  # lmms-eval vllm: _maybe_resize_image
            scale = side / min(im.size)
            im = im.resize(tuple(int(d * scale) for d in im.size), Image.BICUBIC)
        if profile.qwen_resize:
            w, h = im.size
            rh, rw = qwen_smart_resize(h, w, 28, profile.min_pixels or 3136, profile.max_pixels or 602112)
            im = im.resize((rw, rh))
        out.append(im)
    return out


def messages(
    profile: PromptProfile, ctx: str, n_images: int, image_token: str = "<image>"
) -> tuple[dict, ...]:
    """The chat messages of one request. ``image_token``: the processor's image
    placeholder for the ``image_tokens`` layout (``<image>`` for llava-hf models,
    as lmms-eval writes it; another model's own token replaces it)."""
    msgs: list[dict] = []
    if profile.system_prompt:
        msgs.append({"role": "system", "content": profile.system_prompt})
    if profile.layout == "image_tokens":
        text = ctx
        if n_images and "<image>" not in text:
            text = " ".join(["<image>"] * n_images) + "\n" + text
        if image_token != "<image>":
            text = text.replace("<image>", image_token)
        msgs.append({"role": "user", "content": text})
        return tuple(msgs)
    if profile.layout == "text_first":  # the context verbatim, then the images
        content = [{"type": "text", "text": ctx}] + [{"type": "image"} for _ in range(n_images)]
        msgs.append({"role": "user", "content": content})
        return tuple(msgs)
    text = ctx.replace("<image>", "") if n_images and not profile.keep_image_token else ctx
    if profile.strip_context and n_images:
        text = text.strip()
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    msgs.append({"role": "user", "content": content})
    return tuple(msgs)


def gen_params(profile: PromptProfile, gen_kwargs: dict | None) -> dict:
    gk = dict(gen_kwargs or {})
    until = gk.get("until") or []
    if isinstance(until, str):
        until = [until]
    temperature = float(gk.get("temperature", 0.0) or 0.0)
    do_sample = bool(gk.get("do_sample", temperature > 0))
    mnt = gk.get("max_new_tokens") or profile.default_max_new_tokens
    if mnt and profile.max_new_tokens_floor:
        mnt = max(int(mnt), profile.max_new_tokens_floor)
    return dict(
        until=tuple(until) if profile.apply_until else (),
        max_new_tokens=int(mnt) if mnt else None,
        temperature=temperature,
        do_sample=do_sample and temperature > 0,
        top_p=gk.get("top_p"),
    )


def gen_request(
    profile: PromptProfile,
    ctx: str,
    gen_kwargs: dict | None,
    images: Sequence[Any],
    image_token: str = "<image>",
) -> GenRequest:
    ims = prepare_images(profile, images)
    return GenRequest(
        messages=messages(profile, ctx, len(ims), image_token),
        images=tuple(ims),
        **gen_params(profile, gen_kwargs),
    )


def ll_request(
    profile: PromptProfile, ctx: str, target: str, images: Sequence[Any], image_token: str = "<image>"
) -> LLRequest:
    ims = prepare_images(profile, images)
    if profile.layout == "image_tokens" and "<image>" not in ctx and not ims:
        # llava_hf's loglikelihood writes f"{' '.join(['<image>'] * n)}\n{context}" for every
        # request, so a request without images gets a leading newline
        ctx = "\n" + ctx
    return LLRequest(
        continuation=str(target), messages=messages(profile, ctx, len(ims), image_token), images=tuple(ims)
    )


def finish(profile: PromptProfile, answer: str) -> str:
    """The answer as the harness class returns it."""
    if profile.drop_incomplete_tail:
        answer = answer.rstrip("\ufffd")
    return answer.strip() if profile.strip_answer else answer


__all__ = [
    "PROFILES",
    "ProfileError",
    "PromptProfile",
    "finish",
    "gen_params",
    "gen_request",
    "get_profile",
    "ll_request",
    "messages",
    "prepare_images",
    "qwen_smart_resize",
]
