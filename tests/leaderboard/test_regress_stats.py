"""The paired statistical gate: exact McNemar / paired bootstrap per cell, Holm over
cells, minimum effect, changed answers; 0-1 and 0-100 metrics alike.

Oracles: scipy.stats.binomtest (exact sign test), scipy.stats.bootstrap (paired
percentile CI), Holm's procedure written out on a known example."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness_merge.leaderboard import stats
from harness_merge.leaderboard.regress import (
    answer_hash,
    compare,
    grid_id,
    main,
    parse_results,
)

SPEC = {"base": "b", "methods": ["copa", "ta"], "tasks": ["big", "small"]}


def cell(label, task, scores, answers=None, hib=True):
    scores = [float(s) for s in scores]
    answers = answers or [answer_hash(str(s)) for s in scores]
    return {
        "method": label,
        "label": label,
        "task": task,
        "metric": "score,none",
        "value": float(np.mean(scores)),
        "stderr": stats.sample_stderr(scores),
        "n": len(scores),
        "higher_is_better": hib,
        "samples": {"doc_id": list(range(len(scores))), "score": scores, "answer": answers},
    }


def results(cells, spec=SPEC):
    return {"schema_version": 2, "grid": {**spec, "grid_id": grid_id(spec)}, "cells": cells}


def binary(n, correct, seed=0):
    """``n`` 0/1 scores with ``correct`` ones, in a seeded order."""
    x = np.zeros(n)
    x[np.random.default_rng(seed).permutation(n)[:correct]] = 1
    return x


def flip(x, worse=0, better=0, seed=1):
    """Turn ``worse`` correct docs wrong and ``better`` wrong docs right."""
    y = x.copy()
    rng = np.random.default_rng(seed)
    ones, zeros = np.flatnonzero(x == x.max()), np.flatnonzero(x == x.min())
    y[rng.choice(ones, worse, replace=False)] = x.min()
    y[rng.choice(zeros, better, replace=False)] = x.max()
    return y


def grid_of(big_new, small_new, big_base, small_base, scale=1.0):
    def mk(big, small):
        return results(
            [cell(m, "big", big * scale) for m in ("copa", "ta")]
            + [cell(m, "small", small * scale) for m in ("copa", "ta")]
        )

    return mk(big_base, small_base), mk(big_new, small_new)


BIG, SMALL = binary(200, 120), binary(24, 12, seed=3)


# ------------------------------------------------------------------ the statistics against oracles


@pytest.mark.parametrize("k,n", [(0, 0), (3, 5), (5, 5), (12, 20), (30, 31), (100, 180)])
def test_binom_tail_is_scipys_exact_binomial_test(k, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    want = scipy_stats.binomtest(k, n, 0.5, alternative="greater").pvalue if n else 1.0
    assert stats.binom_tail(k, n) == pytest.approx(want, rel=1e-12)


def test_mcnemar_counts_discordant_pairs_only():
    scipy_stats = pytest.importorskip("scipy.stats")
    b = np.array([1] * 50 + [0] * 50 + [1] * 9 + [0] * 3)
    x = np.array([1] * 50 + [0] * 50 + [0] * 9 + [1] * 3)  # 9 worse, 3 better, 100 concordant
    t = stats.mcnemar_exact(b, x)
    assert (t.test, t.worse, t.better, t.n) == ("mcnemar", 9, 3, 112)
    assert t.p_drop == pytest.approx(scipy_stats.binomtest(9, 12, 0.5, alternative="greater").pvalue)
    assert t.p_gain == pytest.approx(scipy_stats.binomtest(3, 12, 0.5, alternative="greater").pvalue)
    assert t.delta == pytest.approx(-6 / 112)
    # the scale does not change the test
    t100 = stats.mcnemar_exact(100 * b, 100 * x)
    assert t100.p_drop == t.p_drop and t100.delta == pytest.approx(100 * t.delta)
    with pytest.raises(ValueError, match="at most two values"):
        stats.mcnemar_exact([0, 0.5, 1], [1, 1, 1])


def test_paired_bootstrap_ci_matches_scipy_and_p_is_sane():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 300)
    x = np.clip(b + rng.normal(-0.05, 0.1, 300), 0, 1)
    t = stats.paired_bootstrap(b, x, n_boot=4000, seed=0)
    ref = scipy_stats.bootstrap(
        (x, b),
        lambda u, v, axis: (u - v).mean(axis=axis),
        paired=True,
        n_resamples=4000,
        method="percentile",
        random_state=1,
    ).confidence_interval
    assert t.test == "bootstrap" and t.delta == pytest.approx((x - b).mean())
    assert t.ci_low == pytest.approx(ref.low, abs=0.004) and t.ci_high == pytest.approx(ref.high, abs=0.004)
    assert t.p_drop == pytest.approx(1 / 4001)  # a clear drop: no centred resample is that low
    assert t.p_gain > 0.99
    same = stats.paired_bootstrap(b, b)
    assert (same.test, same.p_drop, same.delta) == ("none", 1.0, 0.0)
    noise = stats.paired_bootstrap(b, b + rng.normal(0, 0.05, 300), seed=0)
    assert 0.01 < noise.p_drop < 0.99
    # lower is better flips the sign
    assert stats.paired_bootstrap(b, x, higher_is_better=False).delta == pytest.approx(-t.delta)


def test_holm_written_out():
    # sorted p: 0.01 (x3) -> 0.03, 0.03 (x2) -> 0.06, 0.04 (x1) -> max(0.06, 0.04) = 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_sample_stderr_is_std_over_sqrt_n():
    x = [1.0, 0.0, 1.0, 1.0]
    assert stats.sample_stderr(x) == pytest.approx(np.std(x, ddof=1) / 2)
    assert stats.sample_stderr([1.0]) is None


# ------------------------------------------------------------------ the gate


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_identical_runs_pass(scale):
    base, new = grid_of(BIG, SMALL, BIG, SMALL, scale)
    report = compare(base, new)
    assert report.ok and {r.status for r in report.rows} == {"within"}
    assert all(r.p == 1.0 and r.changed == 0 and r.n in (200, 24) for r in report.rows)


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_injected_significant_drop_fails_at_both_scales(scale, tmp_path, capsys):
    worse = flip(BIG, worse=25, better=3)  # -11 points of 100 on 200 docs
    base, new = grid_of(BIG, SMALL, BIG, SMALL, scale)
    new["cells"][0] = cell("copa", "big", worse * scale)
    report = compare(base, new)
    assert not report.ok
    [drop] = report.drops
    assert drop.key == ("copa", "big", "score,none") and drop.test == "mcnemar"
    assert drop.delta == pytest.approx(-22 / 200 * scale)
    assert drop.ci[0] < drop.delta < drop.ci[1] < 0
    exact = stats.binom_tail(25, 28)
    assert drop.p == pytest.approx(min(1.0, 4 * exact))  # Holm over 4 cells, the other 3 have p = 1
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "n.json").write_text(json.dumps(new))
    assert main(["--baseline", str(tmp_path / "b.json"), "--results", str(tmp_path / "n.json")]) == 1
    out = capsys.readouterr().out
    assert "DROP" in out and "mcnemar" in out and "Holm" in out and "FAIL" in out


@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_noise_sized_change_of_a_small_task_passes_and_is_reported(scale, tmp_path, capsys):
    base, new = grid_of(BIG, SMALL, BIG, SMALL, scale)
    new["cells"][2] = cell("copa", "small", flip(SMALL, worse=2, better=1) * scale)  # -4.2 points on 24 docs
    report = compare(base, new)
    assert report.ok
    [changed] = report.of("changed")
    assert changed.key == ("copa", "small", "score,none") and changed.changed == 3
    assert changed.delta == pytest.approx(-scale / 24) and changed.p > 0.05
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "n.json").write_text(json.dumps(new))
    assert main(["--baseline", str(tmp_path / "b.json"), "--results", str(tmp_path / "n.json")]) == 0
    out = capsys.readouterr().out
    assert "CHANGED" in out and "PASS" in out


def test_changed_answers_with_equal_scores_are_reported():
    base, new = grid_of(BIG, SMALL, BIG, SMALL)
    c = new["cells"][0]
    c["samples"]["answer"] = ["other"] + c["samples"]["answer"][1:]
    report = compare(base, new)
    assert report.ok and [r.changed for r in report.of("changed")] == [1]


def test_correction_and_min_effect():
    worse = flip(SMALL, worse=6, better=0)  # p = 1/64 per cell; Holm over 4 cells: 1/16
    base, new = grid_of(BIG, SMALL, BIG, SMALL)
    new["cells"][2] = cell("copa", "small", worse)
    assert compare(base, new).ok
    assert not compare(base, new, correction="none").ok
    assert compare(base, new, correction="none", alpha=0.01).ok
    assert compare(base, new, correction="none", min_effect=0.3).ok  # the drop is 0.25
    assert not compare(base, new, correction="none", min_effect={"big": 0.5, "*": 0.1}).ok


def test_improvement_is_not_a_failure():
    base, new = grid_of(BIG, SMALL, BIG, SMALL)
    new["cells"][0] = cell("copa", "big", flip(BIG, better=40))
    report = compare(base, new)
    assert report.ok and [r.key[0] for r in report.of("improved")] == ["copa"]


def test_continuous_scores_use_the_paired_bootstrap():
    rng = np.random.default_rng(5)
    b = rng.uniform(0, 100, 200)
    spec = {"base": "b", "methods": ["m"], "tasks": ["rouge"]}
    base = results([cell("m", "rouge", b)], spec)
    drop = results([cell("m", "rouge", np.clip(b - rng.uniform(0, 10, 200), 0, 100))], spec)
    noise = results([cell("m", "rouge", b + rng.normal(0, 3, 200))], spec)
    [r] = compare(base, drop).rows
    assert r.status == "drop" and r.test == "bootstrap"
    [r] = compare(base, noise).rows
    assert r.status == "changed" and r.test == "bootstrap" and r.ci[0] < 0 < r.ci[1]


def test_lower_is_better_drop():
    spec = {"base": "b", "methods": ["m"], "tasks": ["wer"]}
    b = binary(100, 30)
    base = results([cell("m", "wer", b, hib=False)], spec)
    new = results([cell("m", "wer", flip(b, better=30), hib=False)], spec)  # 30 more errors
    [r] = compare(base, new).rows
    assert r.status == "drop" and r.delta == pytest.approx(-0.3)


def test_cells_without_samples_or_other_docs_are_untested():
    base, new = grid_of(BIG, SMALL, BIG, SMALL)
    del new["cells"][0]["samples"]
    new["cells"][1]["samples"]["doc_id"] = [i + 1000 for i in range(200)]
    report = compare(base, new)
    assert not report.ok
    notes = {r.key[0]: r.note for r in report.of("untested")}
    assert "no per-sample scores in the results" in notes["copa"] and "different docs" in notes["ta"]
    relaxed = compare(base, new, tolerance=1.0)
    assert relaxed.ok and {r.test for r in relaxed.rows if r.key[1] == "big"} == {"value"}


def test_schema_1_baseline_needs_a_tolerance(tmp_path, capsys):
    base, new = grid_of(BIG, SMALL, BIG, SMALL)
    old = {
        "schema_version": 1,
        "grid": base["grid"],
        "cells": [
            {k: v for k, v in c.items() if k in ("method", "label", "task", "metric", "value")}
            for c in base["cells"]
        ],
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "n.json").write_text(json.dumps(new))
    args = ["--baseline", str(tmp_path / "old.json"), "--results", str(tmp_path / "n.json")]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "UNTESTED" in captured.out and "schema_version 1" in captured.err
    assert main(args + ["--tolerance", "0"]) == 0


@pytest.mark.parametrize(
    "samples, message",
    [
        ({"doc_id": [0, 1], "score": [1.0]}, "differ in length"),
        ({"doc_id": [0, 0], "score": [1.0, 0.0]}, "repeated doc_id"),
        ({"doc_id": [0], "score": ["x"]}, "must be a number"),
        ({"score": [1.0]}, "lists 'doc_id' and 'score'"),
    ],
)
def test_malformed_samples_are_errors(samples, message):
    from harness_merge.leaderboard.regress import RegressError

    data = results([{**cell("copa", "big", [1.0]), "samples": samples}])
    with pytest.raises(RegressError, match=message):
        parse_results(data)


def test_bad_options_are_errors():
    from harness_merge.leaderboard.regress import RegressError

    base, new = grid_of(BIG, SMALL, BIG, SMALL)
    with pytest.raises(RegressError, match="alpha must be in"):
        compare(base, new, alpha=1.5)
    with pytest.raises(RegressError, match="correction must be one of holm, none"):
        compare(base, new, correction="bonferroni")
