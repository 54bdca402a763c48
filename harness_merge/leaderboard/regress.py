"""Regression gate: compare a leaderboard run with a stored baseline, fail on drops.

::

    harness-merge regress --baseline old.json --results new.json \\
        [--tolerance 1.0] [--tolerance-for TASK=X ...] [--relative] [--show-all]

Exit status: 0 when no cell dropped beyond its tolerance and no baseline cell is
missing; 1 on any such drop or missing cell; 2 when the files cannot be compared
(not a results file, or results of a different grid), with the reason.

Results file (written by the leaderboard runner, read here)
-----------------------------------------------------------
JSON, one object::

    {
      "schema_version": 1,                     # optional; this module reads version 1
      "grid": {                                # what was evaluated
        "grid_id": "3f9c0a1d2b4e5f60",         # required: stable hash of the grid spec
        "methods": [                           # optional: the declared method labels
          {"label": "copa", "method": "copa", "params": {"prune_rate": 0.8}},
          {"label": "ta", "method": "ta", "params": {"scale": 1.0}}
        ],                                     #   (a list of labels as strings also works)
        "tasks": ["pope_local", "mme_local"],  # optional: the declared task names
        ...                                    # anything else (base model, adapters, limit)
      },
      "cells": [                               # one per (method label, task, metric)
        {
          "method": "copa",                    # required: method name
          "label": "copa",                     # optional: label in the grid, default = method
          "params": {"prune_rate": 0.8},       # optional: the method's parameters
          "task": "pope_local",                # required: lmms-eval / lm-eval task or group
          "metric": "score,none",              # required: metric key as the harness reports it
          "value": 87.3,                       # required: number, or null when the cell failed
          "higher_is_better": true,            # optional, default true
          "manifest": {...}                    # optional: provenance (model, code version, time)
        }
      ]
    }

``grid_id`` identifies *what* is evaluated: base model, adapters, methods with
their parameters, tasks and limits - never when or with which code version (that
belongs in each cell's ``manifest``), or no two runs could be compared.
:func:`grid_id` computes it from a grid spec as the runner should.

Two files are comparable when their ``grid_id`` is equal and their sets of
method labels and of tasks are equal (the declared ``grid.methods`` /
``grid.tasks`` when present, else those found in the cells). Cells are matched by
(label, task, metric).

Tolerance is in the metric's own units (points, for the 0-100 ``score`` of our
task configs) or, with ``relative``, in percent of the baseline value. A cell
*drops* when it is worse than the baseline by more than its tolerance, *improves*
when better by more than it, and is *within* otherwise. A baseline cell absent
from the results, or with a null/NaN value there, is *missing*; a results cell
absent from the baseline is *new* (reported, not a failure).
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

SCHEMA_VERSION = 1
DEFAULT_TOLERANCE = 1.0

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


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Cell:
    label: str
    method: str
    task: str
    metric: str
    value: float | None  # None: failed / not a number
    higher_is_better: bool = True

    @property
    def key(self) -> Key:
        return (self.label, self.task, self.metric)


@dataclass(frozen=True)
class ResultsFile:
    name: str
    grid: dict
    cells: dict[Key, Cell]

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


def parse_results(data: Any, name: str = "results") -> ResultsFile:
    """Validate a decoded results file; raises :class:`RegressError` naming what is wrong."""
    where = f"{name}:"
    if not isinstance(data, dict):
        raise RegressError(f"{where} expected a JSON object with 'grid' and 'cells', got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RegressError(f"{where} schema_version {version!r} is not supported (this gate reads {SCHEMA_VERSION})")
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
        cell = Cell(
            label=str(c.get("label") or c["method"]),
            method=str(c["method"]),
            task=str(c["task"]),
            metric=str(c["metric"]),
            value=value,
            higher_is_better=bool(c.get("higher_is_better", True)),
        )
        if cell.key in out:
            raise RegressError(f"{where} two cells for (method {cell.label!r}, task {cell.task!r}, metric {cell.metric!r})")
        out[cell.key] = cell
    return ResultsFile(name=name, grid=grid, cells=out)


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


@dataclass(frozen=True)
class Row:
    status: str  # "drop" | "missing" | "new" | "improved" | "within"
    key: Key
    baseline: float | None
    value: float | None
    delta: float | None  # signed, positive = better (already flipped for lower-is-better metrics)
    tolerance: float | None  # absolute, in the metric's units


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
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
        return not self.drops and not self.missing

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def format(self, show_all: bool = False) -> str:
        """A readable table: drops, missing, new, improvements (and within-tolerance rows with ``show_all``)."""
        order = ["drop", "missing", "new", "improved"] + (["within"] if show_all else [])
        shown = [r for s in order for r in self.of(s)]
        header = ("status", "method", "task", "metric", "baseline", "new", "delta", "tol")
        lines = [header] + [
            (r.status.upper(), *r.key, _fmt(r.baseline), _fmt(r.value), _fmt(r.delta, signed=True), _fmt(r.tolerance))
            for r in shown
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        right = {4, 5, 6, 7}
        text = [
            "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines
        ]
        if len(lines) > 1:
            text.insert(1, "  ".join("-" * w for w in widths))
        else:
            text = []
        counts = {s: len(self.of(s)) for s in ("drop", "missing", "new", "improved", "within")}
        unit = "% of baseline" if self.relative else "absolute"
        summary = (
            f"{'PASS' if self.ok else 'FAIL'}: {counts['drop']} dropped beyond tolerance, {counts['missing']} missing, "
            f"{counts['new']} new, {counts['improved']} improved, {counts['within']} within tolerance "
            f"(tolerance {unit}; delta > 0 is better)"
        )
        return "\n".join(text + ([""] if text else []) + [summary])


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _tolerance_for(task: str, tolerance: float | Mapping[str, float]) -> float:
    if isinstance(tolerance, Mapping):
        tol = tolerance.get(task, tolerance.get("*", DEFAULT_TOLERANCE))
    else:
        tol = tolerance
    tol = float(tol)
    if not math.isfinite(tol) or tol < 0:
        raise RegressError(f"tolerance for {task!r} must be a finite number >= 0, got {tol}")
    return tol


def check_same_grid(baseline: ResultsFile, results: ResultsFile) -> None:
    """Raise :class:`GridMismatchError` with the reason when the two files are not the same grid."""
    reasons = []
    if baseline.grid_id != results.grid_id:
        reasons.append(f"grid_id differs (baseline {baseline.grid_id}, results {results.grid_id})")
    for what, a, b in (("methods", baseline.labels, results.labels), ("tasks", baseline.tasks, results.tasks)):
        if a != b:
            parts = []
            if a - b:
                parts.append(f"only in baseline: {', '.join(sorted(a - b))}")
            if b - a:
                parts.append(f"only in results: {', '.join(sorted(b - a))}")
            reasons.append(f"{what} differ ({'; '.join(parts)})")
    if reasons:
        raise GridMismatchError(
            f"{results.name} is not a run of the grid in {baseline.name}: " + "; ".join(reasons)
            + ". Compare runs of the same grid, or store a new baseline for this grid."
        )


def compare(
    baseline: Mapping[str, Any] | ResultsFile,
    results: Mapping[str, Any] | ResultsFile,
    tolerance: float | Mapping[str, float] = DEFAULT_TOLERANCE,
    *,
    relative: bool = False,
) -> Report:
    """Compare two leaderboard results (decoded JSON or :class:`ResultsFile`) cell by cell.

    Args:
        baseline: the stored results.
        results: the new run.
        tolerance: allowed worsening per cell; one number, or ``{task: tol}`` with an
            optional ``"*"`` default (else ``DEFAULT_TOLERANCE``).
        relative: read tolerances as percent of the baseline value instead of
            absolute metric units.

    Returns:
        A :class:`Report`; ``report.ok`` is False on a drop beyond tolerance or a
        missing cell.

    Raises:
        RegressError: a file does not follow the schema.
        GridMismatchError: the files are runs of different grids.
    """
    base = baseline if isinstance(baseline, ResultsFile) else parse_results(baseline, "baseline")
    new = results if isinstance(results, ResultsFile) else parse_results(results, "results")
    check_same_grid(base, new)

    report = Report(relative=relative)
    for key in sorted(base.cells.keys() | new.cells.keys()):
        b, n = base.cells.get(key), new.cells.get(key)
        if b is None:
            report.rows.append(Row("new", key, None, n.value, None, None))
            continue
        if n is None or n.value is None:
            report.rows.append(Row("missing", key, b.value, None, None, None))
            continue
        if b.value is None:  # the baseline itself has no number: nothing to hold the run to
            report.rows.append(Row("new", key, None, n.value, None, None))
            continue
        tol = _tolerance_for(key[1], tolerance)
        tol_abs = tol / 100.0 * abs(b.value) if relative else tol
        delta = (n.value - b.value) if b.higher_is_better else (b.value - n.value)
        eps = 1e-9 * max(1.0, abs(b.value))  # float noise is never a drop
        status = "drop" if delta < -(tol_abs + eps) else "improved" if delta > tol_abs + eps else "within"
        report.rows.append(Row(status, key, b.value, n.value, delta, tol_abs))
    return report


# --------------------------------------------------------------------------- CLI


def _task_tolerance(text: str) -> tuple[str, float]:
    task, sep, value = text.rpartition("=")
    if not sep or not task:
        raise argparse.ArgumentTypeError(f"expected TASK=X, got {text!r}")
    try:
        return task, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tolerance in {text!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness-merge regress",
        description="Compare leaderboard results with a baseline; exit 1 on a drop beyond tolerance "
        "or a missing cell, 2 when the files cannot be compared.",
    )
    p.add_argument("--baseline", required=True, help="stored results JSON")
    p.add_argument("--results", required=True, help="new results JSON")
    p.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE,
        help=f"allowed drop per cell, in metric units (default {DEFAULT_TOLERANCE}) or percent with --relative",
    )
    p.add_argument(
        "--tolerance-for", type=_task_tolerance, action="append", default=[], metavar="TASK=X",
        help="tolerance for one task (repeatable)",
    )
    p.add_argument("--relative", action="store_true", help="tolerances are percent of the baseline value")
    p.add_argument("--show-all", action="store_true", help="also list cells within tolerance")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tolerance: dict[str, float] = {"*": args.tolerance, **dict(args.tolerance_for)}
    try:
        baseline, results = load_results(args.baseline), load_results(args.results)
        report = compare(baseline, results, tolerance, relative=args.relative)
    except GridMismatchError as e:
        print(f"harness-merge regress: refused: {e}", file=sys.stderr)
        return 2
    except RegressError as e:
        print(f"harness-merge regress: error: {e}", file=sys.stderr)
        return 2
    print(f"baseline {args.baseline} vs results {args.results} (grid {baseline.grid_id})")
    print(report.format(show_all=args.show_all))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
