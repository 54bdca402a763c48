"""The one fit check: do a set of LoRA modules fit the base model? (names and shapes)

The base is built on the meta device from its config (no weights read), and
every adapter module must be a module of it *by its exact name*, with a 2-D
weight of shape ``(d_out, d_in)``. Exact, because that is how PEFT loads an
adapter (``PeftModel.from_pretrained`` strips ``base_model.model.`` and looks
the rest up as is): an adapter saved under another key layout (e.g. a text LM's
``model.layers.*`` on a Qwen2-VL / LLaVA base, whose language model is
``model.language_model.layers.*`` in transformers 5) is *not* remapped by PEFT
0.21 - its keys are reported missing and the update is silently zero. The old
suffix match of ``backends.hf.check_lora_fits`` accepted such adapters; here
they are refused, and the error names the base module with the same tail.
Layouts this package knows how to rename (the LLaVA repo's) are renamed by
their reader before the check (:mod:`.llava_repo`).

:func:`check_lora_fits_model` checks a built model; :func:`check_lora_fits`
builds the base (``meta_model``) and checks an opened LoRA / DoRA / LLaVA-repo set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import InputError

log = logging.getLogger("harness_merge")


def meta_model(base: str | Path, *, trust_remote_code: bool = False):
    """The base's model class built on the meta device (module names and shapes
    as transformers loads it; no weights read). ``base``: a folder or hub id
    (only its config is read)."""
    import torch
    import transformers
    from transformers import AutoConfig

    ref = os.path.expanduser(str(base))
    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 (any failure: the config is unreadable)
        raise InputError(f"{base}: cannot read the base model's config ({type(e).__name__}: {e})") from None
    classes = [getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)]
    last = None
    for cls in classes + [
        transformers.AutoModelForImageTextToText,
        transformers.AutoModelForCausalLM,
        transformers.AutoModel,
    ]:
        try:
            with torch.device("meta"):
                if hasattr(cls, "from_config"):
                    return cls.from_config(config, trust_remote_code=trust_remote_code)
                return cls._from_config(config)
        except Exception as e:  # noqa: BLE001 (try the next class)
            last = e
    raise InputError(f"{base}: no transformers class builds this base ({type(last).__name__}: {last})")


def check_lora_fits_model(
    model, shapes: dict[str, tuple[int, int]], *, base_ref: str, adapter_ref: str
) -> None:
    """Every adapter module must exist in ``model`` (exact name) as a layer with
    a 2-D weight of shape ``(d_out, d_in)``; the error names the adapter, the
    module, both shapes and what the base has instead."""
    named = dict(model.named_modules())
    for name, (d_out, d_in) in shapes.items():
        mod = named.get(name)
        if mod is None:
            tail = name.rsplit(".", 1)[-1]
            similar = [n for n in named if n.endswith("." + tail)][:2]
            hint = f"; the base has e.g. {similar}" if similar else ""
            raise InputError(
                f"{adapter_ref}: module {name} does not exist in the base model {base_ref}{hint} "
                f"(PEFT matches module names exactly: the base does not have this module - adapter trained "
                f"on another architecture or transformers version?)"
            )
        w = getattr(mod, "weight", None)
        got = None if w is None else tuple(w.shape)
        if got is None or len(got) != 2 or got != (d_out, d_in):
            have = (
                f"{list(got)} (out_features {got[0]}, in_features {got[1]})"
                if got is not None and len(got) == 2
                else f"{got}"
            )
            raise InputError(
                f"{adapter_ref}: shape mismatch at {name}: the adapter's update is {[d_out, d_in]} "
                f"(lora_B out_features {d_out}, lora_A in_features {d_in}) but the base model {base_ref} "
                f"has a weight of {have}; the adapter was trained for another model size"
            )


def check_lora_fits(inputs, base: str | Path, *, trust_remote_code: bool = False) -> None:
    """Check an opened LoRA-kind input set (module names after its layout's
    renaming, shapes from the headers) against the base ``base``.

    The set has already checked that its adapters agree on names and shapes,
    so the first adapter is named for a misfit. A base whose config reads but
    that no transformers class builds offline is skipped with a warning
    (the loader reports it later, as before).
    """
    if getattr(inputs, "kind", None) != "lora":
        return
    try:
        model = meta_model(base, trust_remote_code=trust_remote_code)
    except InputError as e:
        if "cannot read the base model's config" in str(e):
            raise
        log.warning("fit check skipped: %s", e)
        return
    shapes = {m: inputs.shape(m) for m in inputs.module_names}
    check_lora_fits_model(model, shapes, base_ref=str(base), adapter_ref=inputs.refs[0])


__all__ = ["check_lora_fits", "check_lora_fits_model", "meta_model"]
