"""Typed method parameters: one frozen dataclass per method, validated in one place.

Strings from the edges (CLI ``--param k=v``, harness ``model_args``, YAML) are
converted once, here, by ``from_strings`` according to the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from ..errors import MethodParamError

_NONE_WORDS = {"none", "null", "off", ""}


@dataclass(frozen=True)
class MethodParams:
    """Parameters every method shares.

    scaling: lambda, multiplies the merged update (the second seed paper applies
        one lambda to all methods).
    weights: per-input weights (one per adapter/checkpoint) or None (method default).
    nonlinear: what full checkpoints' embeddings, lm_head, patch embeddings and
        non-2-D tensors (norms, biases) get: ``average`` (default: the plain mean
        of their task vectors, no lambda, whatever the method) or ``method``
        (the method itself, lambda included, as mergekit does for every tensor;
        1-D tensors need an element-wise method: ta, wa, ties, dare, dare_ties,
        pcb). LoRA adapters have no such tensors.
    """

    method: typing.ClassVar[str] = "?"

    scaling: float = 1.0
    weights: Optional[tuple[float, ...]] = None
    nonlinear: Literal["average", "method"] = "average"

    def __post_init__(self) -> None:
        if self.scaling < 0:
            self._bad("scaling", self.scaling, "must be >= 0")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        self.validate()

    # -- hooks -------------------------------------------------------------
    def validate(self) -> None:
        """Range checks of the subclass; raise with ``self._bad``."""

    def check_inputs(self, n_inputs: int) -> None:
        """Checks that need the number of inputs (weights length, ...)."""
        if self.weights is not None and len(self.weights) != n_inputs:
            raise MethodParamError(
                f"{self.method}: weights has {len(self.weights)} values but {n_inputs} inputs "
                f"were given; pass one weight per adapter, e.g. weights=[{','.join(['1.0'] * n_inputs)}]"
            )

    def check_ranks(self, module: str, ranks: list[int]) -> None:
        """Checks on the LoRA ranks of one module, run before any tensor is read."""

    def needs_base(self) -> bool:
        """Whether a merge of full checkpoints reads the base (theta_0): True
        where the formula uses the task vectors ``theta_n - theta_0``; a method
        whose result is a function of the fine-tuned weights alone says False
        (the base is then neither read nor hashed)."""
        return True

    def plan_note(self, kind: str, shapes: list[tuple[int, ...]], n_inputs: int) -> str | None:
        """A sentence on what this merge will cost, said before it starts
        (``kind``: "lora" | "dense"; ``shapes`` of the modules the method runs
        on), or None when there is nothing worth saying."""
        return None

    @classmethod
    def listing_note(cls) -> str | None:
        """One line for ``harness-merge methods`` on what the defaults cost."""
        return None

    def weight_list(self, n: int, default: float = 1.0) -> list[float]:
        return list(self.weights) if self.weights is not None else [default] * n

    # -- helpers -----------------------------------------------------------
    def _bad(self, name: str, value: Any, why: str) -> None:
        raise MethodParamError(f"{self.method}: {name} {why}, got {value!r}")

    def _check_fraction(self, name: str, *, closed_right: bool = False) -> None:
        v = getattr(self, name)
        ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
        if not ok:
            self._bad(name, v, "must be in [0, 1]" if closed_right else "must be in [0, 1)")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.get("weights") is not None:
            d["weights"] = list(d["weights"])
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_strings(cls, values: dict[str, Any]) -> "MethodParams":
        """Build from string (or already typed) values, converting by field type.

        Unknown keys are an error that lists the known ones.
        """
        hints = typing.get_type_hints(cls)
        known = cls.field_names()
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise MethodParamError(
                    f"{cls.method}: unknown parameter {key!r}; known parameters: {', '.join(known)}"
                )
            kwargs[key] = _convert(cls.method, key, raw, hints[key])
        return cls(**kwargs)


def _convert(method: str, key: str, raw: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    # Optional[X] / X | None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS or raw is None:
            return None
        return _convert(method, key, raw, non_none[0])
    if origin is Literal:
        if raw not in args:
            raise MethodParamError(f"{method}: {key} must be one of {', '.join(map(str, args))}, got {raw!r}")
        return raw
    if origin is tuple:
        if isinstance(raw, str):
            items = [s for s in raw.strip().strip("[]()").replace(";", ",").split(",") if s.strip()]
        else:
            items = list(raw)
        return tuple(_convert(method, key, x, args[0]) for x in items)
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return str(raw)
    except (TypeError, ValueError):
        raise MethodParamError(
            f"{method}: {key} must be {getattr(tp, '__name__', tp)}, got {raw!r}"
        ) from None
    return raw
