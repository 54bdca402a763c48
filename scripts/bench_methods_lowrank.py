"""Factor-space vs dense path of tsv / iso_c / iso_cts / wudi on one module.

For N LoRA adapters of rank r at LLaVA-7B-like module shapes, times the merge of
one module through the factor path (``ModuleInputs(lora=...)``: QR of stacked
factors, SVDs of the (N r x N r) core) and the dense path (the same updates
given as full task vectors, as full checkpoints would be), and reports wall
time and peak RSS side by side with ratios. Every measurement runs in its own
subprocess so that ``ru_maxrss`` (peak resident set) belongs to it alone;
``base`` is the RSS after the inputs are built, ``peak`` the maximum during
the merge.

Dense WUDI costs ~m n^2 flops per Adam step; with ``--dense-wudi-iters`` k
(default 2) it runs k steps and extrapolates to ``--wudi-iters`` from a timed
single step (marked ``~``).

    python scripts/bench_methods_lowrank.py                      # 4096x4096 and 11008x4096
    python scripts/bench_methods_lowrank.py --shapes 1024x1024 --methods tsv,iso_c
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(
    method: str,
    shape: str,
    path: str,
    n: int,
    rank: int,
    wudi_iters: int,
    dense_wudi_iters: int,
) -> dict:
    import torch

    from harness_merge.methods import get, module_generator
    from harness_merge.types import LoRAFactors, ModuleInputs

    d_out, d_in = (int(x) for x in shape.split("x"))
    g = torch.Generator().manual_seed(0)
    lora = tuple(
        LoRAFactors(
            torch.randn(rank, d_in, generator=g) / d_in**0.5,
            torch.randn(d_out, rank, generator=g) * 0.01,
            2.0,
        )
        for _ in range(n)
    )
    if path == "factor":
        inp = ModuleInputs("model.layers.0.mlp", lora=lora)
    else:
        inp = ModuleInputs("model.layers.0.mlp", task_vectors=tuple(f.delta() for f in lora))
        del lora
    spec = get(method)
    params = {}
    iters = wudi_iters
    if method == "wudi":
        iters = wudi_iters if path == "factor" else min(dense_wudi_iters, wudi_iters)
        params["iterations"] = iters
    p = spec.make_params(params)
    base = _rss_mib()
    t0 = time.perf_counter()
    res = spec.fn(inp, p, generator=module_generator(0, inp.name))
    wall = time.perf_counter() - t0
    out = {
        "wall_s": wall,
        "base_mib": base,
        "peak_mib": _peak_mib(),
        "result": type(res).__name__,
        "rank": getattr(res, "rank", None),
        "iters": iters,
        "extrapolated": False,
    }
    if method == "wudi" and iters < wudi_iters:
        # one gradient step of the dense path: x @ G - H with G (d_in x d_in)
        x = torch.randn(d_out, d_in)
        G = torch.randn(d_in, d_in)
        H = torch.randn(d_out, d_in)
        step = float("inf")
        for _ in range(3):
            t1 = time.perf_counter()
            _ = 2.0 * (x @ G - H)
            step = min(step, time.perf_counter() - t1)
        out["wall_s"] = wall + (wudi_iters - iters) * step
        out["extrapolated"] = True
        out["step_s"] = step
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--methods", default="tsv,iso_c,iso_cts,wudi")
    ap.add_argument("--paths", default="factor,dense")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--wudi-iters", type=int, default=300)
    ap.add_argument("--dense-wudi-iters", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        m, s, pth, n, r, wi, dwi = a.child
        print(json.dumps(child(m, s, pth, int(n), int(r), int(wi), int(dwi))))
        return

    rows = []
    print(
        f"N={a.n} adapters, rank {a.rank}; torch threads from the environment",
        flush=True,
    )
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            row = {"shape": shape, "method": method}
            for path in a.paths.split(","):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    method,
                    shape,
                    path,
                    str(a.n),
                    str(a.rank),
                    str(a.wudi_iters),
                    str(a.dense_wudi_iters),
                ]
                try:
                    cp = subprocess.run(
                        cmd,
                        capture_output=True,
                        text=True,
                        timeout=a.timeout,
                        check=False,
                    )
                    row[path] = (
                        json.loads(cp.stdout.strip().splitlines()[-1])
                        if cp.returncode == 0
                        else {
                            "error": cp.stderr.strip().splitlines()[-1]
                            if cp.stderr.strip()
                            else f"rc {cp.returncode}"
                        }
                    )
                except subprocess.TimeoutExpired:
                    row[path] = {"error": f"timeout after {a.timeout:.0f}s"}
                print(f"  {shape} {method} {path}: {row[path]}", flush=True)
            rows.append(row)

    def fmt_t(d):
        if "error" in d:
            return d["error"][:28]
        return ("~" if d.get("extrapolated") else "") + f"{d['wall_s']:.2f}s"

    def fmt_m(d):
        return "-" if "error" in d else f"{d['base_mib']:.0f}/{d['peak_mib']:.0f}"

    print()
    print(
        f"{'shape':>11} {'method':>8} | {'factor time':>11} {'dense time':>11} {'speedup':>8} | "
        f"{'factor MiB base/peak':>20} {'dense MiB base/peak':>20} {'extra-mem ratio':>15}"
    )
    for row in rows:
        f, d = row.get("factor", {"error": "-"}), row.get("dense", {"error": "-"})
        sp = mr = "-"
        if "error" not in f and "error" not in d:
            sp = f"{d['wall_s'] / max(f['wall_s'], 1e-9):.0f}x"
            fe = max(f["peak_mib"] - f["base_mib"], 1.0)
            de = max(d["peak_mib"] - d["base_mib"], 1.0)
            mr = f"{de / fe:.0f}x"
        print(
            f"{row['shape']:>11} {row['method']:>8} | {fmt_t(f):>11} {fmt_t(d):>11} {sp:>8} | "
            f"{fmt_m(f):>20} {fmt_m(d):>20} {mr:>15}"
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
