"""Brief CPU training for the demo: pre-train the tiny Qwen2-VL on a mixture,
then one LoRA adapter per synthetic task.

Seeded, single-digit threads, seconds per run. The loss covers the answer
tokens only (prompt masked with -100). Prompts are rendered with the model's
own chat template (image item first, then the text of
:func:`harness_merge.demo.data.prompt`), as an lmms-eval chat model does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from harness_merge.demo import data as ddata
from harness_merge.demo.tiny import load_processor

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def chat_text(processor, question_text: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,)
    pixel_values: torch.Tensor  # (patches, dim)
    image_grid_thw: torch.Tensor  # (1, 3)
    mm_token_type_ids: torch.Tensor  # (L,) 1 on image tokens (M-RoPE needs it)


def encode(processor, rows: list[dict]) -> list[Encoded]:
    """Prompt + answer + ``<|im_end|>`` per row, with the answer-only labels."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for r in rows:
        enc = processor(
            text=[chat_text(processor, ddata.prompt(r))], images=[r["image"]], return_tensors="pt"
        )
        p = enc["input_ids"][0]
        a = torch.tensor(tok(r["answer"], add_special_tokens=False)["input_ids"] + [end])
        ids = torch.cat([p, a])
        labels = torch.cat([torch.full_like(p, -100), a])
        mm = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(a)])
        out.append(Encoded(ids, labels, enc["pixel_values"], enc["image_grid_thw"], mm))
    return out


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    mm = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):  # right padding (training only)
        ids[i, : len(e.input_ids)] = e.input_ids
        mm[i, : len(e.input_ids)] = e.mm_token_type_ids
        labels[i, : len(e.labels)] = e.labels
        mask[i, : len(e.input_ids)] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "mm_token_type_ids": mm,
        "pixel_values": torch.cat([e.pixel_values for e in batch]),
        "image_grid_thw": torch.cat([e.image_grid_thw for e in batch]),
    }


def fit(
    model, examples: list[Encoded], pad_id: int, *, steps: int, lr: float, batch_size: int = 16, seed: int = 0
):
    """AdamW on the trainable parameters, cosine-free constant LR; returns the loss history."""
    rnd = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rnd.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**collate([examples[i] for i in idx], pad_id)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def greedy_answers(
    model, processor, rows: list[dict], *, max_new_tokens: int = 6, batch_size: int = 32
) -> list[str]:
    """Greedy answers for ``rows`` (left-padded batches), special tokens removed."""
    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"
    outs: list[str] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        enc = processor(
            text=[chat_text(processor, ddata.prompt(r)) for r in chunk],
            images=[r["image"] for r in chunk],
            return_tensors="pt",
            padding=True,
        )
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in outs]


def accuracy(model, processor, rows: list[dict]) -> float:
    preds = greedy_answers(model, processor, rows)
    return sum(ddata.score(p, r["answer"]) for p, r in zip(preds, rows)) / max(len(rows), 1)


def _load(base_dir):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(base_dir)
    return model, load_processor(base_dir)


def pretrain_base(
    base_dir,
    out_dir,
    *,
    n_caption: int = 384,
    n_per_task: int = 16,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Briefly train all weights of the tiny model on captions ("red circle",
    "three shapes") plus a few rows of each demo task.

    The base learns the answer formats and some of each skill (well under the
    adapters); an adapter trained on one task then forgets the others, which
    is the situation merging is for."""
    from harness_merge.demo.tiny import save_model

    model, processor = _load(base_dir)
    rows = ddata.make_rows("caption", n_caption, seed=seed + 100)
    for t in ddata.DEMO_TASKS:
        rows += ddata.make_rows(t, n_per_task, seed=seed + 100)
    fit(model, encode(processor, rows), processor.tokenizer.pad_token_id, steps=steps, lr=lr, seed=seed)
    return save_model(model, processor, out_dir)


def train_lora(
    base_dir,
    task: str,
    out_dir,
    *,
    n_train: int = 192,
    steps: int = 200,
    lr: float = 5e-3,
    rank: int = 8,
    alpha: int = 16,
    targets=LORA_TARGETS,
    seed: int = 0,
) -> Path:
    """Train a PEFT LoRA adapter on one demo task and save it to ``out_dir``."""
    from peft import LoraConfig, get_peft_model

    model, processor = _load(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    pm = get_peft_model(model, cfg)
    rows = ddata.make_rows(task, n_train, seed=seed + 1000)
    fit(pm, encode(processor, rows), processor.tokenizer.pad_token_id, steps=steps, lr=lr, seed=seed)
    out = Path(out_dir)
    pm.save_pretrained(out)
    return out
