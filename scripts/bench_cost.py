"""How good is the cost pre-check's estimate? Times real float64 SVDs (the
writer's) and float32 matmuls against harness_merge.cost's prediction, then
prints the estimate for ties on LoRA without --base over one Qwen2-7B layer
and over the whole model.

    python scripts/bench_cost.py [--sizes 512x512 1024x1024 2048x1024]
"""

from __future__ import annotations

import argparse
import time

import torch

from harness_merge import cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["768x768", "1536x768", "1536x1536"])
    args = ap.parse_args()
    print(
        f"threads={torch.get_num_threads()} svd_rate={cost._svd_rate():.3g} flop/s "
        f"matmul_rate={cost._matmul_rate():.3g} flop/s"
    )
    for s in args.sizes:
        m, n = map(int, s.split("x"))
        x = torch.randn(m, n, dtype=torch.float64)
        t0 = time.perf_counter()
        torch.linalg.svd(x, full_matrices=False)
        real = time.perf_counter() - t0
        pred = m * n * min(m, n) / cost._svd_rate()
        print(f"svd {m}x{n}: measured {real:.3f} s, predicted {pred:.3f} s (ratio {pred / real:.2f})")
    # Qwen2-7B: hidden 3584, intermediate 18944, 4 kv heads of 128 -> k/v 512.
    layer = [
        (3584, 3584),
        (512, 3584),
        (512, 3584),
        (3584, 3584),
        (18944, 3584),
        (18944, 3584),
        (3584, 18944),
    ]
    per_layer = sum(m * n * min(m, n) for m, n in layer) / cost._svd_rate()
    print(
        f"ties on LoRA without --base, Qwen2-7B: predicted {per_layer:.0f} s per layer, "
        f"{per_layer * 28 / 3600:.1f} h for 28 layers (limit {cost.max_seconds():.0f} s)"
    )


if __name__ == "__main__":
    main()
