"""Cost pre-check: estimate a merge's compute before it starts, and refuse the
ones that would run for a long time on their own (an exact SVD of many
full-rank deltas, a dense iterative WUDI on CPU) unless forced.

The estimate keys on the method, the input kind, the output format and the
device, never on a method's internals: it counts floating-point operations
from the module shapes and converts them to seconds with a rate measured on
this machine (one small SVD or matmul, timed once per process).

``HARNESS_MERGE_MAX_SECONDS`` (default 600) is the limit;
``HARNESS_MERGE_FORCE=1`` (or ``force=True`` / ``--force``) runs anyway.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import MergeError

DEFAULT_MAX_SECONDS = 600.0
# Slower than any machine this runs on: a merge within the limit at this rate
# needs no calibration (the tiny merges of tests and demos).
_PESSIMISTIC_FLOPS = 1e9


class CostError(MergeError):
    """The merge would take longer than the limit; the message lists the alternatives."""


@dataclass(frozen=True)
class Cost:
    what: str  # "an exact SVD of 196 full-rank deltas (largest 11008x4096)"
    flops: float
    kind: str  # "svd" | "matmul": which calibration converts flops to seconds
    alternatives: tuple[str, ...]

    def seconds(self) -> float:
        return self.flops / (_svd_rate() if self.kind == "svd" else _matmul_rate())


def max_seconds() -> float:
    raw = os.environ.get("HARNESS_MERGE_MAX_SECONDS")
    if raw is None:
        return DEFAULT_MAX_SECONDS
    try:
        return float(raw)
    except ValueError:
        raise MergeError(f"HARNESS_MERGE_MAX_SECONDS must be a number of seconds, got {raw!r}") from None


def _time(fn, reps: int) -> float:
    fn()  # warm-up (allocations, thread pools)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@lru_cache(maxsize=1)
def _svd_rate(n: int = 384) -> float:
    """Flops per second of a float64 SVD (the writer's), counted as ``m n min(m, n)``."""
    x = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return n**3 / _time(lambda: torch.linalg.svd(x, full_matrices=False), 2)


@lru_cache(maxsize=1)
def _matmul_rate(n: int = 512) -> float:
    """Flops per second of a float32 matmul (``2 n^3`` flops)."""
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    return 2 * n**3 / _time(lambda: x @ x, 5)


def _shapes(inputs) -> list[tuple[int, int]]:
    out = []
    for name in inputs.module_names:
        s = tuple(inputs.shape(name))
        if len(s) == 2:
            out.append((int(s[0]), int(s[1])))
    return out


def estimate(inputs, mspec, params, fmt: str) -> Cost | None:
    """The dominant cost of merging ``inputs`` with ``mspec``/``params`` into ``fmt``, if any."""
    lowrank = inputs.kind == "lora" and mspec.returns_lowrank(params)
    if fmt == "lora" and not lowrank:
        shapes = _shapes(inputs)
        if shapes:
            flops = float(sum(m * n * min(m, n) for m, n in shapes))
            big = max(shapes, key=lambda s: s[0] * s[1])
            alts = ["--base BASE: write merged full weights (no SVD)"]
            if inputs.kind == "lora":
                alts.append(
                    "a method that stays low-rank on LoRA (ta, wa, copa, tsv, iso_c, iso_cts, wudi, wudi2)"
                )
            return Cost(
                what=f"an exact SVD of {len(shapes)} full-rank {mspec.name} deltas (largest {big[0]}x{big[1]}), "
                f"to write them as a LoRA (on CPU, float64; --rank truncates after the full SVD)",
                flops=flops,
                kind="svd",
                alternatives=tuple(alts),
            )
    if mspec.name in ("wudi", "wudi2") and getattr(params, "device", "cpu") == "cpu" and not lowrank:
        shapes = _shapes(inputs)
        n_in = len(inputs.refs)
        iters = (
            0
            if getattr(params, "solver", "iterative") == "closed_form"
            else int(getattr(params, "iterations", 300))
        )
        # normal equations: N (m n^2) to build, then 2 m n^2 per iteration; closed form: + ~20 n^3.
        flops = float(
            sum(2 * m * n * n * (n_in + iters) + (20 * n**3 if not iters else 0) for m, n in shapes)
        )
        alts = ["device=cuda: run the optimisation on a GPU"]
        if inputs.kind == "lora":
            alts.append("space=factor: optimise in the LoRA factor space (small cores)")
        if iters:
            alts.append("solver=closed_form: solve the same quadratic directly")
        return Cost(
            what=f"a dense {mspec.name} on CPU: {iters or 'a closed-form solve'}"
            f"{' iterations' if iters else ''} over {len(shapes)} full {mspec.name} matrices",
            flops=flops,
            kind="matmul",
            alternatives=tuple(alts),
        )
    return None


def check_cost(inputs, mspec, params, fmt: str, *, force: bool = False) -> Cost | None:
    """Raise :class:`CostError` when the estimated time exceeds :func:`max_seconds`."""
    cost = estimate(inputs, mspec, params, fmt)
    if cost is None:
        return None
    limit = max_seconds()
    if cost.flops / _PESSIMISTIC_FLOPS <= limit:
        return cost
    secs = cost.seconds()
    if secs <= limit or force or os.environ.get("HARNESS_MERGE_FORCE") == "1":
        return cost
    alts = "; ".join(cost.alternatives)
    raise CostError(
        f"{mspec.name}: refusing to start {cost.what}: estimated {_human(secs)} on this machine "
        f"(limit {_human(limit)}, HARNESS_MERGE_MAX_SECONDS). Alternatives: {alts}; "
        f"or --force (HARNESS_MERGE_FORCE=1 inside a harness) to run it anyway"
    )


def _human(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
