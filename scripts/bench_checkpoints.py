"""Full-checkpoint merges, ours vs mergekit, on the same files in one run.

Builds a Llama-shaped bf16 base (random weights, ``--layers`` x hidden
``--hidden``; the default is ~317M parameters) and ``--fine-tunes`` fine-tunes
(base + seeded noise on every tensor), writes one mergekit YAML per method, and
runs each merge twice in its own subprocess: mergekit 0.1.5 (``run_merge``,
its python API, default options, no tokenizer copy) and ours (the same YAML
through ``harness_merge.recipe.load_recipe`` -> ``merge(..., use_cache=False)``,
which still hashes every input file it reads for the manifest). Prints wall
time and peak RSS (``ru_maxrss`` of the child), the ratio ours/mergekit, and
the 1-minute load average after each row.

Beside each method, the I/O floor of that merge, measured in the same run (its
own subprocess, just before the merges): read every input file the merge
reads (the base, unless the method does without it as our ``wa`` does, and
the fine-tunes; 16 MiB ``readinto`` chunks), write as many bytes as the merged
output holds and fsync them. Each merge's time is also given as a ratio to it.

``--before SRC``: one more row, ours from another source tree (e.g.
``git worktree add /tmp/before HEAD~3``), run the same way with
``PYTHONPATH=SRC``: before and after in one run. ``--repeat N``: every row N
times, the rounds interleaved, the median wall printed (a shared machine's
noise).

The checkpoints go to ``--workdir`` (reused when already built; only read
after that); recipes and merge outputs to ``--outdir`` (default: a temp dir,
removed at the end).

    python scripts/bench_checkpoints.py                     # linear task_arithmetic ties dare_ties
    python scripts/bench_checkpoints.py --layers 4 --methods linear
    python scripts/bench_checkpoints.py --workdir /work/bench/ck --before /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {  # mergekit method -> (per-model parameters, global parameters)
    "linear": ({"weight": 1.0}, None),
    "task_arithmetic": ({"weight": 1.0}, None),
    "ties": ({"weight": 1.0, "density": 0.2}, None),
    "dare_ties": ({"weight": 1.0, "density": 0.2}, None),
}


def build(root: Path, layers: int, hidden: int, inter: int, vocab: int, n_ft: int) -> tuple[Path, list[Path]]:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{m}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(1, n_ft + 1)]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs[0], dirs[1:]
    import torch  # only to build (the children's peak RSS starts from this process's)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for i, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        if i == 0:
            sd = base
        else:
            gi = torch.Generator().manual_seed(i)
            sd = {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=gi)).to(torch.bfloat16)
                for k, v in base.items()
            }
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return dirs[0], dirs[1:]


CHILD = r"""
import json, os, resource, sys, time
who, recipe, out = sys.argv[1:4]
if who == "floor":  # recipe: a JSON list of the files read; out: a file of that many bytes written
    spec = json.loads(recipe)
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    for p in spec["read"]:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    left = spec["write"]
    with open(out, "wb", buffering=0) as f:
        while left:
            left -= f.write(memoryview(buf)[: min(left, len(buf))])
        os.fsync(f.fileno())
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    raise SystemExit(0)
import torch, yaml
if who == "mergekit":
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(recipe)))
    t0 = time.perf_counter()
    run_merge(cfg, out, options=MergeOptions(copy_tokenizer=False))
else:
    from harness_merge.api import MergeSpec, merge
    from harness_merge.methods import available
    from harness_merge.recipe import load_recipe
    available()  # the method registry imported, as mergekit.merge imports its methods
    r = load_recipe(recipe)
    spec = MergeSpec(adapters=tuple(r.adapters), method=r.method, params=r.params, base=r.base, dtype=r.dtype)
    t0 = time.perf_counter()
    merge(spec, out=out, use_cache=False, progress=False)
