"""Full weights from a LoRA merge: peak RSS and wall time of the streaming
writer vs loading the base model and ``save_pretrained`` (the previous writer).

The base is a Llama with LLaVA-1.5-7B's (Vicuna-7B) shapes (hidden 4096, MLP
11008, vocab 32000, fp16) and ``--layers`` decoder layers, saved one shard per
``--layers-per-shard`` layers; 2 random rank-16 adapters on q,k,v,o,gate,up,down.
Each writer runs in its own subprocess, so peak RSS is per writer.

    python scripts/bench_full_weights.py                  # 4 layers (~2.1 GB base)
    python scripts/bench_full_weights.py --layers 32      # the full 7B (13.5 GB base, 27 GB of disk)
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

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
MODS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def make_base(d: Path, layers: int, per_shard: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (d / "config.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "float16"
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    groups = [list(range(i, min(i + per_shard, layers))) for i in range(0, layers, per_shard)]
    n = len(groups) + 1
    weight_map = {}
    for si, group in enumerate(groups):
        sd = {}
        if si == 0:
            sd["model.embed_tokens.weight"] = r(VOCAB, HIDDEN)
        for layer in group:
            p = f"model.layers.{layer}."
            for mod, shape in MODS.items():
                sd[p + mod + ".weight"] = r(*shape)
            sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
            sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        fn = f"model-{si + 1:05d}-of-{n:05d}.safetensors"
        save_file(sd, d / fn, metadata={"format": "pt"})
        weight_map.update({k: fn for k in sd})
        del sd
    fn = f"model-{n:05d}-of-{n:05d}.safetensors"
    sd = {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16), "lm_head.weight": r(VOCAB, HIDDEN)}
    save_file(sd, d / fn, metadata={"format": "pt"})
    weight_map.update({k: fn for k in sd})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def make_adapters(root: Path, layers: int, rank: int = 16, n: int = 2) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    out = []
    for i in range(n):
        d = root / f"ad{i}"
        out.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for layer in range(layers):
            for mod, (d_out, d_in) in MODS.items():
                k = f"base_model.model.model.layers.{layer}.{mod}"
                sd[k + ".lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).half()
                sd[k + ".lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).half()
        save_file(sd, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": [m.split(".")[-1] for m in MODS],
                }
            )
        )
    return out


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
kind, base, out, adapters = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
import torch, transformers, peft, harness_merge.api
from harness_merge.api import MergeSpec, merge
t0 = time.perf_counter()
if kind == "stream":
    merge(MergeSpec(adapters=tuple(adapters), method="ta", base=base, format="full"), use_cache=False, out=out, progress=False)
else:  # the previous writer: the whole base as a model, updates added in place, save_pretrained
    from harness_merge import methods
    from harness_merge.inputs import open_inputs
    from harness_merge.merge_loop import iter_merged
    spec = methods.get("ta"); params = spec.make_params({})
    inputs = open_inputs(adapters)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    named = dict(model.named_modules())
    with torch.no_grad():
        for name, res in iter_merged(inputs, spec, params, progress=False):
            w = named[name].weight
            w.copy_((w.float() + res.delta()).to(w.dtype))
    model.save_pretrained(str(out))
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layers-per-shard", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--writers", nargs="+", default=["stream", "load_and_save"])
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_full_"))
    t0 = time.perf_counter()
    base = make_base(
        work / f"base_l{args.layers}_s{args.layers_per_shard}", args.layers, args.layers_per_shard
    )
    ads = make_adapters(work / f"ads_l{args.layers}", args.layers)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    total = sum(p.stat().st_size for p in shards) / 2**20
    print(
        f"base: {args.layers} layers at 7B shapes, fp16, {len(shards)} shards, {total:.0f} MiB, largest shard "
        f"{largest:.0f} MiB; 2 adapters rank 16 (built in {time.perf_counter() - t0:.0f}s); load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'writer':16s} {'wall':>8s}  {'peak RSS':>9s}  {'RSS - largest shard':>20s}")
    for kind in args.writers:
        out = Path(tempfile.mkdtemp(prefix=f"out_{kind}_", dir=work)) / "merged"
        res = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(base), str(out), *map(str, ads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"{kind:16s} {r['wall']:8.1f}s {r['peak_rss_mb']:8.0f} MiB {r['peak_rss_mb'] - largest:14.0f} MiB"
            f"   (load {os.getloadavg()[0]:.1f})"
        )
        subprocess.run(["rm", "-rf", str(out.parent)], check=False)


if __name__ == "__main__":
    main()
