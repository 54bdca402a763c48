"""Merge methods: pure per-module tensor functions behind one registry.

A method is ``merge_module(inputs: ModuleInputs, params: P, *, generator) ->
LowRank | Dense``: no files, no network, no global state. Register it with
``@register(name, params=P, ...)`` in its family's file; a family registers
several names with different parameter classes (``ties``, ``dare``,
``dare_ties`` share one function).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..errors import MethodParamError
from ..types import MergeResult
from ._params import MethodParams

MergeFn = Callable[..., MergeResult]

# Files whose import registers methods. Imported on first registry use so that
# ``import harness_merge`` stays light.
_FAMILIES = ("linear", "ties_dare", "copa", "pcb", "tsv_iso", "wudi")


@dataclass(frozen=True)
class StatPass:
    """One pass of the merge driver over every module the method runs on, before
    the merge, for a method whose statistics span the whole model.

    ``update(state, module_inputs, stats) -> state`` folds one module into the
    pass's state (``None`` at the start; ``stats`` holds what earlier passes
    found); ``finish(state, stats) -> dict`` adds this pass's findings to
    ``stats``. Both are pure tensor functions; the driver streams the modules.
    """

    name: str
    update: Callable[[Any, Any, dict], Any]
    finish: Callable[[Any, dict], dict]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    params_cls: type[MethodParams]
    summary: str
    reference_url: str
    inputs: frozenset[str] = field(default_factory=lambda: frozenset({"lora", "dense"}))
    min_inputs: int = 1
    lowrank_on_lora: bool | Callable[[MethodParams], bool] = False
    elementwise: bool = False
    model_passes: Callable[[MethodParams], list[StatPass]] | None = None
    stored_dtype: bool = False
    pointwise: bool = False

    def passes(self, params: MethodParams) -> list[StatPass]:
        """The statistics passes the driver runs before merging (usually none);
        the method then receives the collected ``stats`` as a keyword."""
        return list(self.model_passes(params)) if self.model_passes is not None else []

    def returns_lowrank(self, params: MethodParams) -> bool:
        """Whether every module of LoRA inputs comes back ``LowRank`` with ``params``."""
        f = self.lowrank_on_lora
        return bool(f(params) if callable(f) else f)

    def make_params(self, values: dict | None = None) -> MethodParams:
        return self.params_cls.from_strings(dict(values or {}))


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(
    name: str,
    *,
    params: type[MethodParams],
    summary: str,
    reference_url: str,
    inputs: Iterable[str] = ("lora", "dense"),
    min_inputs: int = 1,
    lowrank_on_lora: bool | Callable[[MethodParams], bool] = False,
    elementwise: bool = False,
    model_passes: Callable[[MethodParams], list[StatPass]] | None = None,
    stored_dtype: bool = False,
    pointwise: bool = False,
) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding ``fn`` to the registry under ``name``.

    ``lowrank_on_lora`` (a bool, or a function of the params): the method
    returns ``LowRank`` for every module of LoRA inputs, so its artifact is a
    LoRA adapter by default (else full weights when a base is given, or a LoRA
    by SVD). ``elementwise``: defined entry by entry, so it applies to tensors
    of any shape (1-D norms and biases under ``nonlinear=method``).
    ``model_passes``: statistics passes over the whole model (see StatPass).
    ``stored_dtype``: LoRA factors may come in their stored dtype (e.g.
    float16), checked finite; the method computes in float32 itself and only
    copies what it concatenates (the result is the same; no float32 copy of
    every factor).
    ``pointwise``: on dense inputs each result entry is a function of the same
    entry of every input alone, computed entry by entry with no generator and
    no statistics (e.g. a linear combination): the driver may then run it on
    flat blocks of a module and join the blocks, the same numbers (see
    ``merge_loop.iter_merged(blockwise=True)``)."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise RuntimeError(f"method {name!r} registered twice ({_REGISTRY[name].fn} and {fn})")
        if params.method == "?":
            raise RuntimeError(f"{params.__name__} must set the ClassVar 'method'")
        _REGISTRY[name] = MethodSpec(
            name,
            fn,
            params,
            summary,
            reference_url,
            frozenset(inputs),
            min_inputs,
            lowrank_on_lora,
            elementwise,
            model_passes,
            stored_dtype,
            pointwise,
        )
        return fn

    return deco


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for fam in _FAMILIES:
        importlib.import_module(f"{__name__}.{fam}")
    _loaded = True


def available() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
    """The spec of method ``name``; unknown names list the alternatives."""
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise MethodParamError(
            f"unknown method {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def module_generator(seed: int, module_name: str) -> torch.Generator:
    """A generator seeded from (seed, module name): the random draws of one module
    do not depend on the order modules are streamed in."""
    import zlib

    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63))
    return g


__all__ = ["MethodSpec", "MethodParams", "StatPass", "register", "available", "get", "module_generator"]