wall = time.perf_counter() - t0
src = sys.modules["harness_merge"].__file__ if "harness_merge" in sys.modules else None
print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "src": src}))
"""


def run_child(who: str, recipe, out: Path, *, src: str | None = None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run(
        [sys.executable, "-c", CHILD, "ours" if who == "before" else who, str(recipe), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(out.parent),  # not this folder: a ``python -c`` child puts its cwd first on sys.path
    )
    if res.returncode != 0:
        raise SystemExit(f"{who} {recipe} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if src is not None and not str(r["src"]).startswith(str(Path(src).resolve())):
        raise SystemExit(f"{who}: imported {r['src']}, not the tree in {src}")
    return r


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--fine-tunes", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--workdir", default=None, help="keep the generated checkpoints here (default: a temp dir)"
    )
    ap.add_argument(
        "--outdir", default=None, help="recipes and merge outputs (default: a temp dir, removed at the end)"
    )
    ap.add_argument("--before", default=None, help="a source tree: one more row, ours from it")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every row this many times, interleaved; print the median wall and the largest peak RSS",
    )
    args = ap.parse_args(argv)
    try:
        import mergekit  # noqa: F401
    except ImportError:
        raise SystemExit(
            "mergekit is not installed (the test extra has it): nothing to compare with"
        ) from None
    import shutil

    import yaml

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ck_"))
    outdir = Path(args.outdir) if args.outdir else Path(tempfile.mkdtemp(prefix="bench_ck_out_"))
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, fts = build(
        work / f"l{args.layers}_h{args.hidden}_n{args.fine_tunes}",
        args.layers,
        args.hidden,
        args.intermediate,
        args.vocab,
        args.fine_tunes,
    )
    weights = sorted(base.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    print(
        f"base + {len(fts)} fine-tunes, {size / 2 / 1e6:.0f}M params bf16, {size / 2**20:.0f} MiB each "
        f"(built in {time.perf_counter() - t0:.0f}s; load {_load()})"
    )
    whos = ["floor", "mergekit", "ours"] + (["before"] if args.before else [])
    print(f"{'method':18s} {'who':9s} {'wall':>8s} {'peak RSS':>10s}   ours/mergekit, /floor")
    try:
        for m in args.methods:
            per_model, glob = METHODS[m]
            cfg = {
                "merge_method": m,
                "base_model": str(base),
                "dtype": "bfloat16",
                "models": [{"model": str(f), "parameters": dict(per_model)} for f in fts],
            }
            if glob:
                cfg["parameters"] = glob
            if m == "linear":  # mergekit's linear averages a named base_model too: leave it out
                del cfg["base_model"]
            recipe = outdir / f"{m}.yaml"
            recipe.write_text(yaml.safe_dump(cfg))
            # What the merge reads: the fine-tunes, and the base unless it is not named (linear).
            read = [
                str(p)
                for d in ([base] if "base_model" in cfg else []) + fts
                for p in sorted(d.glob("*.safetensors"))
            ]
            rows = {}
            runs = {who: [] for who in whos}
            for _ in range(args.repeat):  # interleaved: each round runs every row once
                for who in whos:
                    out = Path(tempfile.mkdtemp(prefix=f"{who}_{m}_", dir=outdir)) / "out"
                    if who == "floor":
                        r = run_child(who, json.dumps({"read": read, "write": size}), out)
                    else:
                        r = run_child(who, recipe, out, src=args.before if who == "before" else None)
                    runs[who].append(r)
                    shutil.rmtree(out.parent, ignore_errors=True)
            for who in whos:
                walls = sorted(r["wall"] for r in runs[who])
                r = {"wall": walls[len(walls) // 2], "peak_rss_mb": max(x["peak_rss_mb"] for x in runs[who])}
                rows[who] = r
                ratio = ""
                if who not in ("floor", "mergekit"):
                    ratio = (
                        f"time {r['wall'] / rows['mergekit']['wall']:.2f}x, "
                        f"RSS {r['peak_rss_mb'] / rows['mergekit']['peak_rss_mb']:.2f}x, "
                    )
                if who != "floor":
                    ratio += f"{r['wall'] / rows['floor']['wall']:.1f}x floor"
                else:
                    ratio = f"read {len(read)} x {size / 2**20:.0f} MiB, write {size / 2**20:.0f} MiB + fsync"
                if args.repeat > 1:
                    ratio += f"; runs {'/'.join(f'{w:.2f}' for w in walls)} s"
                print(
                    f"{m:18s} {who:9s} {r['wall']:8.2f} s {r['peak_rss_mb']:7.0f} MiB   {ratio}  (load {_load()})",
                    flush=True,
                )
    finally:
        if not args.outdir:
            shutil.rmtree(outdir, ignore_errors=True)


if __name__ == "__main__":
    main()
