"""Merge benchmark: N random rank-r adapters with LLaVA-1.5-7B's module shapes.

Each method runs once per ``--threads`` value (``HARNESS_MERGE_THREADS``: the
modules merged at once; the floor is one thread); ``--repeat N`` runs every row
(the floors too) N times and prints the median (a shared machine's noise). A
method that stays low-rank also gets a "merge only" row: the merge at the
default threads without hashing, cache or write (``iter_merged`` consumed),
so the part that is not I/O shows on its own.

Prints, per method, wall time, peak RSS and the ratio to the floor (the time
to just read every adapter tensor with safetensors), each measured in its own
subprocess in the same run so peak RSS is per method, with the machine's load
average. A LoRA artifact's row also gives the ratio to the I/O floor: the
read floor plus writing as many bytes as the artifact holds to a new file and
fsync'ing it (a merge cannot publish durably in less). The cache's content
hash is ``HARNESS_MERGE_HASH`` (default xxh3_128); ``--hash sha256`` times
the other one. For ta and wa, PEFT's ``add_weighted_adapter(combination_type="cat")``
(the same exact concatenation) runs on the same adapters. mergekit merges full
checkpoints only; it is optional and not in the main lock (skipped with a note
when it is not installed).

    python scripts/bench_merge.py                  # 8 adapters, 32 layers, copa ta ties
    python scripts/bench_merge.py --layers 4 --methods copa ta ties tsv iso_c
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# LLaVA-1.5-7B (Vicuna-7B) language model: hidden 4096, MLP 11008.
SHAPES = {  # module -> (d_out, d_in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def make_adapters(root: Path, n: int, layers: int, rank: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    out = []
    for i in range(n):
        d = root / f"adapter{i}"
        out.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        sd = {}
        for layer in range(layers):
            for mod, (d_out, d_in) in SHAPES.items():
                key = f"base_model.model.model.layers.{layer}.{mod}"
                sd[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).half()
                sd[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).half()
        save_file(sd, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": [m.split(".")[-1] for m in SHAPES],
                    "base_model_name_or_path": "liuhaotian/llava-v1.5-7b",
                }
            )
        )
    return out


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
kind, method, cache, adapters = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
# Imports are not the work measured: load them first.
import torch, safetensors, peft, harness_merge.api, harness_merge.merge_loop
t0 = time.perf_counter()
if kind == "floor":
    from safetensors import safe_open
    for a in adapters:
        with safe_open(str(Path(a) / "adapter_model.safetensors"), "pt") as f:
            for k in f.keys():
                f.get_tensor(k).float()
    extra = {}
elif kind == "api":
    from harness_merge.api import MergeSpec, merge
    art = merge(MergeSpec(adapters=tuple(adapters), method=method), cache_dir=cache, progress=False)
    nbytes = sum(p.stat().st_size for p in Path(art.path).iterdir() if p.is_file())
    extra = {"rank": art.manifest["result"].get("rank"), "format": art.kind, "bytes": nbytes}
elif kind == "write":
    # the write floor: as many bytes as an artifact, to a new file, then fsync
    import os
    n = int(adapters[0]); chunk = bytes(1 << 24)
    t0 = time.perf_counter()
    with open(Path(cache) / "write_floor.bin", "wb") as f:
        while n > 0:
            f.write(chunk[: min(n, len(chunk))]); n -= len(chunk)
        f.flush(); os.fsync(f.fileno())
    os.unlink(Path(cache) / "write_floor.bin")
    extra = {}
elif kind == "peft_cat":
    # PEFT's add_weighted_adapter(combination_type="cat") computes ta (weights 1) and
    # wa (weights 1/N) exactly, as we do. The base layers are stride-0 stand-ins of the
    # 7B shapes (PEFT only reads their shape, device and dtype), so this times loading
    # the adapters into PEFT and its merge, not a base model.
    import torch
    from torch import nn
    from peft import PeftModel
    shapes = json.loads(cache)
    class Node(nn.Module):
        pass
    root = Node()
    for name, (d_out, d_in) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, Node())
            parent = getattr(parent, p)
        lin = nn.Linear(1, 1, bias=False)
        lin.in_features, lin.out_features = d_in, d_out
        lin.weight = nn.Parameter(torch.zeros((), dtype=torch.float16).expand(d_out, d_in), requires_grad=False)
        parent.add_module(leaf, lin)
    pm = PeftModel.from_pretrained(root, adapters[0], adapter_name="a0", low_cpu_mem_usage=True)
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}", low_cpu_mem_usage=True)
    names = [f"a{i}" for i in range(len(adapters))]
    w = 1.0 if method == "ta" else 1.0 / len(adapters)
    pm.add_weighted_adapter(names, [w] * len(adapters), "merged", combination_type="cat")
    extra = {"rank": sum(pm.peft_config[n].r for n in names), "format": "in memory"}
else:  # stream: compute every module's merge, discard it (dense methods: no base to add to;
    # low-rank ones: the merge without hashing, cache or write, factors as the LoRA writer takes them)
    from harness_merge import methods
    from harness_merge.inputs import open_inputs
    from harness_merge.merge_loop import iter_merged, validate_plan
    spec = methods.get(method); params = spec.make_params({})
    inputs = open_inputs(adapters); validate_plan(inputs, spec, params)
    stored = spec.returns_lowrank(params)
    n = sum(1 for _ in iter_merged(inputs, spec, params, progress=False, stored_dtype=stored))
    extra = {"modules": n}
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def run_child(kind, method, cache, adapters, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads is not None:
        env["HARNESS_MERGE_THREADS"] = str(threads)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, kind, method, str(cache), *map(str, adapters)],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode != 0:
        raise SystemExit(f"{kind} {method} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["copa", "ta", "wa", "ties"])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="HARNESS_MERGE_THREADS values to run each method with (default: 1, 2 and the current setting)",
    )
    ap.add_argument("--workdir", default=None, help="keep the generated adapters here (default: a temp dir)")
    ap.add_argument(
        "--hash", choices=("xxh3_128", "sha256"), default=None, help="HARNESS_MERGE_HASH for the merges"
    )
    ap.add_argument(
        "--no-peers", action="store_true", help="skip PEFT's add_weighted_adapter (and the mergekit note)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every row (the floors too) this many times; print the median wall and the largest peak RSS",
    )
    args = ap.parse_args(argv)
    if args.hash:
        os.environ["HARNESS_MERGE_HASH"] = args.hash
    from harness_merge import methods

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    t0 = time.perf_counter()
    adapters = make_adapters(
        work / f"n{args.adapters}_l{args.layers}_r{args.rank}", args.adapters, args.layers, args.rank
    )
    size = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters) / 2**20
    print(
        f"{args.adapters} adapters x {args.layers} layers x 7 modules, rank {args.rank}, fp16: {size:.0f} MiB on disk "
        f"(generated in {time.perf_counter() - t0:.0f}s); content hash "
        f"{os.environ.get('HARNESS_MERGE_HASH') or 'xxh3_128'}"
    )
    for a in adapters:  # warm the page cache: every row then reads from memory, the floor too
        (a / "adapter_model.safetensors").read_bytes()
    rep = max(args.repeat, 1)

    def median_of(kind, method, cache_of, extra_args, threads=None, keep=False):
        """Run a child ``rep`` times; the median wall, the largest peak RSS, every wall.
        Each run's cache folder is removed after it unless ``keep`` (the disk then
        holds one artifact at a time: a full disk slows every later write)."""
        runs = []
        for _ in range(rep):
            cache = cache_of()
            runs.append(run_child(kind, method, cache, extra_args, threads=threads))
            if not keep:
                shutil.rmtree(cache, ignore_errors=True)
        walls = sorted(r["wall"] for r in runs)
        med = dict(runs[[r["wall"] for r in runs].index(walls[len(walls) // 2])])
        med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        med["runs"] = "" if rep == 1 else f"; runs {'/'.join(f'{w:.2f}' for w in walls)} s"
        return med

    def fresh_cache():
        return Path(tempfile.mkdtemp(prefix="cache_", dir=work))

    floor = median_of("floor", "-", lambda: work / "cache", adapters)
    print(
        f"{'floor (read all)':24s} {floor['wall']:8.2f} s  {floor['peak_rss_mb']:8.0f} MiB peak RSS   "
        f"(load {_load()}){floor['runs']}"
    )
    print(
        f"{'method':24s} {'wall':>8s}    {'peak RSS':>8s}      x floor   output  (1-min load average after each)"
    )
    from harness_merge.merge_loop import factor_threads, merge_threads

    threads = args.threads or sorted({1, 2, merge_threads(factor_threads())})
    for m in args.methods:
        spec = methods.get(m)
        kind = "api" if spec.lowrank_on_lora else "stream"
        for t in threads:
            r = median_of(kind, m, fresh_cache, adapters, threads=t)
            out = (
                f"LoRA rank {r['rank']}"
                if kind == "api"
                else f"{r['modules']} dense deltas (computed, not written)"
            )
            if kind == "api":
                wf = median_of("write", "-", fresh_cache, [r["bytes"]])["wall"]
                io_floor = floor["wall"] + wf
                out += f", {r['bytes'] / 2**20:.0f} MiB; I/O floor {io_floor:.2f} s -> {r['wall'] / io_floor:.2f}x"
            label = f"{m} ({t} thread{'s' if t > 1 else ''})"
            print(
                f"{label:24s} {r['wall']:8.2f} s  {r['peak_rss_mb']:8.0f} MiB  {r['wall'] / floor['wall']:8.2f}x   "
                f"{out}  (load {_load()}){r['runs']}"
            )
        if kind == "api":
            # the merge itself: no input hashing, cache or write (what is left is the I/O's)
            t_own = merge_threads(factor_threads())
            s_ = median_of("stream", m, fresh_cache, adapters, threads=t_own)
            label = f"{m} (merge only, {t_own}t)"
            print(
                f"{label:24s} {s_['wall']:8.2f} s  {s_['peak_rss_mb']:8.0f} MiB  {s_['wall'] / floor['wall']:8.2f}x   "
                f"computed, not hashed or written  (load {_load()}){s_['runs']}"
            )
            cache = fresh_cache()
            run_child("api", m, cache, adapters)
            hit = median_of("api", m, lambda c=cache: c, adapters, keep=True)
            shutil.rmtree(cache, ignore_errors=True)
            print(
                f"{m + ' (cached)':24s} {hit['wall']:8.2f} s  {hit['peak_rss_mb']:8.0f} MiB  {hit['wall'] / floor['wall']:8.2f}x"
                f"   (load {_load()}){hit['runs']}"
            )
        if m in ("ta", "wa") and not args.no_peers:
            shapes = {
                f"model.layers.{layer}.{mod}": s for layer in range(args.layers) for mod, s in SHAPES.items()
            }
            p = run_child("peft_cat", m, json.dumps(shapes), adapters)
            print(
                f"{'  peft cat (' + m + ')':24s} {p['wall']:8.2f} s  {p['peak_rss_mb']:8.0f} MiB  "
                f"{p['wall'] / floor['wall']:8.2f}x   add_weighted_adapter, rank {p['rank']}, not written  (load {_load()})"
                f"  -> ours ({t} thread{'s' if t > 1 else ''}) {r['wall'] / p['wall']:.2f}x PEFT's time"
            )
    if not args.no_peers:
        try:
            import mergekit  # noqa: F401

            print("mergekit merges full checkpoints only: scripts/bench_checkpoints.py compares with it")
        except ImportError:
            print("mergekit: not installed (optional; not in the main lock) - its comparison is skipped")
    if not args.workdir:  # the generated adapters too
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
