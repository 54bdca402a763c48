"""Gap between each method's default (the reference code's semantics) and its
named variants: relative Frobenius ||variant - default|| / ||default|| of the
merged delta, on random LoRA adapters and task vectors. Prints one line per
(method, variant).

    OMP_NUM_THREADS=1 python scripts/bench_method_variants.py [--d 256] [--r 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from harness_merge import methods
from harness_merge.merge_loop import iter_merged
from harness_merge.types import LoRAFactors, ModuleInputs


class _Set:
    """In-memory input set of a few modules (the driver's duck-typed interface)."""

    def __init__(self, mods, kind):
        self.mods, self.kind = mods, kind
        self.refs = [f"in{i}" for i in range(next(iter(mods.values())).n)]

    @property
    def module_names(self):
        return list(self.mods)

    def is_matrix(self, name):
        return True

    def shape(self, name):
        return self.mods[name].shape

    def read(self, name):
        return self.mods[name]


def _lora(n, d, r, modules, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for j in range(modules):
        mods[f"m{j}"] = ModuleInputs(
            f"m{j}",
            lora=tuple(
                LoRAFactors(
                    (torch.randn(r, d, generator=g) * 0.02).to(dtype).float(),
                    (torch.randn(d, r, generator=g) * 0.002 * (1 + j)).to(dtype).float(),
                    2.0,
                )
                for _ in range(n)
            ),
        )
    return mods


def _merged(name, inputs, params):
    spec = methods.get(name)
    p = spec.make_params(params)
    out = {}
    for k, res in iter_merged(inputs, spec, p, progress=False):
        out[k] = res.delta() if hasattr(res, "A") else res.delta
    return torch.cat([out[k].reshape(-1) for k in inputs.module_names])


CASES = [
    ("copa", {"keep_rule": "exact"}, "lora"),
    ("ties", {"keep_rule": "released"}, "lora"),
    ("dare_ties", {"prune_rate": "0", "zero_sign": "positive"}, "lora"),
    ("tsv", {"spectrum": "numerical_rank"}, "lora"),
    ("iso_c", {"spectrum": "numerical_rank"}, "lora"),
    ("iso_cts", {"spectrum": "numerical_rank"}, "lora"),
    ("wudi", {"space": "factor"}, "lora"),
    ("wudi2", {"recipe": "by_input"}, "dense"),
    ("wudi2", {"recipe": "internvl"}, "lora"),
    ("pcb", {"scope": "module"}, "lora"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--modules", type=int, default=3)
    ap.add_argument("--wudi-iterations", type=int, default=300)
    args = ap.parse_args()
    print(f"{args.n} inputs, {args.modules} modules of {args.d}x{args.d}, LoRA rank {args.r}")
    for dtype in (torch.float32, torch.bfloat16):
        lora = _lora(args.n, args.d, args.r, args.modules, dtype)
        dense = {k: ModuleInputs(k, task_vectors=tuple(m.deltas())) for k, m in lora.items()}
        for name, variant, kind in CASES:
            inputs = _Set(lora if kind == "lora" else dense, kind)
            extra = {"iterations": str(args.wudi_iterations)} if name.startswith("wudi") else {}
            t0 = time.perf_counter()
            a = _merged(name, inputs, extra)
            t1 = time.perf_counter()
            b = _merged(name, inputs, {**extra, **variant})
            t2 = time.perf_counter()
            gap = float((b - a).norm() / a.norm())
            v = " ".join(f"{k}={x}" for k, x in variant.items())
            print(
                f"{str(dtype)[6:]:9s} {name:9s} {kind:5s} variant {v:34s} gap {gap:.3g}  "
                f"(default {t1 - t0:.2f} s, variant {t2 - t1:.2f} s)"
            )


if __name__ == "__main__":
    main()
