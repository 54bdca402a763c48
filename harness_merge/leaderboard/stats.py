"""Paired tests for the regression gate: pure functions on per-sample scores.

Both runs scored the same docs, so each doc gives a pair (baseline, new) and the
tests work on the paired differences ``d_i = new_i - baseline_i`` (sign flipped
for lower-is-better metrics, so ``d < 0`` is always worse).

- :func:`mcnemar_exact` - scores with at most two values (0/1 or 0/100 exact
  match): the exact McNemar test, i.e. the exact sign test on the discordant
  pairs. Under "no change" the ``b`` docs that got worse among the ``b + c``
  that changed are ``Binomial(b + c, 1/2)``; ``p_drop = P(X >= b)``.
- :func:`paired_bootstrap` - any scores: resample docs with replacement
  (``n_boot`` times, seeded), percentile CI of the mean difference; the
  one-sided p of a drop is the share of resampled means of the *centred*
  differences (``d - mean(d)``, the null "no change") at or below the observed
  mean, with the usual +1 correction (Efron & Tibshirani 1993, sec. 16.4).
- :func:`holm` - Holm's step-down adjustment of many p values (family-wise
  error rate), so a grid of 100 cells does not fail on 5 of them by chance.

Every function is deterministic: the bootstrap takes an explicit seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


@dataclass(frozen=True)
class PairedTest:
    test: str  # "mcnemar" | "bootstrap" | "none" (all pairs equal)
    n: int
    delta: float  # mean of new - baseline (positive = better)
    ci_low: float
    ci_high: float
    p_drop: float  # one-sided p of "new is worse"
    p_gain: float  # one-sided p of "new is better"
    worse: int  # docs whose score got worse
    better: int  # docs whose score got better


def binom_tail(k: int, n: int) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, 1/2)``, exact (integer arithmetic)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(Fraction(sum(math.comb(n, i) for i in range(k, n + 1)), 2**n))


def _as_pairs(baseline, new, higher_is_better: bool) -> np.ndarray:
    b = np.asarray(baseline, dtype=np.float64)
    x = np.asarray(new, dtype=np.float64)
    if b.shape != x.shape or b.ndim != 1:
        raise ValueError(f"paired scores need two equal-length vectors, got shapes {b.shape} and {x.shape}")
    if b.size == 0:
        raise ValueError("paired scores: no samples")
    if not (np.isfinite(b).all() and np.isfinite(x).all()):
        raise ValueError("paired scores: NaN or infinite per-sample score")
    return (x - b) if higher_is_better else (b - x)


def bootstrap_ci(d: np.ndarray, *, n_boot: int, seed: int, level: float) -> tuple[float, float, np.ndarray]:
    """Percentile CI of ``mean(d)`` and the resampled means of the centred differences."""
    rng = np.random.default_rng(seed)
    n = d.size
    means = np.empty(n_boot)
    centred = np.empty(n_boot)
    dc = d - d.mean()
    step = max(1, 2_000_000 // n)  # bound the (rows, n) index block
    for s in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - s), n))
        means[s : s + idx.shape[0]] = d[idx].mean(axis=1)
        centred[s : s + idx.shape[0]] = dc[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi), centred


def mcnemar_exact(
    baseline, new, *, higher_is_better: bool = True, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> PairedTest:
    """Exact McNemar test of paired two-valued scores (see the module docstring);
    the CI of the mean difference is the paired bootstrap's."""
    d = _as_pairs(baseline, new, higher_is_better)
    values = np.unique(np.concatenate([np.asarray(baseline, float), np.asarray(new, float)]))
    if values.size > 2:
        raise ValueError(
            f"mcnemar_exact needs scores with at most two values, got {values.size} distinct ones"
        )
    worse, better = int((d < 0).sum()), int((d > 0).sum())
    if worse + better == 0:
        return PairedTest("none", d.size, 0.0, 0.0, 0.0, 1.0, 1.0, 0, 0)
    lo, hi, _ = bootstrap_ci(d, n_boot=n_boot, seed=seed, level=level)
    n_disc = worse + better
    return PairedTest(
        "mcnemar",
        d.size,
        float(d.mean()),
        lo,
        hi,
        binom_tail(worse, n_disc),
        binom_tail(better, n_disc),
        worse,
        better,
    )


def paired_bootstrap(
    baseline, new, *, higher_is_better: bool = True, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> PairedTest:
    """Paired bootstrap test of the mean difference (see the module docstring)."""
    d = _as_pairs(baseline, new, higher_is_better)
    worse, better = int((d < 0).sum()), int((d > 0).sum())
    if worse + better == 0:
        return PairedTest("none", d.size, 0.0, 0.0, 0.0, 1.0, 1.0, 0, 0)
    lo, hi, centred = bootstrap_ci(d, n_boot=n_boot, seed=seed, level=level)
    delta = float(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    p_drop = (1 + int((centred <= delta + tol).sum())) / (n_boot + 1)
    p_gain = (1 + int((centred >= delta - tol).sum())) / (n_boot + 1)
    return PairedTest("bootstrap", d.size, delta, lo, hi, min(1.0, p_drop), min(1.0, p_gain), worse, better)


def paired_test(baseline, new, **kw) -> PairedTest:
    """McNemar for two-valued scores (exact match, accuracy), else the paired bootstrap."""
    values = np.unique(np.concatenate([np.asarray(baseline, float), np.asarray(new, float)]))
    return (mcnemar_exact if values.size <= 2 else paired_bootstrap)(baseline, new, **kw)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def sample_stderr(scores) -> float | None:
    """Standard error of the mean, ``std(ddof=1) / sqrt(n)`` (what lmms-eval's ``mean_stderr`` reports)."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size < 2:
        return None
    return float(x.std(ddof=1) / math.sqrt(x.size))
