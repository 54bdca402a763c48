"""The merge driver: validate everything that can be validated without reading
a tensor, then stream one module at a time through the method.

Policy for tensors that are not linear maps (full checkpoints only: tensors
that are not 2-D, and embedding-like matrices - token/position embeddings,
lm_head, patch embeddings), set by the ``nonlinear`` parameter every method
has: ``average`` (default) gives them the plain average of the task vectors,
``mean_n tau_n`` (no lambda), i.e. the weight average of the fine-tuned
models, whatever the method; ``method`` runs the method on them too, lambda
included, as mergekit does (1-D tensors need an element-wise method). The
choice is part of the parameters, so it is recorded in the manifest and the
cache key. Tensors no input changed are skipped (delta 0).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .errors import MethodParamError
from .inputs.checkpoint import stacked_rows
from .methods import MethodSpec, available, get, module_generator
from .methods._ops import BLOCK, flat_blocks  # noqa: F401 (BLOCK: the block size, re-exported)
from .methods._params import MethodParams
from .types import Dense, DenseBlocks, MergeResult, ModuleInputs

log = logging.getLogger(__name__)


def validate_plan(inputs, spec: MethodSpec, params: MethodParams) -> str | None:
    """Arity, input kind and rank checks; raises before any tensor is read.
    Logs (as a warning) and returns the method's cost note, if any."""
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
    if kind == "dense" and params.nonlinear == "method" and not spec.elementwise:
        one_d = [m for m in inputs.module_names if len(inputs.shape(m)) != 2]
        if one_d:
            raise MethodParamError(
                f"{spec.name}: nonlinear=method runs the method on every tensor, but {spec.name} needs "
                f"matrices and {one_d[0]} has shape {tuple(inputs.shape(one_d[0]))} "
                f"({len(one_d)} such tensors); use nonlinear=average, or an element-wise method "
                f"({', '.join(sorted(m for m in available() if get(m).elementwise))})"
            )
    note = params.plan_note(kind, [tuple(inputs.shape(m)) for m in _method_names(inputs, params)], n)
    if note:
        log.warning(note)
    return note


def _method_names(inputs, params: MethodParams) -> list[str]:
    """The modules the method itself runs on (the rest get the average)."""
    if params.nonlinear == "method":
        return list(inputs.module_names)
    return [m for m in inputs.module_names if inputs.is_matrix(m)]


def collect_stats(inputs, passes, names: list[str], *, progress: bool = True) -> dict:
    """Run a method's statistics passes: each streams every module in ``names``
    (one in memory at a time) through ``update``, then ``finish`` adds to the
    statistics the next passes and the merge see."""
    stats: dict = {}
    for p in passes:
        state = None
        for name in tqdm(names, desc=p.name, unit="module", disable=not progress, leave=False):
            mi = inputs.read(name)
            state = p.update(state, mi, stats)
            del mi
        stats.update(p.finish(state, stats))
    return stats


def merge_threads(default: int = 1) -> int:
    """Modules merged at once by :func:`iter_merged` (and input files hashed at
    once): ``HARNESS_MERGE_THREADS``, else ``default`` (1; :func:`factor_threads`
    for merges of LoRA factors that stay factors)."""
    env = os.environ.get("HARNESS_MERGE_THREADS", "").strip()
    if not env:
        return default
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1:
        raise MethodParamError(f"HARNESS_MERGE_THREADS must be a whole number >= 1, got {env!r}")
    return n


FACTOR_THREADS = 8  # factor_threads' cap: past it the reads, not the cores, bound such a merge


