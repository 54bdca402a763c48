"""``harness-merge demo``: the whole job on a tiny offline example, one command.

1. build a tiny Qwen2-VL from a config and pre-train it briefly (captions);
2. train one LoRA adapter per synthetic task (colour, shape, count);
3. merge the adapters with ``copa`` through :func:`harness_merge.api.merge`;
4. evaluate every row of the table with the real lmms-eval CLI on model
   ``merged`` (one path for all rows, so the table cannot disagree with
   itself): the base (``method=none``), each adapter alone (``method=ta`` on
   that one adapter, ``scaling=1``: the adapter itself) and the merge (a cache
   hit of step 3), on the demo tasks and ``pope_local``;
5. print the table and the lmms-eval numbers of the merge.

The adapters were trained on the base's chat template without a system
prompt, so the demo evaluates with ``prompt_profile=plain`` (the default for a
Qwen2-VL base, ``qwen2_vl``, reproduces lmms-eval's own ``qwen2_vl`` class).

A few minutes on 2 shared CPU cores. Everything lands in ``--out``
(default ``./demo_out``): ``base/``, ``adapters/<task>/``, ``merged/``,
``lmms_eval/<row>/`` (results JSON), ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# copa's released default lambda=2 lands on both factors of the product of sums
# (delta x4): on these tiny, strongly trained adapters that wipes out every
# task (all scores 0), so the demo uses lambda=1 unless --param is given.
DEMO_PARAMS = {"copa": ["scaling=1"]}
DEFAULT_TASKS_DIR = REPO / "task_configs" / "local"
# the prompts the demo adapters were trained on (see the module docstring)
DEMO_PROFILE = "plain"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _parse(argv):
    from harness_merge.demo.data import DEMO_TASKS

    p = argparse.ArgumentParser(prog="harness-merge demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    p.add_argument("--method", default="copa", help="merge method (default copa)")
    p.add_argument(
        "--param",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="method parameter (repeatable; default for copa: scaling=1, see DEMO_PARAMS)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="lmms-eval tasks (default: the demo tasks and pope_local; merge_six_local adds all six)",
    )
    p.add_argument(
        "--adapter-tasks", default=",".join(DEMO_TASKS), help="one adapter per task (default all three)"
    )
    p.add_argument("--tasks-dir", type=Path, default=DEFAULT_TASKS_DIR, help="lmms-eval --include_path")
    p.add_argument("--steps", type=int, default=200, help="LoRA training steps per adapter")
    p.add_argument("--pretrain-steps", type=int, default=200, help="base pre-training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--skip-lmms-eval", action="store_true", help="stop after the merge (no evaluation)")
    p.add_argument("--rebuild", action="store_true", help="retrain even if base/adapters exist in --out")
    return p.parse_args(argv)


def build(out: Path, adapter_tasks, *, steps: int, pretrain_steps: int, seed: int, rebuild: bool):
    """Base + adapters in ``out`` (reused when present unless ``rebuild``)."""
    from harness_merge.demo import tiny, train

    base = out / "base"
    if rebuild or not (base / "config.json").exists():
        t = time.time()
        raw = tiny.build_tiny_qwen2vl(out / "raw_base", seed=seed)
        train.pretrain_base(raw, base, steps=pretrain_steps, seed=seed)
        _log(
            f"base: tiny Qwen2-VL pre-trained {pretrain_steps} steps on captions + a few task rows "
            f"({time.time() - t:.0f}s) -> {base}"
        )
    adapters = {}
    for task in adapter_tasks:
        ad = out / "adapters" / task
        if rebuild or not (ad / "adapter_config.json").exists():
            t = time.time()
            train.train_lora(base, task, ad, steps=steps, seed=seed)
            _log(f"adapter {task}: LoRA r=8 trained {steps} steps ({time.time() - t:.0f}s) -> {ad}")
        adapters[task] = ad
    return base, adapters


def run_lmms_eval(
    base: Path, adapters, method: str, params: dict, tasks: str, tasks_dir: Path, out: Path, cache_dir: Path
) -> dict:
    """The real lmms-eval CLI on model ``merged``; returns its results JSON.
    ``method="none"`` (no adapters) evaluates the base alone."""
    margs = f"pretrained={base},method={method},cache_dir={cache_dir},prompt_profile={DEMO_PROFILE}"
    if adapters:
        margs += ",adapters=[" + ",".join(str(a) for a in adapters) + "]"
    if params:
        margs += ",params={" + ",".join(f"{k}={v}" for k, v in params.items()) + "}"
    cmd = [
        sys.executable,
        "-m",
        "harness_merge.harness.lmms_cli",
        "--model",
        "merged",
        "--model_args",
        margs,
        "--tasks",
        tasks,
        "--include_path",
        str(tasks_dir),
        "--output_path",
        str(out),
        "--batch_size",
        "1",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    _log("$ lmms_eval " + " ".join(cmd[3:]))
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"lmms-eval failed (exit {proc.returncode})")
    found = sorted(out.rglob("*results*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.stderr.write(proc.stderr[-8000:])
        raise SystemExit(f"lmms-eval wrote no results JSON under {out}")
    _log(f"lmms-eval done ({time.time() - t:.0f}s) -> {found[-1]}")
    return json.loads(found[-1].read_text())


def _lmms_scores(results: dict) -> dict[str, dict[str, float]]:
    scores = {}
    for task, res in results.get("results", {}).items():
        scores[task] = {
            k.split(",")[0]: v
            for k, v in res.items()
            if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k
        }
    return scores


def _table(rows: list[tuple[str, dict[str, float]]], tasks) -> str:
    head = f"{'model':28s}" + "".join(f"{t:>9s}" for t in tasks) + f"{'mean':>9s}"
    lines = [head, "-" * len(head)]
    for name, acc in rows:
        vals = [acc.get(t) for t in tasks]
        known = [v for v in vals if v is not None]
        mean = sum(known) / len(known) if known else float("nan")
        lines.append(
            f"{name:28s}"
            + "".join(f"{v:9.2f}" if v is not None else f"{'-':>9s}" for v in vals)
            + f"{mean:9.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    t0 = time.time()
    import torch

    torch.set_num_threads(args.threads)
    from harness_merge.api import MergeSpec, merge

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    adapter_tasks = [t for t in args.adapter_tasks.split(",") if t]
    base, adapters = build(
        out,
        adapter_tasks,
        steps=args.steps,
        pretrain_steps=args.pretrain_steps,
        seed=args.seed,
        rebuild=args.rebuild,
    )

    given = args.param if args.param is not None else DEMO_PARAMS.get(args.method, [])
    params = dict(kv.split("=", 1) for kv in given)
    cache_dir = out / "cache"
    t = time.time()
    art = merge(
        MergeSpec(
            adapters=tuple(str(a) for a in adapters.values()),
            method=args.method,
            params=params,
            base=str(base),
        ),
        out=out / "merged",
        cache_dir=cache_dir,
        progress=False,
    )
    _log(
        f"merged {len(adapters)} adapters with {args.method} {params or ''} ({time.time() - t:.1f}s): "
        f"{art.kind} -> {art.path}"
    )

    summary: dict = {
        "artifact": str(art.path),
        "method": args.method,
        "params": params,
        "prompt_profile": DEMO_PROFILE,
    }
    rows: list[tuple[str, dict[str, float]]] = []
    lmms = None
    if not args.skip_lmms_eval:
        tasks = args.tasks or ",".join([f"demo_{t}" for t in adapter_tasks] + ["pope_local"])
        plan = [("base (zero-shot)", "base", [], "none", {})]
        plan += [(f"adapter {t}", f"adapter_{t}", [ad], "ta", {"scaling": 1}) for t, ad in adapters.items()]
        plan.append((f"merged {args.method}", "merged", list(adapters.values()), args.method, params))
        summary["lmms_eval_rows"] = {}
        for label, folder, ads, method, prm in plan:
            res = run_lmms_eval(
                base, ads, method, prm, tasks, args.tasks_dir, out / "lmms_eval" / folder, cache_dir
            )
            scores = _lmms_scores(res)
            summary["lmms_eval_rows"][label] = scores
            rows.append(
                (
                    label,
                    {t: scores[f"demo_{t}"]["exact_match"] for t in adapter_tasks if f"demo_{t}" in scores},
                )
            )
        lmms = summary["lmms_eval_rows"][f"merged {args.method}"]
        summary["lmms_eval"] = lmms

    if rows:
        print()
        print(
            "Exact-match accuracy on the demo tasks (24 rows each; every row by lmms-eval, model 'merged'):"
        )
        print(_table(rows, adapter_tasks))
    if lmms:
        print(f"\nlmms-eval results of the merge (model 'merged', method {args.method}):")
        for task, metrics in lmms.items():
            print(f"  {task:22s} " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[demo] done in {summary['seconds']:.0f}s; summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
