"""``harness-merge demo``: the whole job on a tiny offline example, one command.

1. build a tiny Qwen2-VL from a config and pre-train it briefly (captions);
2. train one LoRA adapter per synthetic task (colour, shape, count);
3. merge the adapters with ``copa`` through :func:`harness_merge.api.merge`;
4. run the real lmms-eval CLI on the merged model (``--model merged``, which
   merges on load, here a cache hit) over the demo tasks and ``pope_local``;
5. print a table: base zero-shot, each adapter alone and the merge (these four
   in-process, same rows, same exact-match scoring) and the lmms-eval numbers.

About 2-4 minutes on 2 shared CPU cores. Everything lands in ``--out``
(default ``./demo_out``): ``base/``, ``adapters/<task>/``, ``merged/``,
``lmms_eval/`` (results JSON), ``summary.json``.
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


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _parse(argv):
    from harness_merge.demo.data import DEMO_TASKS

    p = argparse.ArgumentParser(prog="harness-merge demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    p.add_argument("--method", default="copa", help="merge method (default copa)")
    p.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                   help="method parameter (repeatable; default for copa: scaling=1, see DEMO_PARAMS)")
    p.add_argument("--tasks", default=None,
                   help="lmms-eval tasks (default: the demo tasks and pope_local; merge_six_local adds all six)")
    p.add_argument("--adapter-tasks", default=",".join(DEMO_TASKS), help="one adapter per task (default all three)")
    p.add_argument("--tasks-dir", type=Path, default=DEFAULT_TASKS_DIR, help="lmms-eval --include_path")
    p.add_argument("--steps", type=int, default=200, help="LoRA training steps per adapter")
    p.add_argument("--pretrain-steps", type=int, default=200, help="base pre-training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--skip-lmms-eval", action="store_true", help="stop after the in-process table")
    p.add_argument("--rebuild", action="store_true", help="retrain even if base/adapters exist in --out")
    return p.parse_args(argv)


def _eval_rows(task: str):
    from harness_merge.demo import data as ddata

    # the same rows as task_configs/local/demo/demo_<task>.parquet
    return ddata.make_rows(task, 24, seed=7)


def _accuracies(model, processor, tasks) -> dict[str, float]:
    from harness_merge.demo.train import accuracy

    return {t: accuracy(model, processor, _eval_rows(t)) for t in tasks}


def build(out: Path, adapter_tasks, *, steps: int, pretrain_steps: int, seed: int, rebuild: bool):
    """Base + adapters in ``out`` (reused when present unless ``rebuild``)."""
    from harness_merge.demo import tiny, train

    base = out / "base"
    if rebuild or not (base / "config.json").exists():
        t = time.time()
        raw = tiny.build_tiny_qwen2vl(out / "raw_base", seed=seed)
        train.pretrain_base(raw, base, steps=pretrain_steps, seed=seed)
        _log(f"base: tiny Qwen2-VL pre-trained {pretrain_steps} steps on captions + a few task rows "
             f"({time.time() - t:.0f}s) -> {base}")
    adapters = {}
    for task in adapter_tasks:
        ad = out / "adapters" / task
        if rebuild or not (ad / "adapter_config.json").exists():
            t = time.time()
            train.train_lora(base, task, ad, steps=steps, seed=seed)
            _log(f"adapter {task}: LoRA r=8 trained {steps} steps ({time.time() - t:.0f}s) -> {ad}")
        adapters[task] = ad
    return base, adapters


def run_lmms_eval(base: Path, adapters, method: str, params: dict, tasks: str, tasks_dir: Path, out: Path,
                  cache_dir: Path) -> dict:
    """The real lmms-eval CLI on model ``merged``; returns its results JSON."""
    ad = ",".join(str(a) for a in adapters)
    margs = f"pretrained={base},adapters=[{ad}],method={method},cache_dir={cache_dir}"
    for k, v in params.items():
        margs += f",{k}={v}"
    cmd = [sys.executable, "-m", "harness_merge.harness.lmms_cli", "--model", "merged", "--model_args", margs,
           "--tasks", tasks, "--include_path", str(tasks_dir), "--output_path", str(out), "--batch_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
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
        scores[task] = {k.split(",")[0]: v for k, v in res.items()
                        if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
    return scores


def _table(rows: list[tuple[str, dict[str, float]]], tasks) -> str:
    head = f"{'model':28s}" + "".join(f"{t:>9s}" for t in tasks) + f"{'mean':>9s}"
    lines = [head, "-" * len(head)]
    for name, acc in rows:
        vals = [acc.get(t) for t in tasks]
        known = [v for v in vals if v is not None]
        mean = sum(known) / len(known) if known else float("nan")
        lines.append(f"{name:28s}" + "".join(f"{v:9.2f}" if v is not None else f"{'-':>9s}" for v in vals)
                     + f"{mean:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    t0 = time.time()
    import torch

    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from harness_merge.api import MergeSpec, merge
    from harness_merge.demo.tiny import load_processor

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    adapter_tasks = [t for t in args.adapter_tasks.split(",") if t]
    base, adapters = build(out, adapter_tasks, steps=args.steps, pretrain_steps=args.pretrain_steps,
                           seed=args.seed, rebuild=args.rebuild)

    given = args.param if args.param is not None else DEMO_PARAMS.get(args.method, [])
    params = dict(kv.split("=", 1) for kv in given)
    cache_dir = out / "cache"
    t = time.time()
    art = merge(MergeSpec(adapters=tuple(str(a) for a in adapters.values()), method=args.method, params=params,
                          base=str(base)), out=out / "merged", cache_dir=cache_dir, progress=False)
    _log(f"merged {len(adapters)} adapters with {args.method} {params or ''} ({time.time() - t:.1f}s): "
         f"{art.kind} -> {art.path}")

    processor = load_processor(base)
    rows: list[tuple[str, dict[str, float]]] = []

    def fresh():
        return Qwen2VLForConditionalGeneration.from_pretrained(base)

    rows.append(("base (zero-shot)", _accuracies(fresh(), processor, adapter_tasks)))
    for task, ad in adapters.items():
        rows.append((f"adapter {task}", _accuracies(PeftModel.from_pretrained(fresh(), ad), processor, adapter_tasks)))
    if art.kind == "lora":
        merged_model = PeftModel.from_pretrained(fresh(), art.path)
    else:
        merged_model = Qwen2VLForConditionalGeneration.from_pretrained(art.path)
    rows.append((f"merged {args.method} (in-process)", _accuracies(merged_model, processor, adapter_tasks)))

    summary = {"in_process": dict(rows), "artifact": str(art.path), "method": args.method, "params": params}
    lmms = None
    if not args.skip_lmms_eval:
        tasks = args.tasks or ",".join([f"demo_{t}" for t in adapter_tasks] + ["pope_local"])
        res = run_lmms_eval(base, list(adapters.values()), args.method, params, tasks, args.tasks_dir,
                            out / "lmms_eval", cache_dir)
        lmms = _lmms_scores(res)
        summary["lmms_eval"] = lmms
        demo_acc = {t: lmms[f"demo_{t}"]["exact_match"] for t in adapter_tasks if f"demo_{t}" in lmms}
        rows.append((f"merged {args.method} (lmms-eval)", demo_acc))

    print()
    print("Exact-match accuracy on the demo tasks (24 rows each):")
    print(_table(rows, adapter_tasks))
    if lmms:
        print("\nlmms-eval results (model 'merged'):")
        for task, metrics in lmms.items():
            print(f"  {task:22s} " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[demo] done in {summary['seconds']:.0f}s; summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
