"""Train the mini-benchmark's models: a tiny Qwen2-VL base and one LoRA expert per seen task.

::

    OMP_NUM_THREADS=1 python -m harness_merge.minibench.build --out benchmarks/minibench/models

1. a tiny Qwen2-VL (hidden 64, 2 layers, ~0.2M parameters) built from a config,
   every weight pre-trained on a mixture: captions ("red circle", "three
   shapes") and a few rows of each seen task, so the base knows the answer
   formats and a little of each skill;
2. one PEFT LoRA expert per seen task (colour, shape, count, size), trained on
   that task alone, *gently*: a small learning rate (1.5e-4), so the task vector
   stays small (mean |delta W| 3-4e-3, 8-11% of the mean |W|; recorded per expert in
   ``build_info.json``) and summing four of them at the papers' default lambda
   does not wipe the model out, as with real fine-tunes. The base pre-training
   sees 24 rows of each seen task, so it knows a part of each skill that the
   experts sharpen;
3. an in-process check: exact-match accuracy of the base and of each expert on
   the evaluation rows of every task (the rows of ``task_configs/minibench``),
   written with the timings to ``OUT/build_info.json``.

Deterministic given ``--seed``: seeded data and initialisation, one thread,
``torch.use_deterministic_algorithms(True)``. A few minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from harness_merge.minibench import data as mdata

EVAL_SEED = 7  # the rows of task_configs/minibench/*.parquet
EVAL_DOCS = 200  # per task: one doc is 0.5 points, a paired test sees a 5-point drop


def _log(msg: str) -> None:
    print(f"[minibench.build] {msg}", file=sys.stderr, flush=True)


def deterministic(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def task_vector_size(base_dir, expert_dir) -> dict:
    """How far an expert moves the weights: mean |delta W| over the LoRA-targeted
    matrices (delta W = scale * B A), the mean |W| of those matrices in the base, and
    their ratio. Real fine-tunes are gentle (the MLLM-merging benchmark, Fig. 2:
    |delta| ~1e-3 for full fine-tunes, 1e-4..1e-5 for LoRA)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(expert_dir) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    ad = load_file(Path(expert_dir) / "adapter_model.safetensors")
    base = load_file(Path(base_dir) / "model.safetensors")
    d_sum = w_sum = count = 0.0
    for k, a in ad.items():
        if ".lora_A." not in k:
            continue
        delta = scale * (ad[k.replace(".lora_A.", ".lora_B.")].double() @ a.double())
        name = k.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
        w = base.get(name, base.get(name.replace("model.language_model.", "model.", 1)))
        if w is None:
            raise KeyError(f"{expert_dir}: no base weight for {k}")
        d_sum += float(delta.abs().sum())
        w_sum += float(w.double().abs().sum())
        count += delta.numel()
    return {"mean_abs_delta": d_sum / count, "mean_abs_weight": w_sum / count, "ratio": d_sum / w_sum}


def eval_rows(task: str, n: int = EVAL_DOCS) -> list[dict]:
    return mdata.make_rows(task, n, seed=EVAL_SEED)


def accuracies(model, processor, tasks, n: int = EVAL_DOCS) -> dict[str, float]:
    """Exact-match score (0-100) per task on the evaluation rows."""
    from harness_merge.demo.train import greedy_answers

    out = {}
    for t in tasks:
        rows = eval_rows(t, n)
        preds = greedy_answers(model, processor, rows, max_new_tokens=16)
        out[t] = sum(mdata.score(p, r["answer"]) for p, r in zip(preds, rows)) / len(rows)
    return out


