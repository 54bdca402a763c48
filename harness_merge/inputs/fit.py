"""Does a set of LoRA modules fit a loaded base model? (names and shapes)"""

from __future__ import annotations

from ..errors import InputError


def check_lora_fits_model(
    model, shapes: dict[str, tuple[int, int]], *, base_ref: str, adapter_ref: str
) -> None:
    """Every adapter module must exist in ``model`` as a layer with a 2-D weight
    of shape ``(d_out, d_in)``; the error says which module and what the base has."""
    named = dict(model.named_modules())
    for name, (d_out, d_in) in shapes.items():
        mod = named.get(name)
        if mod is None:
            tail = name.rsplit(".", 1)[-1]
            similar = [n for n in named if n.endswith("." + tail)][:2]
            hint = f"; the base has e.g. {similar}" if similar else ""
            raise InputError(
                f"{adapter_ref}: module {name} does not exist in the base model {base_ref}{hint} "
                f"(adapter trained on another architecture or transformers version?)"
            )
        w = getattr(mod, "weight", None)
        if w is None or tuple(w.shape) != (d_out, d_in):
            got = None if w is None else tuple(w.shape)
            raise InputError(
                f"{adapter_ref}: module {name} expects a weight of shape {(d_out, d_in)} but the base "
                f"model {base_ref} has {got}"
            )
