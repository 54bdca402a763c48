"""Prompt and scoring functions for the MM-MergeBench task configs (lmms-eval 0.7.3).

MM-MergeBench is the benchmark of CoPA-Merging / RobustMerge (arXiv 2502.17159):
eight "seen" tasks the adapters are trained on and four "unseen" ones. The
instruction appended to every prompt is the paper's Table 8, quoted verbatim in
``INSTRUCTIONS`` below.

Every task reports one metric named ``score`` on a 0-100 scale, so the group
configs (``mm_mergebench_seen``, ``mm_mergebench_unseen``, ``mm_mergebench``)
can average it across tasks with ``aggregate_metric_list``:

- multiple choice (ScienceQA, AOKVQA): letter accuracy x 100;
- short answer (OCRVQA, IconQA, TabMWP): normalised exact match x 100
  (TabMWP also accepts numerically equal answers);
- classification (ImageNet, ImageNet-R): the authors' containment rule
  (prediction contains the label or the label contains the prediction,
  case-insensitive; an empty prediction is wrong) x 100;
- VQAv2: the standard VQA accuracy (lmms-eval's own ``vqav2_process_results``) x 100;
- grounding (REC-COCO): IoU >= 0.5 accuracy x 100, boxes in LLaVA-1.5's
  convention (normalised to the image padded to a square), plus a mean ``iou``;
- captions (VizWiz-caption, Flickr30k, Screen2Words): corpus CIDEr-D x 100
  (pycocoevalcap's ``Cider``). CIDEr is not bounded by 100. The paper's caption
  number is the mean of BLEU-1..4, METEOR, ROUGE-L and CIDEr; see README.md.

This file is loaded by lmms-eval through ``!function utils.<name>`` (as a bare
module file, not as part of a package), so it imports only lmms-eval and
third-party modules.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Iterable

from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_preprocess_dataset
from lmms_eval.tasks.scienceqa.utils import sqa_process_results
from lmms_eval.tasks.vqav2.utils import vqav2_process_results as _vqav2_builtin

from harness_merge.task_utils import box_iou

SCALE = 100.0

# Table 8 of the RobustMerge paper, verbatim.
INSTRUCTIONS = {
    "scienceqa": "Answer with the option's letter from the given choices directly.",
    "imagenet": "What is the object in the image? Answer the question using a single word or phrase.",
    "vqav2": "Answer the question using a single word or phrase.",
    "grounding": "Please provide the bounding box coordinate of the region this sentence describes: <description>.",
    "iconqa": "Answer the question using a single word or phrase.",
    "vizwiz": "What is happening in the image? Generate a brief caption for the image.",
    "flickr30k": "What is happening in the image? Generate a brief caption for the image.",
    "ocrvqa": "Answer the question using a single word or phrase.",
    "aokvqa": "Answer with the option's letter from the given choices directly.",
    "imagenet_r": "What is the object in the image?",
    "screen2words": "You are given a phone UI screen. Describe the screen in one sentence.",
    "tabmwp": "Answer the question using a single word or phrase.",
}


# --------------------------------------------------------------------------- shared helpers


def doc_to_visual(doc: dict) -> list:
    """The single ``image`` column as an RGB PIL image."""
    return [doc["image"].convert("RGB")]


def normalize_answer(text: Any) -> str:
    """Lower-case, trim, collapse whitespace and drop one trailing period."""
    text = " ".join(str(text).strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _options_block(choices: Iterable[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))


def letter_correct(pred: str, target_letter: str, n_choices: int) -> bool:
    """True when ``pred`` names ``target_letter`` ("B", "B.", "(B)", "B. text", "The answer is B")."""
    pred = pred.strip()
    letters = "".join(chr(ord("A") + i) for i in range(n_choices))
    m = re.match(rf"^\(?([{letters}])\)?(?:[.:)\s]|$)", pred)
    if m is None:
        m = re.search(rf"answer is:?\s*\(?([{letters}])\)?\b", pred, flags=re.IGNORECASE)
    return m is not None and m.group(1) == target_letter


def contains_match(pred: str, labels: Iterable[str]) -> bool:
    """The authors' classification rule: label in prediction or prediction in label.

    Case-insensitive; underscores count as spaces; an empty prediction never
    matches (in the released script an empty string would match every label).
    """
    pred = normalize_answer(pred).replace("_", " ")
    if not pred:
        return False
    for label in labels:
        label = normalize_answer(label).replace("_", " ")
        if label and (label in pred or pred in label):
            return True
    return False


_NUM_STRIP = str.maketrans("", "", "$,% ")


def _to_number(text: str) -> float | None:
    try:
        value = float(text.translate(_NUM_STRIP))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- multiple choice


def scienceqa_process_results(doc: dict, results: list[str]) -> dict:
    """lmms-eval's ScienceQA rule (exact letter or "X." prefix), scaled to 0-100."""
    return {"score": SCALE * sqa_process_results(doc, results)["exact_match"]}


def aokvqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    post = kw.get("post_prompt", "\n" + INSTRUCTIONS["aokvqa"])
    return f"{kw.get('pre_prompt', '')}{doc['question']}\n{_options_block(doc['choices'])}{post}"


def aokvqa_doc_to_target(doc: dict) -> str:
    return chr(ord("A") + int(doc["correct_choice_idx"]))


def aokvqa_process_results(doc: dict, results: list[str]) -> dict:
    ok = letter_correct(results[0], aokvqa_doc_to_target(doc), len(doc["choices"]))
    return {"score": SCALE * ok}


# --------------------------------------------------------------------------- classification


def imagenet_process_docs(dataset):
    """Add ``answer``: the class names of the integer ``label`` (ILSVRC/imagenet-1k ClassLabel).

    ImageNet names list synonyms ("tench, Tinca tinca"); any of them counts.
    """
    feature = dataset.features.get("label")
    names = getattr(feature, "names", None)

    def _add(doc):
        label = doc["label"]
        name = names[label] if names is not None and isinstance(label, int) else str(label)
        return {"answer": [s.strip() for s in name.split(",") if s.strip()]}

    return dataset.map(_add)


def imagenet_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{INSTRUCTIONS['imagenet']}{kw.get('post_prompt', '')}"


def imagenet_doc_to_target(doc: dict) -> str:
    return doc["answer"][0]


def imagenet_process_results(doc: dict, results: list[str]) -> dict:
    return {"score": SCALE * contains_match(results[0], doc["answer"])}


def imagenet_r_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{INSTRUCTIONS['imagenet_r']}{kw.get('post_prompt', '')}"


def imagenet_r_labels(doc: dict) -> list[str]:
    """axiong/imagenet-r names the class in ``class_name`` (older copies: ``label``)."""
    name = doc.get("class_name") or doc.get("label")
    return [s.strip() for s in str(name).split(",") if s.strip()]


def imagenet_r_doc_to_target(doc: dict) -> str:
    return imagenet_r_labels(doc)[0]


def imagenet_r_process_results(doc: dict, results: list[str]) -> dict:
    return {"score": SCALE * contains_match(results[0], imagenet_r_labels(doc))}


# --------------------------------------------------------------------------- short answer


def vqav2_process_results(doc: dict, results: list[str]) -> dict:
    """VQA accuracy (min(#humans that said it / 3, 1), averaged over leave-one-out) x 100."""
    doc = {**doc, "answers": [dict(a) for a in doc.get("answers") or []]}
    return {"score": SCALE * _vqav2_builtin(doc, results)["exact_match"]}


def explode_qa(dataset, list_columns: tuple[str, str] = ("questions", "answers")):
    """One row per (question, answer) pair of per-image lists, other columns repeated.

    Images are carried as undecoded bytes while exploding, so nothing is decoded here.
    """
    from datasets import Image

    q_col, a_col = list_columns
    image_cols = [k for k, f in dataset.features.items() if isinstance(f, Image)]
    for col in image_cols:
        dataset = dataset.cast_column(col, Image(decode=False))
    keep = [k for k in dataset.column_names if k not in (q_col, a_col)]

    def _explode_batch(batch):
        out = {k: [] for k in keep + ["question", "answer", "qa_index"]}
        for i, (qs, ans) in enumerate(zip(batch[q_col], batch[a_col])):
            for j, (q, a) in enumerate(zip(qs, ans)):
                for k in keep:
                    out[k].append(batch[k][i])
                out["question"].append(q)
                out["answer"].append(a)
                out["qa_index"].append(j)
        return out

    dataset = dataset.map(_explode_batch, batched=True, remove_columns=dataset.column_names)
    for col in image_cols:
        dataset = dataset.cast_column(col, Image(decode=True))
    return dataset


def ocrvqa_process_docs(dataset):
    """howard-hou/OCR-VQA keeps several questions per cover image: explode to one per row."""
    if "question" in dataset.column_names:
        return dataset
    return explode_qa(dataset, ("questions", "answers"))


def short_answer_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    post = kw.get("post_prompt", "\n" + INSTRUCTIONS["ocrvqa"])
    return f"{kw.get('pre_prompt', '')}{doc['question']}{post}"


def exact_match_process_results(doc: dict, results: list[str]) -> dict:
    targets = _as_list(doc["answer"])
    pred = normalize_answer(results[0])
    return {"score": SCALE * any(pred == normalize_answer(t) for t in targets)}


def iconqa_process_docs(dataset):
    """Keep the single-image question types (``choose_txt``, ``fill_in_blank``).

    ``choose_img`` questions answer with one of several extra images, which a
    single-image LLaVA-style model (the paper's base) cannot take.
    """
    return dataset.filter(lambda d: d["ques_type"] != "choose_img")


def iconqa_doc_to_visual(doc: dict) -> list:
    return [doc["query_image"].convert("RGB")]


def iconqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    post = kw.get("post_prompt", "\n" + INSTRUCTIONS["iconqa"])
    text = doc["question"]
    choices = [c.strip() for c in str(doc.get("choices") or "").split(",") if c.strip()]
    if doc.get("ques_type") == "choose_txt" and choices:
        text += "\nChoices: " + ", ".join(choices)
    return f"{kw.get('pre_prompt', '')}{text}{post}"


def tabmwp_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    post = kw.get("post_prompt", "\n" + INSTRUCTIONS["tabmwp"])
    text = doc["question"]
    options = _as_list(doc.get("options"))
    if options:
        text += "\nChoices: " + ", ".join(options)
    return f"{kw.get('pre_prompt', '')}{text}{post}"


def tabmwp_process_results(doc: dict, results: list[str]) -> dict:
    """Normalised exact match; numeric answers also match by value ("$1,000.00" == "1000")."""
    pred, target = normalize_answer(results[0]), normalize_answer(doc["answer"])
    ok = pred == target
    if not ok:
        p, t = _to_number(pred), _to_number(target)
        ok = p is not None and t is not None and math.isclose(p, t, rel_tol=1e-6, abs_tol=1e-9)
    return {"score": SCALE * ok}


# --------------------------------------------------------------------------- grounding


def rec_process_docs(dataset):
    """lmms-eval's RefCOCO preprocessing: one row per referring expression, box as [x1,y1,x2,y2]/size."""
    return refcoco_bbox_rec_preprocess_dataset(dataset)


def rec_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    text = INSTRUCTIONS["grounding"].replace("<description>", str(doc["answer"]).strip().rstrip("."))
    return f"{kw.get('pre_prompt', '')}{text}{kw.get('post_prompt', '')}"


def rec_doc_to_target(doc: dict) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in square_box(doc)) + "]"


def square_box(doc: dict) -> list[float]:
    """Ground-truth box normalised to the image padded to a square (LLaVA-1.5's ``expand2square``)."""
    w, h = float(doc["image_width"]), float(doc["image_height"])
    x1, y1, x2, y2 = doc["bbox"][0] * w, doc["bbox"][1] * h, doc["bbox"][2] * w, doc["bbox"][3] * h
    side = max(w, h)
    dx, dy = (side - w) / 2.0, (side - h) / 2.0
    return [(x1 + dx) / side, (y1 + dy) / side, (x2 + dx) / side, (y2 + dy) / side]


_NUMBER = r"-?\d+(?:\.\d+)?"


def parse_box(text: str) -> list[float] | None:
    """The first four numbers in ``text`` ("[0.1, 0.2, 0.5, 0.6]", "(0.1,0.2),(0.5,0.6)"), or None."""
    nums = re.findall(_NUMBER, text)
    return [float(n) for n in nums[:4]] if len(nums) >= 4 else None


def rec_process_results(doc: dict, results: list[str]) -> dict:
    pred = parse_box(results[0])
    iou = box_iou(pred, square_box(doc)) if pred is not None else 0.0
    return {"score": SCALE * (iou >= 0.5), "iou": SCALE * iou}


# --------------------------------------------------------------------------- captions


def caption_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{kw['instruction']}{kw.get('post_prompt', '')}"


def caption_references(doc: dict) -> list[str]:
    """Reference captions: ``caption`` (Flickr30k, VizWiz-Caps) or ``captions`` (RICO-Screen2Words)."""
    for key in ("caption", "captions", "answer"):
        if key in doc and doc[key] is not None:
            return _as_list(doc[key])
    raise KeyError(f"no reference caption column in doc (columns: {sorted(doc)})")


def caption_doc_to_target(doc: dict) -> str:
    return caption_references(doc)[0]


def caption_process_results(doc: dict, results: list[str]) -> dict:
    return {"score": {"pred": results[0], "refs": caption_references(doc)}}


_PUNCT = set(string.punctuation) | {"``", "''", "-LRB-", "-RRB-", "-LCB-", "-RCB-"}


def caption_tokenize(text: str) -> str:
    """PTB-like tokenisation without Java: lower-case, split punctuation off, drop it.

    pycocoevalcap's ``PTBTokenizer`` runs the Stanford tokenizer through Java; this
    pure-Python stand-in keeps the score reproducible on machines without Java.
    Differences are limited to contractions and rare symbols.
    """
    text = text.lower().replace("\n", " ")
    text = re.sub(r"n't\b", " n't", text)
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", text)
    tokens = re.findall(r"n't|'\w+|\w+|[^\w\s]", text)
    return " ".join(t for t in tokens if t not in _PUNCT)


def cider_score(items: list[dict]) -> float:
    """Corpus CIDEr-D x 100 over ``{"pred", "refs"}`` items (document frequencies from these refs)."""
    from pycocoevalcap.cider.cider import Cider

    if not items:
        return float("nan")
    gts = {i: [caption_tokenize(r) for r in it["refs"]] for i, it in enumerate(items)}
    res = {i: [caption_tokenize(it["pred"])] for i, it in enumerate(items)}
    score, _ = Cider().compute_score(gts, res)
    return SCALE * float(score)
