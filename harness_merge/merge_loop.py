"""The merge driver: validate everything that can be validated without reading
a tensor, then stream one module at a time through the method.

Policy for tensors a method cannot sensibly treat (the same for every method):
tensors that are not 2-D, and embedding-like matrices (token/position
embeddings, lm_head, patch embeddings), get the plain average of the task
vectors, ``mean_n tau_n`` (no lambda), i.e. the weight average of the
fine-tuned models. Tensors no input changed are skipped (delta 0).
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .errors import MethodParamError
from .methods import MethodSpec, module_generator
from .methods._params import MethodParams
from .types import Dense, MergeResult


def validate_plan(inputs, spec: MethodSpec, params: MethodParams) -> None:
    """Arity, input kind and rank checks; raises before any tensor is read."""
    kind = inputs.kind
    if kind not in spec.inputs:
        raise MethodParamError(
            f"{spec.name}: works on {' and '.join(sorted(spec.inputs))} inputs only, got "
            f"{'LoRA adapters' if kind == 'lora' else 'full checkpoints'}"
        )
    n = len(inputs.refs)
    if n < spec.min_inputs:
        raise MethodParamError(
            f"{spec.name}: needs at least {spec.min_inputs} adapters, got {n} ({', '.join(inputs.refs)})"
        )
    params.check_inputs(n)
    if kind == "lora":
        for m in inputs.module_names:
            params.check_ranks(m, inputs.ranks(m))


def iter_merged(
    inputs, spec: MethodSpec, params: MethodParams, *, progress: bool = True, names=None
) -> Iterator[tuple[str, MergeResult | None]]:
    """Yield ``(module name, result)`` per module; ``None`` where nothing changed."""
    seed = int(getattr(params, "seed", 0))
    names = list(inputs.module_names if names is None else names)
    # On stderr from the first module on: the bar names the module being merged
    # before its work starts, so a slow module shows which it is.
    bar = tqdm(names, desc=f"merge {spec.name}", unit="module", disable=not progress, leave=False,
               file=sys.stderr, mininterval=0.5)
    with torch.no_grad():
        for name in bar:
            bar.set_postfix_str(name, refresh=True)
            mi = inputs.read(name)
            if mi.kind == "dense" and all(not t.any() for t in mi.task_vectors):
                yield name, None
            elif inputs.is_matrix(name):
                # LoRA names a module, a checkpoint its weight: one key for both, so
                # random methods draw the same masks from either input form.
                key = name.removesuffix(".weight")
                yield name, spec.fn(mi, params, generator=module_generator(seed, key))
            else:
                yield name, Dense(torch.stack(mi.task_vectors).mean(dim=0), info={"policy": "average"})
            del mi