def pretrain(
    raw_dir, out_dir, *, steps: int, n_caption: int, n_per_task: int, n_unseen: int, lr: float, seed: int
) -> Path:
    from transformers import Qwen2VLForConditionalGeneration

    from harness_merge.demo.tiny import load_processor, save_model
    from harness_merge.demo.train import encode, fit

    model = Qwen2VLForConditionalGeneration.from_pretrained(raw_dir)
    processor = load_processor(raw_dir)
    rows = mdata.make_rows("caption", n_caption, seed=seed + 100)
    for t in mdata.SEEN:
        rows += mdata.make_rows(t, n_per_task, seed=seed + 100)
    for t in mdata.UNSEEN:  # the format of the unseen questions, a few rows each; no expert sees them
        rows += mdata.make_rows(t, n_unseen, seed=seed + 100)
    losses = fit(
        model, encode(processor, rows), processor.tokenizer.pad_token_id, steps=steps, lr=lr, seed=seed
    )
    _log(f"pre-train loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    return save_model(model, processor, out_dir)


def train_expert(
    base_dir, task: str, out_dir, *, steps: int, n_train: int, lr: float, rank: int, alpha: int, seed: int
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    from harness_merge.demo.tiny import load_processor
    from harness_merge.demo.train import LORA_TARGETS, encode, fit

    model = Qwen2VLForConditionalGeneration.from_pretrained(base_dir)
    processor = load_processor(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none"
    )
    pm = get_peft_model(model, cfg)
    rows = mdata.make_rows(task, n_train, seed=seed + 1000)
    losses = fit(pm, encode(processor, rows), processor.tokenizer.pad_token_id, steps=steps, lr=lr, seed=seed)
    _log(f"expert {task}: loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    out = Path(out_dir)
    pm.save_pretrained(out)
    # PEFT records the absolute base path of this machine; the grid names the base itself
    cfg_path = out / "adapter_config.json"
    c = json.loads(cfg_path.read_text())
    c["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model card template
    return out


CHECK_DOCS = 100  # docs per task of the in-process check (the leaderboard uses all EVAL_DOCS)


def build(
    out: Path,
    *,
    pretrain_steps: int = 200,
    expert_steps: int = 200,
    n_caption: int = 384,
    n_per_task: int = 24,
    n_unseen: int = 8,
    n_train: int = 256,
    rank: int = 8,
    alpha: int = 16,
    pretrain_lr: float = 3e-3,
    expert_lr: float = 1.5e-4,
    seed: int = 0,
    experts=mdata.SEEN,
    check: bool = True,
    threads: int = 1,
    eval_docs: int = CHECK_DOCS,
) -> dict:
    """Build base + experts under ``out`` (``out/base``, ``out/experts/<task>``); returns the build info."""
    deterministic(threads)
    from harness_merge.demo.tiny import build_tiny_qwen2vl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw = build_tiny_qwen2vl(out / "_raw", seed=seed)
    pretrain(
        raw,
        out / "base",
        steps=pretrain_steps,
        n_caption=n_caption,
        n_per_task=n_per_task,
        n_unseen=n_unseen,
        lr=pretrain_lr,
        seed=seed,
    )
    shutil.rmtree(raw)
    timings = {"pretrain_s": round(time.perf_counter() - t0, 1)}
    sizes: dict[str, dict] = {}
    _log(f"base pre-trained {pretrain_steps} steps ({timings['pretrain_s']}s)")
    for task in experts:
        t = time.perf_counter()
        train_expert(
            out / "base",
            task,
            out / "experts" / task,
            steps=expert_steps,
            n_train=n_train,
            lr=expert_lr,
            rank=rank,
            alpha=alpha,
            seed=seed,
        )
        timings[f"expert_{task}_s"] = round(time.perf_counter() - t, 1)
        size = task_vector_size(out / "base", out / "experts" / task)
        sizes[task] = {k: float(f"{v:.4g}") for k, v in size.items()}
        _log(
            f"expert {task} trained {expert_steps} steps ({timings[f'expert_{task}_s']}s); mean |dW| "
            f"{size['mean_abs_delta']:.2e} = {100 * size['ratio']:.1f}% of mean |W|"
        )
    info = {
        "seed": seed,
        "settings": {
            "pretrain_steps": pretrain_steps,
            "expert_steps": expert_steps,
            "n_caption": n_caption,
            "n_per_task": n_per_task,
            "n_unseen": n_unseen,
            "n_train": n_train,
            "rank": rank,
            "alpha": alpha,
            "pretrain_lr": pretrain_lr,
            "expert_lr": expert_lr,
        },
        "train_seconds": round(time.perf_counter() - t0, 1),
        "timings": timings,
        "task_vector_size": sizes,
    }
    if check:
        from peft import PeftModel
        from transformers import Qwen2VLForConditionalGeneration

        from harness_merge.demo.tiny import load_processor

        t = time.perf_counter()
        processor = load_processor(out / "base")
        tasks = list(mdata.TASKS)
        acc = {
            "base": accuracies(
                Qwen2VLForConditionalGeneration.from_pretrained(out / "base"), processor, tasks, eval_docs
            )
        }
        for task in experts:
            m = PeftModel.from_pretrained(
                Qwen2VLForConditionalGeneration.from_pretrained(out / "base"), out / "experts" / task
            )
            acc[f"expert:{task}"] = accuracies(m, processor, tasks, eval_docs)
        info["accuracy"] = acc
        info["check_seconds"] = round(time.perf_counter() - t, 1)
        head = f"{'model':16s}" + "".join(f"{x[:11]:>12s}" for x in tasks)
        _log(
            "in-process exact match (0-100) on the evaluation rows:\n"
            + head
            + "\n"
            + "\n".join(f"{k:16s}" + "".join(f"{v[x]:12.1f}" for x in tasks) for k, v in acc.items())
        )
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m harness_merge.minibench.build", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/minibench/models"))
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--expert-steps", type=int, default=200)
    p.add_argument(
        "--expert-lr",
        type=float,
        default=1.5e-4,
        help="experts' AdamW learning rate (gentle: small task vectors)",
    )
    p.add_argument(
        "--n-per-task", type=int, default=24, help="rows of each seen task in the base's pre-training"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument(
        "--experts", default=",".join(mdata.SEEN), help="comma-separated seen tasks to train experts on"
    )
    p.add_argument("--no-check", action="store_true", help="skip the in-process accuracy table")
    a = p.parse_args(argv)
    experts = tuple(x for x in a.experts.split(",") if x)
    bad = [x for x in experts if x not in mdata.SEEN]
    if bad:
        p.error(f"unknown expert task(s) {bad}; seen tasks: {list(mdata.SEEN)}")
    build(
        a.out,
        pretrain_steps=a.pretrain_steps,
        expert_steps=a.expert_steps,
        expert_lr=a.expert_lr,
        n_per_task=a.n_per_task,
        rank=a.rank,
        alpha=a.alpha,
        seed=a.seed,
        experts=experts,
        check=not a.no_check,
        threads=a.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
