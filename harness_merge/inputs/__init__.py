"""Layer 1: read and validate adapters / checkpoints, one module at a time.

``open_inputs(refs, base=...)`` returns an ``InputSet`` (``LoRASet`` for PEFT
LoRA folders, ``DoRASet`` for PEFT DoRA folders, ``LlavaRepoSet`` for
checkpoints in the original LLaVA repo's layout, ``CheckpointSet`` for full fine-tuned checkpoints) that lists
module names and shapes *without reading tensors*, and yields one
``ModuleInputs`` per module on demand.

:mod:`.headers` lists names, shapes and dtypes from file headers alone;
:mod:`.fit` checks them against the base model. The readers are imported on
first use, so ``harness_merge.inputs.headers`` works without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Sequence

from ..errors import InputError

if TYPE_CHECKING:
    from .checkpoint import CheckpointSet
    from .dora import DoRASet
    from .llava_repo import LlavaRepoSet
    from .peft_lora import LoRASet

    InputSet = LoRASet | DoRASet | LlavaRepoSet | CheckpointSet

_LAZY = {
    "CheckpointSet": ".checkpoint",
    "DoRASet": ".dora",
    "LlavaRepoSet": ".llava_repo",
    "LoRASet": ".peft_lora",
    "resolve_ref": ".files",
}


def __getattr__(name: str):
    if name == "InputSet":
        from .checkpoint import CheckpointSet
        from .dora import DoRASet
        from .llava_repo import LlavaRepoSet
        from .peft_lora import LoRASet

        return LoRASet | DoRASet | LlavaRepoSet | CheckpointSet
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_inputs(refs: Sequence[str], base: str | None = None) -> InputSet:
    """Open adapters (all PEFT LoRA) or checkpoints (all full), never a mix."""
    from .checkpoint import CheckpointSet, is_checkpoint_dir
    from .dora import DoRASet, is_dora_dir
    from .files import resolve_ref
    from .llava_repo import LlavaRepoSet, is_llava_repo_dir
    from .peft_lora import LoRASet, is_lora_dir

    if not refs:
        raise InputError("no adapters given: pass at least one adapter folder")
    dirs = [resolve_ref(r) for r in refs]
    kinds = []
    for ref, d in zip(refs, dirs):
        if is_lora_dir(d):
            kinds.append("lora")
        elif is_checkpoint_dir(d):
            kinds.append("checkpoint")
        else:
            raise InputError(
                f"{ref}: not a PEFT adapter folder (no adapter_config.json) nor a model "
                f"checkpoint (no config.json + *.safetensors); contents: "
                f"{sorted(p.name for p in d.iterdir())[:10]}"
            )
    if len(set(kinds)) > 1:
        mixed = ", ".join(f"{r} ({k})" for r, k in zip(refs, kinds))
        raise InputError(f"cannot merge LoRA adapters with full checkpoints in one run: {mixed}")
    if kinds[0] == "lora":
        dora = [is_dora_dir(d) for d in dirs]
        _refuse_mixed(
            refs,
            dora,
            "DoRA",
            "LoRA",
            "cannot merge DoRA adapters with plain LoRA adapters in one run (a LoRA adapter has no "
            "magnitude vector to merge)",
        )
        llava = [is_llava_repo_dir(d) for d in dirs]
        _refuse_mixed(
            refs,
            llava,
            "LLaVA-repo",
            "PEFT",
            "cannot merge LLaVA-repo checkpoints (adapter + non_lora_trainables.bin) with plain PEFT "
            "adapters in one run (the projector would be averaged over only some inputs)",
        )
        if all(llava):
            if any(dora):
                raise InputError(f"{refs[0]}: DoRA in the LLaVA-repo layout is not supported")
            return LlavaRepoSet(list(refs), dirs)
        return DoRASet(list(refs), dirs) if all(dora) else LoRASet(list(refs), dirs)
    if base is None:
        raise InputError(
            "full fine-tuned checkpoints are merged as task vectors tau_i = theta_i - theta_0: "
            "pass the base checkpoint (--base PATH / pretrained=...)"
        )
    return CheckpointSet(list(refs), dirs, base_ref=base, base_dir=resolve_ref(base))


def _refuse_mixed(refs, flags, yes: str, no: str, why: str) -> None:
    """One kind of input per run: ``why``, listing each input with its kind."""
    if any(flags) and not all(flags):
        mixed = ", ".join(f"{r} ({yes if x else no})" for r, x in zip(refs, flags))
        raise InputError(f"{why}: {mixed}")


__all__ = ["CheckpointSet", "DoRASet", "InputSet", "LlavaRepoSet", "LoRASet", "open_inputs", "resolve_ref"]