def factor_threads() -> int:
    """The default module threads of a factor-space LoRA merge (the method's
    result stays low-rank and the consumer only casts it): one per usable core,
    at most :data:`FACTOR_THREADS`. Such a merge runs torch on one intra-op
    thread (:func:`_drive`): factor-sized tensors gain little from splitting an
    op and much from merging modules side by side (README, Benchmarks). Every
    other merge keeps one module at a time with torch's own threads (a module
    of a checkpoint holds N full tensors; a dense result is factored by SVD in
    the writer's thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, FACTOR_THREADS))


def _ordered_map(fn, items: list, workers: int) -> Iterator:
    """``map(fn, items)`` in order, with at most ``workers + 1`` calls in
    flight on a thread pool (bounded memory); the first error is raised where
    its item's result is due. Closing the iterator cancels the queued calls."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    ex = ThreadPoolExecutor(workers, thread_name_prefix="harness-merge")
    try:
        it = iter(items)
        pending = deque(ex.submit(fn, x) for x in itertools.islice(it, workers + 1))
        while pending:
            res = pending.popleft().result()
            for x in itertools.islice(it, 1):
                pending.append(ex.submit(fn, x))
            yield res
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def iter_merged(
    inputs,
    spec: MethodSpec,
    params: MethodParams,
    *,
    progress: bool = True,
    names=None,
    threads=None,
    stored_dtype: bool = False,
    blockwise: bool = False,
) -> Iterator[tuple[str, MergeResult | DenseBlocks | None]]:
    """Yield ``(module name, result)`` per module, in ``names`` order; ``None``
    where nothing changed. ``threads`` modules are read and merged at once
    (default :func:`merge_threads`); every module's result is the same for any
    number (methods are pure per module, random ones seeded per module).
    ``stored_dtype``: a consumer that only casts the factors to the artifact's
    dtype (the LoRA writer) lets a method registered with ``stored_dtype`` get
    LoRA factors as stored; its ``LowRank`` factors may then be float16/bfloat16.
    ``blockwise``: a consumer that streams dense results (the full-weights
    writer of checkpoints) takes :class:`DenseBlocks` where the work is
    pointwise - the ``nonlinear=average`` tensors, and a ``pointwise`` method
    without statistics passes - on inputs that read flat blocks
    (``read_blocks``): each block of every input read, merged and handed over
    in turn (:data:`BLOCK` entries, so its float32 temporaries stay in cache),
    the same numbers as the whole tensor. Such blocks are computed when the
    consumer asks for them (in its thread, whatever ``threads``)."""
    read_stored = stored_dtype and spec.stored_dtype and inputs.kind == "lora"
    # factor space end to end: module threads on one intra-op thread each (factor_threads)
    factor_space = stored_dtype and inputs.kind == "lora" and spec.returns_lowrank(params)
    seed = int(getattr(params, "seed", 0))
    names = list(inputs.module_names if names is None else names)
    extra = {}
    with torch.no_grad():
        passes = spec.passes(params)
        if passes:
            extra["stats"] = collect_stats(inputs, passes, _method_names(inputs, params), progress=progress)

    # Full checkpoints answer "nothing changed" on the stored tensors (stops at the
    # first difference); None from it (mixed dtypes), or other inputs: the task vectors say.
    unchanged = getattr(inputs, "unchanged", None) if inputs.kind == "dense" else None

    by_block = blockwise and inputs.kind == "dense" and hasattr(inputs, "read_blocks")
    method_by_block = by_block and spec.pointwise and not extra

    def one(name: str) -> MergeResult | DenseBlocks | None:
        with torch.no_grad():  # per thread
            same = unchanged(name) if unchanged is not None else None
            if same:
                return None
            runs_method = inputs.is_matrix(name) or params.nonlinear == "method"
            if same is False and (method_by_block if runs_method else by_block):
                return _blocks(
                    tuple(inputs.shape(name)),
                    lambda bounds: inputs.read_blocks(name, bounds),
                    lambda mi: _pointwise(spec, params, mi) if runs_method else _average(mi),
                    {} if runs_method else {"policy": "average"},
                )
            mi = inputs.read(name, stored_dtype=True) if read_stored else inputs.read(name)
            if mi.kind == "dense" and same is None and all(not t.any() for t in mi.task_vectors):
                return None
            if runs_method:
                # LoRA names a module, a checkpoint its weight: one key for both, so
                # random methods draw the same masks from either input form.
                key = name.removesuffix(".weight")
                return spec.fn(mi, params, generator=module_generator(seed, key), **extra)
            return Dense(torch.stack(mi.task_vectors).mean(dim=0), info={"policy": "average"})

    yield from _drive(one, names, spec, progress, threads, factor_space)


