"""LoRA checkpoints in the original LLaVA repository's layout (as the CoPA-Merging /
RobustMerge authors release them) -> LoRA factors on the llava-hf model + the
trained ``mm_projector``.

A LLaVA-1.5 LoRA run (``haotian-liu/LLaVA``, ``train_mem.py --lora_enable``)
writes ``adapter_config.json`` + ``adapter_model.bin`` (PEFT LoRA on the
language model's linear layers, keyed ``base_model.model.model.layers...``)
and ``non_lora_trainables.bin``: every other trained tensor, i.e. the
projector ``base_model.model.model.mm_projector.{0,2}.{weight,bias}``.

Names are mapped to transformers' ``LlavaForConditionalGeneration`` (llava-hf,
transformers 5 layout) by :data:`KEY_MAP`; a name outside it is an error, so
nothing is dropped silently. ``non_lora_trainables.bin`` is read with
``torch.load(weights_only=True)`` (no pickled code runs). Its keys are first
normalised as LLaVA's own loader does (strip ``base_model.``, then ``model.``
when keys start with ``model.model.``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from .files import checked_float
from .peft_lora import CONFIG, LoRAAdapter, LoRASet

NON_LORA = "non_lora_trainables.bin"

# original LLaVA (LlavaLlamaForCausalLM) name prefix -> llava-hf (transformers 5) prefix
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)


def is_llava_repo_dir(d: Path) -> bool:
    d = Path(d)
    return (d / CONFIG).is_file() and (d / NON_LORA).is_file()


def to_llava_hf(name: str, where: str) -> str:
    """The llava-hf name of an original LLaVA parameter / module name."""
    probe = name if name.endswith(".") else name + "."
    for old, new in KEY_MAP:
        if probe.startswith(old):
            return (new + probe[len(old) :])[:-1]
    raise InputError(
        f"{where}: {name!r} has no llava-hf counterpart (known LLaVA prefixes: "
        f"{', '.join(o for o, _ in KEY_MAP)}); refusing to drop it"
    )


def normalise_non_lora_keys(keys) -> dict[str, str]:
    """LLaVA's loader: strip ``base_model.``, then ``model.`` if keys start with
    ``model.model.``. Returns {normalised: original}."""
    stripped = {(k.removeprefix("base_model.")): k for k in keys}
    if any(k.startswith("model.model.") for k in stripped):
        stripped = {(k.removeprefix("model.")): v for k, v in stripped.items()}
    return stripped


class LlavaRepoAdapter(LoRAAdapter):
    """A LoRA adapter in the LLaVA repo's layout; module names in llava-hf terms."""

    def __init__(self, ref: str, path: Path):
        super().__init__(ref, path)
        f = self.path / NON_LORA
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - pickled code, truncated file, ...
            raise InputError(f"{f}: cannot read with weights_only=True ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"{f}: expected a dict of tensors")
        self._non_lora = {to_llava_hf(k, str(f)): sd[orig] for k, orig in normalise_non_lora_keys(sd).items()}
        self.non_lora_file = f

    @property
    def files(self) -> list[Path]:
        return [*super().files, self.path / NON_LORA]

    def _module_name(self, peft_name: str) -> str:
        return to_llava_hf(peft_name, str(self.weights_file))

    @property
    def non_lora_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._non_lora.items()}

    def read_non_lora(self, name: str) -> torch.Tensor:
        return checked_float(self._non_lora[name], f"{self.non_lora_file} [{name}]")


class LlavaRepoSet(LoRASet):
    """N LLaVA-repo checkpoints: a :class:`LoRASet` on llava-hf module names
    plus their non-LoRA trainables (the projector), checked to agree."""

    adapter_cls = LlavaRepoAdapter

    def __init__(self, refs: list[str], dirs: list[Path]):
        super().__init__(refs, dirs)
        first = self.adapters[0]
        for ad in self.adapters[1:]:
            if ad.non_lora_shapes != first.non_lora_shapes:
                odd = sorted(set(ad.non_lora_shapes.items()) ^ set(first.non_lora_shapes.items()))[:2]
                raise InputError(f"{ad.ref}: {NON_LORA} holds other tensors than {first.ref}'s, e.g. {odd}")

    @property
    def non_lora_names(self) -> list[str]:
        return sorted(self.adapters[0].non_lora_shapes)

    def read_non_lora(self, name: str) -> tuple[torch.Tensor, ...]:
        return tuple(a.read_non_lora(name) for a in self.adapters)


__all__ = [
    "KEY_MAP",
    "NON_LORA",
    "LlavaRepoAdapter",
    "LlavaRepoSet",
    "is_llava_repo_dir",
    "normalise_non_lora_keys",
    "to_llava_hf",
]
