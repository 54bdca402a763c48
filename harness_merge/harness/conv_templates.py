"""Conversation templates of the original LLaVA repository, for serving checkpoints
the way their authors evaluated them (``conv_template=vicuna_v1`` in model_args).

``vicuna_v1`` is ``llava/conversation.py``'s ``conv_vicuna_v1`` (LLaVA-1.5's
``--conv-mode vicuna_v1``, used by the CoPA-Merging / RobustMerge evaluation
scripts): separator style TWO, roles ``USER`` / ``ASSISTANT``, ``sep=" "``,
``sep2="</s>"``, and the system line below; the image token goes first, on
its own line (``DEFAULT_IMAGE_TOKEN + "\\n" + question``, as in
``llava/eval/model_vqa.py`` with ``mm_use_im_start_end=False``). The prompt of
a one-turn question is::

    {system} USER: <image>\\n{question} ASSISTANT:

The request is sent as a raw prompt, so no chat template of the base is
applied on top. ``<image>`` is the llava-hf processor's image token (another
processor's token is used when it names one). Pure request translation: no
model, no harness import; a profile registry can wrap these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.base import GenRequest, LLRequest
from ..errors import MergeError


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    reproduces: str

    def prompt(self, question: str, n_images: int = 0, image_token: str = "<image>") -> str:
        """One user turn and the open assistant turn (LLaVA's ``get_prompt`` for
        ``[[USER, q], [ASSISTANT, None]]``)."""
        q = question.replace("<image>", "").strip() if n_images else question
        if n_images:
            q = "\n".join([image_token] * n_images) + "\n" + q
        return f"{self.system}{self.sep}{self.roles[0]}: {q}{self.sep}{self.roles[1]}:"


VICUNA_V1 = ConvTemplate(
    name="vicuna_v1",
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
    reproduces="haotian-liu/LLaVA llava/conversation.py conv_vicuna_v1 (--conv-mode vicuna_v1)",
)
CONV_TEMPLATES: dict[str, ConvTemplate] = {VICUNA_V1.name: VICUNA_V1}


class ConvTemplateError(MergeError):
    pass


def get_template(name: str) -> ConvTemplate:
    try:
        return CONV_TEMPLATES[name]
    except KeyError:
        raise ConvTemplateError(
            f"conv_template must be one of {', '.join(CONV_TEMPLATES)}, got {name!r}"
        ) from None


def image_token_of(processor: Any) -> str:
    tok = getattr(processor, "image_token", None)
    return tok if isinstance(tok, str) and tok else "<image>"


def gen_request(
    tmpl: ConvTemplate, ctx: str, params: dict, images: Sequence[Any], image_token: str = "<image>"
) -> GenRequest:
    """``params``: the generation settings (until, max_new_tokens, ...)."""
    return GenRequest(prompt=tmpl.prompt(ctx, len(images), image_token), images=tuple(images), **params)


def ll_request(
    tmpl: ConvTemplate, ctx: str, target: str, images: Sequence[Any], image_token: str = "<image>"
) -> LLRequest:
    """The continuation scored after ``ASSISTANT:`` (LLaVA appends the answer
    after a space: ``ASSISTANT: {answer}``)."""
    cont = str(target)
    if cont and not cont.startswith(" "):
        cont = " " + cont
    return LLRequest(
        continuation=cont, context=tmpl.prompt(ctx, len(images), image_token), images=tuple(images)
    )


__all__ = [
    "CONV_TEMPLATES",
    "VICUNA_V1",
    "ConvTemplate",
    "ConvTemplateError",
    "gen_request",
    "get_template",
    "image_token_of",
    "ll_request",
]
