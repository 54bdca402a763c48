"""Regression gate: compare a leaderboard run with a stored baseline, fail on significant drops.

::

    harness-merge regress --baseline old.json --results new.json \\
        [--alpha 0.05] [--correction holm|none] [--min-effect X] [--min-effect-for TASK=X ...]
        [--tolerance X [--relative]] [--show-all]

The gate is paired: both runs scored the same docs, so each cell is compared doc
by doc on its per-sample scores (``cells[].samples``):

- two-valued scores (exact match 0/1 or 0/100, accuracy): the **exact McNemar
  test** (the exact sign test on the docs whose score changed);
- other scores: a **paired bootstrap** of the mean difference (2000 resamples,
  seed 0: the same files give the same report).

A cell **drops** (fails the gate) when its drop is significant at ``--alpha``
*and* larger than ``--min-effect`` (metric units, default 0). ``--alpha`` is
for the whole file by default: the cells' one-sided p values are adjusted by
Holm's step-down method (family-wise error rate), so a large grid does not
fail on chance; ``--correction none`` tests each cell at ``alpha`` on its own.
The report shows per cell the delta, its 95% bootstrap CI, the adjusted p and
how many docs changed answer. The tests do not depend on the scale: 0-1 and
0-100 metrics give the same p values.

A cell whose per-sample answers changed but whose difference is not
significant is reported as **changed** (greedy decoding is deterministic, so
a changed answer is a code or platform change worth a look), not a failure.

Cells without per-sample scores on both sides (a ``schema_version`` 1 file, a
group, a metric that is not per-sample) cannot be tested: they are
**untested** and fail the gate, unless ``--tolerance`` is given, which compares
their values only (absolute metric units, or percent of the baseline with
``--relative``). A baseline cell absent from the results, or with a null value
there, is **missing** (fails); a results cell absent from the baseline is
**new** (reported, not a failure).

Exit status: 0 when nothing dropped and nothing is missing or untested; 1
otherwise; 2 when the files cannot be compared (not a results file, results
of a different grid, an unsupported schema version), with the reason.

Results file (``results.json``, written by the leaderboard runner)
------------------------------------------------------------------
JSON, one object. ``schema_version`` 2 (version 1 files, which have no
``stderr``/``n``/``samples``, are still read)::

    {
      "schema_version": 2,
      "grid": {                                # what was evaluated
        "grid_id": "3f9c0a1d2b4e5f60",         # required: stable hash of the grid spec
        "methods": [{"label": "copa", "method": "copa", "params": {...}, "kind": "merge"}, ...],
        "tasks": ["mb_colour", ...],           # optional: declared tasks (else those in the cells)
        ...                                    # base, adapters, limit, model_args ...
      },
      "cells": [                               # one per (row label, task, metric)
        {
          "method": "copa",                    # required: method name
          "label": "copa",                     # optional: row label, default = method
          "params": {"prune_rate": 0.8},       # optional
          "task": "mb_colour",                 # required: lmms-eval task (or group)
          "metric": "score,none",              # required: metric key as lmms-eval reports it
          "value": 87.3,                       # required: number, or null when the cell failed
          "stderr": 2.1,                       # v2: standard error of value (lmms-eval's, else std/sqrt(n))
          "n": 200,                            # v2: docs scored
          "higher_is_better": true,            # optional, default true
          "samples": {                         # v2: per-sample scores, the gate's evidence
            "doc_id": [0, 1, ...],             #   lmms-eval doc ids
            "score": [100.0, 0.0, ...],        #   the metric per doc (from lmms-eval --log_samples)
            "answer": ["3f2a9c1b", ...],       #   answer_hash() of each filtered response (as in the samples file)
            "file": "rows/copa/samples_mb_colour.jsonl"  # lmms-eval's own samples file, relative to results.json
          },
          "lmms_results": "rows/copa/results.json",  # v2: the row's results in lmms-eval's format
          "card": "rows/copa/README.md",       # v2: model card of the row (merged rows)
          "manifest": {...}                    # provenance: merge manifest, versions, timing
        }
      ]
    }

``grid_id`` identifies *what* is evaluated: base model, adapters, methods with
their parameters, tasks and limits - never when or with which code version (that
belongs in each cell's ``manifest``), or no two runs could be compared.
:func:`grid_id` computes it from a grid spec as the runner does. Two files are
comparable when their ``grid_id`` is equal and their sets of method labels and
of tasks are equal. Cells are matched by (label, task, metric).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MergeError
from . import stats

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_ALPHA = 0.05
CORRECTIONS = ("holm", "none")
N_BOOT = 2000

Key = tuple[str, str, str]  # (method label, task, metric)


class RegressError(MergeError):
    """A results file cannot be read or does not follow the schema."""


class GridMismatchError(RegressError):
    """The two results files come from different grids and cannot be compared."""


def grid_id(spec: Mapping[str, Any]) -> str:
    """Stable id of a grid spec: first 16 hex digits of SHA-256 of its canonical JSON.

    Any ``grid_id`` key already in ``spec`` is ignored, so ``grid_id(grid) ==
    grid["grid_id"]`` holds for a grid built with ``{**spec, "grid_id": grid_id(spec)}``.
    """
    body = {k: v for k, v in spec.items() if k != "grid_id"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def answer_hash(response: Any) -> str:
    """sha256[:8] of a filtered response as JSON (what ``samples.answer`` holds)."""
    text = response if isinstance(response, str) else json.dumps(response, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Samples:
    """Per-sample scores of one cell, by doc id."""

    score: dict  # doc_id -> float
    answer: dict  # doc_id -> str (hash) or None


@dataclass(frozen=True)
class Cell:
    label: str
    method: str
    task: str
    metric: str
    value: float | None  # None: failed / not a number
    higher_is_better: bool = True
    stderr: float | None = None
    n: int | None = None
    samples: Samples | None = None

    @property
    def key(self) -> Key:
        return (self.label, self.task, self.metric)


@dataclass(frozen=True)
class ResultsFile:
    name: str
    grid: dict
    cells: dict[Key, Cell]
    version: int = SCHEMA_VERSION

    @property
    def grid_id(self) -> str:
        return str(self.grid["grid_id"])

    @property
    def labels(self) -> set[str]:
        declared = self.grid.get("methods")
        if isinstance(declared, list) and declared:
            return {m if isinstance(m, str) else str(m.get("label") or m.get("method")) for m in declared}
        return {k[0] for k in self.cells}

    @property
    def tasks(self) -> set[str]:
        declared = self.grid.get("tasks")
        if isinstance(declared, list) and declared:
            return {str(t) for t in declared}
        return {k[1] for k in self.cells}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(type(value).__name__)


def _samples(raw: Any, where: str) -> Samples | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("doc_id"), list)
        or not isinstance(raw.get("score"), list)
    ):
        raise RegressError(f"{where}.samples must be an object with lists 'doc_id' and 'score'")
    ids, scores = raw["doc_id"], raw["score"]
    answers = raw.get("answer") or [None] * len(ids)
    if not (len(ids) == len(scores) == len(answers)):
        raise RegressError(
            f"{where}.samples: doc_id, score and answer differ in length "
            f"({len(ids)}, {len(scores)}, {len(answers)})"
        )
    if len(set(map(str, ids))) != len(ids):
        raise RegressError(f"{where}.samples: repeated doc_id")
    out = {}
    for i, s in zip(ids, scores):
        try:
            v = _number(s)
        except TypeError as e:
            raise RegressError(f"{where}.samples.score of doc {i} must be a number, got {e}") from None
        if v is None:
            raise RegressError(f"{where}.samples.score of doc {i} is null or not finite")
        out[str(i)] = v
    return Samples(score=out, answer={str(i): a for i, a in zip(ids, answers)})


def parse_results(data: Any, name: str = "results") -> ResultsFile:
    """Validate a decoded results file; raises :class:`RegressError` naming what is wrong."""
    where = f"{name}:"
    if not isinstance(data, dict):
        raise RegressError(
            f"{where} expected a JSON object with 'grid' and 'cells', got {type(data).__name__}"
        )
    version = data.get("schema_version", 1)
    if version not in READABLE_VERSIONS:
        raise RegressError(
            f"{where} schema_version {version!r} is not supported (this gate reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade harness-merge to read newer files)"
        )
    grid, cells = data.get("grid"), data.get("cells")
    if not isinstance(grid, dict) or not grid.get("grid_id"):
        raise RegressError(f"{where} 'grid' must be an object with a non-empty 'grid_id'")
    if not isinstance(cells, list):
        raise RegressError(f"{where} 'cells' must be a list")
    out: dict[Key, Cell] = {}
    for i, c in enumerate(cells):
        if not isinstance(c, dict):
            raise RegressError(f"{where} cells[{i}] is not an object")
        missing = [k for k in ("method", "task", "metric", "value") if k not in c]
        if missing:
            raise RegressError(f"{where} cells[{i}] lacks {', '.join(missing)}")
        try:
            value = _number(c["value"])
        except TypeError as e:
            raise RegressError(f"{where} cells[{i}].value must be a number or null, got {e}") from None
        try:
            stderr = _number(c.get("stderr"))
        except TypeError as e:
            raise RegressError(f"{where} cells[{i}].stderr must be a number or null, got {e}") from None
        n = c.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise RegressError(f"{where} cells[{i}].n must be a count >= 0, got {n!r}")
        cell = Cell(
            label=str(c.get("label") or c["method"]),
            method=str(c["method"]),
            task=str(c["task"]),
            metric=str(c["metric"]),
            value=value,
            higher_is_better=bool(c.get("higher_is_better", True)),
            stderr=stderr,
            n=n,
            samples=_samples(c.get("samples"), f"{where} cells[{i}]") if value is not None else None,
        )
        if cell.key in out:
            raise RegressError(
                f"{where} two cells for (method {cell.label!r}, task {cell.task!r}, metric {cell.metric!r})"
            )
        out[cell.key] = cell
    return ResultsFile(name=name, grid=grid, cells=out, version=int(version))


def load_results(path: str | Path) -> ResultsFile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegressError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegressError(f"{path}: not a readable JSON file ({e})") from None
    return parse_results(data, name=str(path))


# --------------------------------------------------------------------------- comparing

STATUSES = ("drop", "missing", "untested", "new", "improved", "changed", "within")
FAILING = ("drop", "missing", "untested")


@dataclass(frozen=True)
class Row:
    status: str  # one of STATUSES
    key: Key
    baseline: float | None
    value: float | None
    delta: float | None  # signed, positive = better (already flipped for lower-is-better metrics)
    tolerance: float | None = None  # value-only comparison: absolute tolerance used
    ci: tuple[float, float] | None = None  # 95% CI of delta (paired bootstrap)
    p: float | None = None  # adjusted one-sided p of the drop (of the gain for "improved")
    test: str | None = None  # "mcnemar" | "bootstrap" | "none" | "value"
    n: int | None = None
    changed: int | None = None  # docs whose answer (or score) differs
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA
    correction: str = "holm"
    min_effect: float | Mapping[str, float] = 0.0
    relative: bool = False

    def of(self, status: str) -> list[Row]:
        return [r for r in self.rows if r.status == status]

    @property
    def drops(self) -> list[Row]:
        return self.of("drop")

    @property
    def missing(self) -> list[Row]:
        return self.of("missing")

    @property
    def ok(self) -> bool:
        return not any(self.of(s) for s in FAILING)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def format(self, show_all: bool = False) -> str:
        """A readable table: failing cells, new, improvements, changed answers (and
        unchanged cells with ``show_all``), then a summary line."""
        order = ["drop", "missing", "untested", "new", "improved", "changed"] + (
            ["within"] if show_all else []
        )
        shown = [r for s in order for r in self.of(s)]
        header = (
            "status",
            "method",
            "task",
            "metric",
            "baseline",
            "new",
            "delta",
            "95% CI",
            "p",
            "n",
            "changed",
            "test",
        )
        lines = [header] + [
            (
                r.status.upper(),
                *r.key,
                _fmt(r.baseline),
                _fmt(r.value),
                _fmt(r.delta, signed=True),
                "-" if r.ci is None else f"[{r.ci[0]:+.2f}, {r.ci[1]:+.2f}]",
                _fmt_p(r.p),
                "-" if r.n is None else str(r.n),
                "-" if r.changed is None else str(r.changed),
                (r.test or "-") + (f" ({r.note})" if r.note else ""),
            )
            for r in shown
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        right = {4, 5, 6, 7, 8, 9, 10}
        text = [
            "  ".join(
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths))
            ).rstrip()
            for line in lines
        ]
        if len(lines) > 1:
            text.insert(1, "  ".join("-" * w for w in widths))
        else:
            text = []
        c = {s: len(self.of(s)) for s in STATUSES}
        how = (
            "Holm-adjusted over the cells (family-wise)"
            if self.correction == "holm"
            else "per cell, not corrected for the number of cells"
        )
        summary = (
            f"{'PASS' if self.ok else 'FAIL'}: {c['drop']} significant drop(s), {c['missing']} missing, "
            f"{c['untested']} untested, {c['new']} new, {c['improved']} improved, {c['changed']} with changed answers "
            f"(not significant), {c['within']} unchanged. alpha={self.alpha:g}, {how}; one-sided p; "
            f"min effect {self.min_effect if not isinstance(self.min_effect, Mapping) else dict(self.min_effect)}; "
            f"delta > 0 is better"
        )
        return "\n".join(text + ([""] if text else []) + [summary])


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def _per_task(task: str, value: float | Mapping[str, float] | None, what: str, default: float | None):
    if isinstance(value, Mapping):
        value = value.get(task, value.get("*", default))
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise RegressError(f"{what} for {task!r} must be a finite number >= 0, got {value}")
    return value


def check_same_grid(baseline: ResultsFile, results: ResultsFile) -> None:
    """Raise :class:`GridMismatchError` with the reason when the two files are not the same grid."""
    reasons = []
    if baseline.grid_id != results.grid_id:
        reasons.append(f"grid_id differs (baseline {baseline.grid_id}, results {results.grid_id})")
    for what, a, b in (
        ("methods", baseline.labels, results.labels),
        ("tasks", baseline.tasks, results.tasks),
    ):
        if a != b:
            parts = []
            if a - b:
                parts.append(f"only in baseline: {', '.join(sorted(a - b))}")
            if b - a:
                parts.append(f"only in results: {', '.join(sorted(b - a))}")
            reasons.append(f"{what} differ ({'; '.join(parts)})")
    if reasons:
        raise GridMismatchError(
            f"{results.name} is not a run of the grid in {baseline.name}: "
            + "; ".join(reasons)
            + ". Compare runs of the same grid, or store a new baseline for this grid."
        )


def _paired(b: Cell, n: Cell, n_boot: int, seed: int):
    """(PairedTest, changed) or (None, reason) when the cell cannot be paired."""
    if b.samples is None or n.samples is None:
        side = "baseline" if b.samples is None else "results"
        return None, f"no per-sample scores in the {side}"
    if set(b.samples.score) != set(n.samples.score):
        return None, (
            f"the runs scored different docs ({len(b.samples.score)} vs {len(n.samples.score)}, "
            f"{len(set(b.samples.score) ^ set(n.samples.score))} not in both)"
        )
    ids = sorted(b.samples.score, key=lambda s: (len(s), s))
    bs = [b.samples.score[i] for i in ids]
    ns = [n.samples.score[i] for i in ids]
    t = stats.paired_test(bs, ns, higher_is_better=b.higher_is_better, n_boot=n_boot, seed=seed)
    changed = sum(
        1
        for i in ids
        if b.samples.score[i] != n.samples.score[i]
        or (
            b.samples.answer[i] is not None
            and n.samples.answer[i] is not None
            and b.samples.answer[i] != n.samples.answer[i]
        )
    )
    return t, changed


def compare(
    baseline: Mapping[str, Any] | ResultsFile,
    results: Mapping[str, Any] | ResultsFile,
    tolerance: float | Mapping[str, float] | None = None,
    *,
    relative: bool = False,
    alpha: float = DEFAULT_ALPHA,
    correction: str = "holm",
    min_effect: float | Mapping[str, float] = 0.0,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Report:
    """Compare two leaderboard results (decoded JSON or :class:`ResultsFile`) cell by cell.

    Args:
        baseline: the stored results.
        results: the new run.
        tolerance: only for cells without per-sample scores on both sides: allowed
            worsening of the value, one number or ``{task: tol}`` with an optional
            ``"*"`` default. ``None`` (default): such cells are *untested* (fail).
        relative: read tolerances as percent of the baseline value.
        alpha: significance level of a drop.
        correction: ``"holm"`` (alpha for all tested cells together) or ``"none"``
            (alpha per cell).
        min_effect: a significant drop fails only when it is larger than this
            (metric units; one number or ``{task: x}`` with ``"*"``).
        n_boot, seed: the paired bootstrap's resamples and seed.

    Returns:
        A :class:`Report`; ``report.ok`` is False on a significant drop, a
        missing cell or an untested cell.

    Raises:
        RegressError: a file does not follow the schema, or a bad option.
        GridMismatchError: the files are runs of different grids.
    """
    if not 0 < alpha < 1:
        raise RegressError(f"alpha must be in (0, 1), got {alpha}")
    if correction not in CORRECTIONS:
        raise RegressError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    if n_boot < 100:
        raise RegressError(f"n_boot must be >= 100, got {n_boot}")
    base = baseline if isinstance(baseline, ResultsFile) else parse_results(baseline, "baseline")
    new = results if isinstance(results, ResultsFile) else parse_results(results, "results")
    check_same_grid(base, new)

    report = Report(alpha=alpha, correction=correction, min_effect=min_effect, relative=relative)
    tested: list[tuple[Key, Cell, Cell, stats.PairedTest, int]] = []
    fixed: dict[Key, Row] = {}
    for key in sorted(base.cells.keys() | new.cells.keys()):
        b, n = base.cells.get(key), new.cells.get(key)
        if b is None or b.value is None:  # nothing to hold the run to
            fixed[key] = Row("new", key, None, None if n is None else n.value, None)
            continue
        if n is None or n.value is None:
            fixed[key] = Row("missing", key, b.value, None, None)
            continue
        delta = (n.value - b.value) if b.higher_is_better else (b.value - n.value)
        t, extra = _paired(b, n, n_boot, seed)
        if t is not None:
            tested.append((key, b, n, t, extra))
            continue
        tol = _per_task(key[1], tolerance, "tolerance", None)
        if tol is None:
            fixed[key] = Row(
                "untested",
                key,
                b.value,
                n.value,
                delta,
                n=n.n,
                note=f"{extra}; pass --tolerance to compare values",
            )
            continue
        tol_abs = tol / 100.0 * abs(b.value) if relative else tol
        eps = 1e-9 * max(1.0, abs(b.value))  # float noise is never a drop
        status = "drop" if delta < -(tol_abs + eps) else "improved" if delta > tol_abs + eps else "within"
        fixed[key] = Row(
            status, key, b.value, n.value, delta, tolerance=tol_abs, test="value", n=n.n, note=extra
        )

    p_drop = [t.p_drop for *_, t, _ in tested]
    p_gain = [t.p_gain for *_, t, _ in tested]
    if correction == "holm":
        p_drop, p_gain = stats.holm(p_drop), stats.holm(p_gain)
    for (key, b, n, t, changed), pd, pg in zip(tested, p_drop, p_gain):
        eff = _per_task(key[1], min_effect, "min_effect", 0.0) or 0.0
        delta = (n.value - b.value) if b.higher_is_better else (b.value - n.value)
        if pd < alpha and delta < -eff:
            status, p = "drop", pd
        elif pg < alpha and delta > eff:
            status, p = "improved", pg
        else:
            status, p = ("changed" if changed else "within"), pd
        fixed[key] = Row(
            status,
            key,
            b.value,
            n.value,
            delta,
            ci=(t.ci_low, t.ci_high),
            p=p,
            test=t.test,
            n=t.n,
            changed=changed,
        )
    report.rows = [fixed[k] for k in sorted(fixed)]
    return report


# --------------------------------------------------------------------------- CLI


def _task_value(text: str) -> tuple[str, float]:
    task, sep, value = text.rpartition("=")
    if not sep or not task:
        raise argparse.ArgumentTypeError(f"expected TASK=X, got {text!r}")
    try:
        return task, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value in {text!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness-merge regress",
        description="Compare leaderboard results with a baseline doc by doc (exact McNemar for 0/1 scores, "
        "paired bootstrap otherwise); exit 1 on a significant drop, a missing or an untested cell, "
        "2 when the files cannot be compared.",
    )
    p.add_argument("--baseline", required=True, help="stored results JSON")
    p.add_argument("--results", required=True, help="new results JSON")
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"significance level of a drop (default {DEFAULT_ALPHA})",
    )
    p.add_argument(
        "--correction",
        choices=CORRECTIONS,
        default="holm",
        help="holm (default): alpha holds for all cells together (Holm step-down); none: alpha per cell",
    )
    p.add_argument(
        "--min-effect",
        type=float,
        default=0.0,
        help="a significant drop fails only when larger than this, in metric units (default 0)",
    )
    p.add_argument(
        "--min-effect-for",
        type=_task_value,
        action="append",
        default=[],
        metavar="TASK=X",
        help="minimum effect for one task (repeatable)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="compare cells WITHOUT per-sample scores (schema 1 files, groups) by value: allowed drop "
        "in metric units, or percent with --relative (default: such cells fail as untested)",
    )
    p.add_argument(
        "--tolerance-for",
        type=_task_value,
        action="append",
        default=[],
        metavar="TASK=X",
        help="tolerance for one task (repeatable)",
    )
    p.add_argument("--relative", action="store_true", help="tolerances are percent of the baseline value")
    p.add_argument(
        "--n-boot", type=int, default=N_BOOT, help=f"paired bootstrap resamples (default {N_BOOT})"
    )
    p.add_argument("--show-all", action="store_true", help="also list unchanged cells")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tolerance: dict[str, float] | None = None
    if args.tolerance is not None or args.tolerance_for:
        tolerance = dict(args.tolerance_for)
        if args.tolerance is not None:
            tolerance["*"] = args.tolerance
    min_effect = {"*": args.min_effect, **dict(args.min_effect_for)}
    try:
        baseline, results = load_results(args.baseline), load_results(args.results)
        report = compare(
            baseline,
            results,
            tolerance,
            relative=args.relative,
            alpha=args.alpha,
            correction=args.correction,
            min_effect=min_effect,
            n_boot=args.n_boot,
        )
    except GridMismatchError as e:
        print(f"harness-merge regress: refused: {e}", file=sys.stderr)
        return 2
    except RegressError as e:
        print(f"harness-merge regress: error: {e}", file=sys.stderr)
        return 2
    print(f"baseline {args.baseline} vs results {args.results} (grid {baseline.grid_id})")
    for f in (baseline, results):
        if f.version < SCHEMA_VERSION:
            print(
                f"note: {f.name} is a schema_version {f.version} file (no per-sample scores): its cells are "
                f"compared by value with --tolerance, or reported untested",
                file=sys.stderr,
            )
    print(report.format(show_all=args.show_all))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
