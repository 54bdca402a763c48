#!/usr/bin/env python
"""backend=hf vs backend=vllm on the same merged model (tiny offline Qwen2-VL).

Run in the vLLM venv (it has transformers too)::

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python scripts/bench_backends.py [--n 32] [--json OUT]

Prints, side by side with the vllm/hf ratio:
  1. throughput on one task set (N image generate_until requests, max_new_tokens
     tokens each, and N two-choice image loglikelihood requests = 2N scores):
     samples/s; hf at batch sizes 1 and 8, vLLM with everything in one call;
  2. first-token latency: one request, max_new_tokens=1 (median of 5, warm);
  3. cold start in a fresh process (imports + merge + backend load + first
     answer), with an empty merge cache and with a warm one (cache hit);
  4. multi-LoRA engine sharing: N_SHARE (3) LoRA artifacts on one base, the
     task set on each, with ONE engine (prepare_engine) vs one engine per artifact.

The vLLM engine runs as vLLM runs by default (EngineCore/Worker processes);
``--inprocess`` sets VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTS = {"dtype": "float32"}


def build(root: Path, n_adapters: int) -> tuple[str, list[str]]:
    import torch

    from harness_merge.demo.tiny import new_tiny_qwen2vl, random_lora, save_model

    model, proc = new_tiny_qwen2vl(seed=0)
    with torch.no_grad():
        torch.manual_seed(123)
        model.get_output_embeddings().weight.normal_(0.0, 0.5)  # robust greedy margins
    base = save_model(model, proc, root / "base")
    ads = [
        str(random_lora(base, root / f"lora{i}", rank=8, alpha=16, seed=i, std=2.0, targets=LM_TARGETS))
        for i in range(1, n_adapters + 1)
    ]
    return str(base), ads


def task_set(n: int, max_new: int):
    import numpy as np
    from PIL import Image

    from harness_merge.backends import GenRequest, LLRequest

    rng = np.random.default_rng(0)
    gen, ll = [], []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
        m = (
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": f"Question {i}: what is it?"}],
            },
        )
        gen.append(GenRequest(messages=m, images=(im,), max_new_tokens=max_new))
        ll += [LLRequest(continuation=c, messages=m, images=(im,)) for c in ("yes", "no")]
    return gen, ll


def run_tasks(backend, gen, ll, reps: int = 1) -> dict:
    """Seconds for the task set; with reps > 1 the fastest of reps runs (the
    shared machine is noisy)."""
    g, l_ = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.generate(gen)
        t1 = time.perf_counter()
        backend.loglikelihood(ll)
        t2 = time.perf_counter()
        g.append(t1 - t0)
        l_.append(t2 - t1)
    return {"gen_s": min(g), "ll_s": min(l_), "gen_per_s": len(gen) / min(g), "ll_per_s": len(ll) / min(l_)}


def first_token_latency(backend, req, reps: int = 5) -> float:
    from dataclasses import replace

    one = replace(req, max_new_tokens=1)
    backend.generate([one])  # warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        backend.generate([one])
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# --------------------------------------------------------------------------- cold start (child process)
def cold_child(args) -> None:
    t0 = time.perf_counter()
    from harness_merge.api import MergeSpec, merge
    from harness_merge.backends import load_backend

    gen, _ = task_set(1, 1)
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    art = merge(
        MergeSpec(adapters=tuple(args.adapters), method="copa", base=args.base),
        cache_dir=args.cache,
        progress=False,
    )
    t_merge = time.perf_counter() - t1
    t2 = time.perf_counter()
    b = load_backend(args.backend, art, args.base, **OPTS)
    t_load = time.perf_counter() - t2
    t3 = time.perf_counter()
    b.generate(gen)
    t_first = time.perf_counter() - t3
    print(
        "HM_BENCH "
        + json.dumps(
            {
                "import_s": t_import,
                "merge_s": t_merge,
                "cache_hit": art.cache_hit,
                "load_s": t_load,
                "first_answer_s": t_first,
                "total_s": time.perf_counter() - t0,
            }
        ),
        flush=True,
    )
    b.close()


def cold_start(backend: str, base: str, adapters: list[str], cache: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            __file__,
            "--cold-child",
            backend,
            "--base",
            base,
            "--cache",
            str(cache),
            "--adapters",
            *adapters,
        ],
        check=False,
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    wall = time.perf_counter() - t0
    line = [x for x in p.stdout.splitlines() if x.startswith("HM_BENCH ")]
    if p.returncode != 0 or not line:
        raise RuntimeError(
            f"cold start child failed (rc={p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        )
    d = json.loads(line[-1][len("HM_BENCH ") :])
    d["process_wall_s"] = wall  # includes interpreter start and engine shutdown at exit
    return d


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="requests per task (generate and loglikelihood)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2, help="throughput: best of this many runs")
    ap.add_argument(
        "--share-n", type=int, default=3, help="LoRA artifacts for the engine-sharing measurement"
    )
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-share", action="store_true")
    ap.add_argument("--inprocess", action="store_true", help="VLLM_ENABLE_V1_MULTIPROCESSING=0")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", help="build in this folder and keep it")
    # child mode (cold start)
    ap.add_argument("--cold-child", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold_child:
        cold_child(
            argparse.Namespace(
                backend=args.cold_child, base=args.base, cache=args.cache, adapters=args.adapters
            )
        )
        return 0
    if args.inprocess:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from harness_merge.api import MergeSpec, merge
    from harness_merge.backends import load_backend
    from harness_merge.backends import vllm as hv

    res: dict = {
        "n": args.n,
        "reps": args.reps,
        "max_new_tokens": args.max_new_tokens,
        "cpus": os.cpu_count(),
        "mode": "in-process" if args.inprocess else "multiprocess (vLLM default)",
    }
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_backends_"))
    tmp.mkdir(parents=True, exist_ok=True)
    base, ads = build(tmp, max(2, args.share_n + 1))
    cache = tmp / "cache"
    art = merge(MergeSpec(adapters=tuple(ads[:2]), method="copa", base=base), cache_dir=cache, progress=False)
    gen, ll = task_set(args.n, args.max_new_tokens)
    print(
        f"tiny Qwen2-VL, copa merge of 2 rank-8 adapters -> {art.kind} artifact; task set: {len(gen)} image "
        f"generate (max_new_tokens={args.max_new_tokens}) + {len(ll)} image loglikelihood; {res['mode']}",
        flush=True,
    )

    # 1+2. throughput and first-token latency
    thr = {}
    for bs in (1, 8):
        b = load_backend("hf", art, base, batch_size=bs, **OPTS)
        run_tasks(b, gen[:2], ll[:2])  # warm-up
        thr[f"hf (batch {bs})"] = run_tasks(b, gen, ll, args.reps)
        if bs == 1:
            thr[f"hf (batch {bs})"]["first_token_s"] = first_token_latency(b, gen[0])
        b.close()
    t0 = time.perf_counter()
    v = load_backend("vllm", art, base, **OPTS)
    res["vllm_load_s"] = time.perf_counter() - t0
    run_tasks(v, gen[:2], ll[:2])
    thr["vllm"] = run_tasks(v, gen, ll, args.reps)
    thr["vllm"]["first_token_s"] = first_token_latency(v, gen[0])
    v.close()
    hv.shutdown_engines()
    res["throughput"] = thr
    h = thr["hf (batch 1)"]
    print(f"\n{'backend':<14}{'generate/s':>12}{'loglik/s':>12}{'first token':>14}")
    for k, d in thr.items():
        ft = f"{d['first_token_s'] * 1000:.0f} ms" if "first_token_s" in d else "-"
        print(f"{k:<14}{d['gen_per_s']:>12.2f}{d['ll_per_s']:>12.2f}{ft:>14}")
    best_hf = max(thr["hf (batch 1)"]["gen_per_s"], thr["hf (batch 8)"]["gen_per_s"])
    best_hf_ll = max(thr["hf (batch 1)"]["ll_per_s"], thr["hf (batch 8)"]["ll_per_s"])
    ratios = {
        "generate_vs_hf_bs1": thr["vllm"]["gen_per_s"] / h["gen_per_s"],
        "generate_vs_best_hf": thr["vllm"]["gen_per_s"] / best_hf,
        "loglik_vs_hf_bs1": thr["vllm"]["ll_per_s"] / h["ll_per_s"],
        "loglik_vs_best_hf": thr["vllm"]["ll_per_s"] / best_hf_ll,
        "first_token_hf_over_vllm": h["first_token_s"] / thr["vllm"]["first_token_s"],
    }
    res["ratios"] = ratios
    print(
        f"ratio vllm/hf: generate x{ratios['generate_vs_hf_bs1']:.2f} vs hf batch 1, "
        f"x{ratios['generate_vs_best_hf']:.2f} vs the best hf; loglikelihood x{ratios['loglik_vs_hf_bs1']:.2f} / "
        f"x{ratios['loglik_vs_best_hf']:.2f}; first token: vLLM {ratios['first_token_hf_over_vllm']:.2f}x faster"
    )
    print(f"vLLM backend load (engine start, vllm already imported): {res['vllm_load_s']:.1f} s", flush=True)

    # 3. cold start, fresh processes
    if not args.skip_cold:
        cold = {}
        for be in ("hf", "vllm"):
            fresh = tmp / f"cold_cache_{be}"
            cold[f"{be}, empty merge cache"] = cold_start(be, base, ads[:2], fresh)
            cold[f"{be}, merge cache hit"] = cold_start(be, base, ads[:2], fresh)
        res["cold_start"] = cold
        print(
            f"\n{'cold start (fresh process)':<28}{'imports':>9}{'merge':>8}{'load':>8}{'1st ans':>9}"
            f"{'total':>8}{'process':>9}"
        )
        for k, d in cold.items():
            print(
                f"{k:<28}{d['import_s']:>8.1f}s{d['merge_s']:>7.2f}s{d['load_s']:>7.1f}s"
                f"{d['first_answer_s']:>8.2f}s{d['total_s']:>7.1f}s{d['process_wall_s']:>8.1f}s"
                + ("  [cache hit]" if d["cache_hit"] else ""),
                flush=True,
            )

    # 4. engine sharing
    if not args.skip_share:
        share_ads = [
            merge(MergeSpec(adapters=(a,), method="ta", base=base), cache_dir=cache, progress=False)
            for a in ads[1 : args.share_n + 1]
        ]
        t0 = time.perf_counter()
        eng = hv.prepare_engine(base, share_ads, **OPTS)
        outs_shared = []
        for a in share_ads:
            b = load_backend("vllm", a, base, **OPTS)
            run_tasks(b, gen, ll)
            outs_shared.append(b.generate(gen[:4]))
            b.close()
        starts = eng.starts
        eng.close()
        t_shared = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs_sep = []
        for a in share_ads:
            b = load_backend("vllm", a, base, share=False, **OPTS)
            run_tasks(b, gen, ll)
            outs_sep.append(b.generate(gen[:4]))
            b.close()
        t_sep = time.perf_counter() - t0
        res["sharing"] = {
            "n_artifacts": len(share_ads),
            "one_engine_s": t_shared,
            "engine_starts_shared": starts,
            "engine_per_artifact_s": t_sep,
            "saving_s": t_sep - t_shared,
            "saving_frac": 1 - t_shared / t_sep,
            "same_outputs": outs_shared == outs_sep,
        }
        s = res["sharing"]
        print(
            f"\nengine sharing, {s['n_artifacts']} LoRA artifacts x task set: one engine {t_shared:.1f} s "
            f"({starts} start), one engine per artifact {t_sep:.1f} s -> saves {s['saving_s']:.1f} s "
            f"({100 * s['saving_frac']:.0f} %); same answers: {s['same_outputs']}",
            flush=True,
        )

    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":  # vLLM's engine processes re-import this file
    sys.exit(main())
