#!/usr/bin/env python
"""Timings of the harness path on the tiny offline example (CPU).

Builds a tiny Qwen2-VL with two random LoRA adapters, then prints:
model load time (hf backend), merge time cold and cached (copa), and the hf
backend's samples/s for image generation and image loglikelihood.

    python scripts/bench_harness.py [--n 16] [--batch-sizes 1,4] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="requests per throughput measurement")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--method", default="copa")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from harness_merge.api import MergeSpec, merge
    from harness_merge.backends import GenRequest, LLRequest, load_backend
    from harness_merge.demo.tiny import build_tiny_qwen2vl, random_lora

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        base = build_tiny_qwen2vl(t / "base", seed=0)
        ads = [str(random_lora(base, t / f"lora{i}", rank=8, alpha=16, seed=i)) for i in (1, 2)]
        spec = MergeSpec(adapters=tuple(ads), method=args.method, base=str(base))

        t0 = time.perf_counter()
        art = merge(spec, cache_dir=t / "cache", progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        art2 = merge(spec, cache_dir=t / "cache", progress=False)
        cached = time.perf_counter() - t0
        assert not art.cache_hit and art2.cache_hit

        t0 = time.perf_counter()
        load_backend("hf", None, str(base), dtype="float32").close()
        load_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        be = load_backend("hf", art, str(base), dtype="float32")
        load_merged = time.perf_counter() - t0

        print(f"torch threads: {torch.get_num_threads()}; method={args.method}; artifact={art.kind}")
        print(f"merge cold:            {cold * 1000:8.1f} ms")
        print(f"merge cached:          {cached * 1000:8.1f} ms")
        print(f"load base (hf):        {load_base * 1000:8.1f} ms")
        print(f"load base+LoRA (hf):   {load_merged * 1000:8.1f} ms")

        colors = [(i * 37 % 256, i * 91 % 256, i * 53 % 256) for i in range(args.n)]

        def msgs(i):
            return (
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": f"Question {i}: is it red?"},
                    ],
                },
            )

        gen = [
            GenRequest(
                messages=msgs(i), images=(Image.new("RGB", (56, 56), c),), max_new_tokens=args.max_new_tokens
            )
            for i, c in enumerate(colors)
        ]
        ll = [
            LLRequest(continuation=" yes", messages=msgs(i), images=(Image.new("RGB", (56, 56), c),))
            for i, c in enumerate(colors)
        ]
        for fold in (False, True):
            b = load_backend("hf", art, str(base), dtype="float32", fold=fold)
            for bs in [int(x) for x in args.batch_sizes.split(",")]:
                b.batch_size = bs
                b.generate(gen[:2])  # warm-up
                t0 = time.perf_counter()
                b.generate(gen)
                g = args.n / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                b.loglikelihood(ll)
                lps = args.n / (time.perf_counter() - t0)
                print(
                    f"hf {'folded' if fold else 'PEFT  '} batch {bs}: generate {g:7.1f} samples/s "
                    f"({args.max_new_tokens} new tokens), loglikelihood {lps:7.1f} samples/s"
                )
            b.close()
        be.close()


if __name__ == "__main__":
    main()