def iter_merged_base_free(
    inputs,
    spec: MethodSpec,
    params: MethodParams,
    *,
    progress: bool = True,
    threads=None,
    blockwise: bool = False,
) -> Iterator[tuple[str, MergeResult | DenseBlocks | None]]:
    """Full checkpoints, a method with ``params.needs_base()`` False: the
    method runs on the fine-tuned weights themselves (``theta_0 = 0``), so its
    ``Dense`` result is the merged weight, not an update; the base is never
    read. Yields ``(name, result)`` in the first checkpoint's layout; ``None``
    where every checkpoint holds the same tensor (written as stored).
    ``blockwise``: :class:`DenseBlocks` where the work is pointwise, as
    :func:`iter_merged` (flat blocks of the fine-tuned weights,
    ``read_fine_tuned_blocks``)."""
    if params.needs_base() or inputs.kind != "dense":
        raise MethodParamError(f"{spec.name}: this merge reads the base (theta_0)")
    seed = int(getattr(params, "seed", 0))
    names = inputs.layout_names()

    def one(name: str) -> MergeResult | None:
        with torch.no_grad():
            same = inputs.unchanged(name, base_free=True)
            if same:
                return None
            runs_method = inputs.is_matrix(name) or params.nonlinear == "method"
            if blockwise and same is False and (spec.pointwise or not runs_method):
                return _blocks(
                    tuple(inputs.shape(name)),
                    lambda bounds: (
                        ModuleInputs(name=name, task_vectors=t)
                        for t in inputs.read_fine_tuned_blocks(name, bounds)
                    ),
                    lambda mi: _pointwise(spec, params, mi) if runs_method else _average(mi),
                    {} if runs_method else {"policy": "average"},
                )
            thetas = inputs.read_fine_tuned(name)
            if same is None and all(torch.equal(thetas[0], t) for t in thetas[1:]):
                return None
            mi = ModuleInputs(name=name, task_vectors=thetas)
            if runs_method:
                key = name.removesuffix(".weight")
                return spec.fn(mi, params, generator=module_generator(seed, key))
            return Dense(torch.stack(thetas).mean(dim=0), info={"policy": "average"})

    yield from _drive(one, names, spec, progress, threads)


def _blocks(shape, read, merge_block, info) -> DenseBlocks:
    numel = 1
    for d in shape:
        numel *= d

    def gen():
        with torch.no_grad():
            for mi in read(flat_blocks(numel)):
                yield merge_block(mi)

    return DenseBlocks(shape, gen, info=info)


def _pointwise(spec: MethodSpec, params: MethodParams, mi: ModuleInputs) -> torch.Tensor:
    res = spec.fn(mi, params, generator=None)
    if not isinstance(res, Dense):
        raise TypeError(f"{spec.name}: a pointwise method must return Dense on dense inputs")
    return res.delta


def _average(mi: ModuleInputs) -> torch.Tensor:
    # rows of one buffer (a block read): the same values in the same layout as their stack
    whole = stacked_rows(mi.task_vectors)
    return (torch.stack(mi.task_vectors) if whole is None else whole).mean(dim=0)


def _drive(
    one, names: list[str], spec: MethodSpec, progress: bool, threads, factor_space: bool = False
) -> Iterator:
    # On stderr from the first module on: the bar names the module whose result
    # is awaited, so a slow module shows which it is.
    bar = tqdm(
        total=len(names),
        desc=f"merge {spec.name}",
        unit="module",
        disable=not progress,
        leave=False,
        file=sys.stderr,
        mininterval=0.5,
    )
    workers = int(threads) if threads is not None else merge_threads(factor_threads() if factor_space else 1)
    # Factor space: one intra-op thread for every module, whatever the number of module
    # threads, so a result does not depend on HARNESS_MERGE_THREADS or the core count
    # (torch splits reductions by its thread count); restored when the loop ends.
    intra_op = torch.get_num_threads()
    if factor_space:
        torch.set_num_threads(1)
    results = _ordered_map(one, names, workers)
    try:
        for name in names:
            bar.set_postfix_str(name, refresh=True)
            res = next(results)
            bar.update(1)
            yield name, res
    finally:
        results.close()
        bar.close()
        if factor_space:
            torch.set_num_threads(intra_op)
