"""Prompt and scoring functions for the capability-suite task configs (lmms-eval 0.7.3).

The suite is the evaluation of "Unifying Multimodal Large Language Model
Capabilities and Modalities via Model Merging" (seed paper 004): VQA (VizWiz,
GQA), Geometry (MathVista and MATH-Vision subsets), Chart (ChartQA), OCR
(TextVQA, OCRVQA) and Grounding (RefCOCO, RefCOCO+, RefCOCOg).

Prompts and per-sample scoring are lmms-eval's built-in ones wherever they run
without a remote judge; each task here only rescales them into one metric named
``score`` on a 0-100 scale, so the ``cap_*`` groups can average across tasks.
MathVista's built-in scoring asks a GPT model to extract the answer; the
``cap_mathvista_geometry`` task replaces that by the rule-based extraction below.

This file is loaded by lmms-eval through ``!function utils.<name>`` as a bare
module file, so it imports only lmms-eval and third-party modules.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

from lmms_eval.tasks.chartqa.utils import chartqa_process_results as _chartqa_builtin
from lmms_eval.tasks.gqa.utils import gqa_process_docs as _gqa_process_docs_builtin
from lmms_eval.tasks.textvqa.utils import textvqa_process_results as _textvqa_builtin
from lmms_eval.tasks.vizwiz_vqa.utils import vizwiz_vqa_process_results as _vizwiz_builtin

from harness_merge.task_utils import box_iou

SCALE = 100.0


def _copy_answers(doc: dict) -> dict:
    """The built-in VQA scorers normalise ``doc["answers"]`` in place; give them a copy."""
    return {**doc, "answers": list(doc.get("answers") or [])}


def normalize_answer(text: Any) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    text = str(text).lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


# --------------------------------------------------------------------------- VQA


def vizwiz_process_results(doc: dict, results: list[str]) -> dict:
    """VizWiz VQA accuracy (lmms-eval's ``vizwiz_vqa_process_results``) x 100."""
    return {"score": SCALE * _vizwiz_builtin(_copy_answers(doc), results)["exact_match"]}


def gqa_process_docs(dataset):
    """GQA's instructions config has no images; the built-in joins them from the images config.

    A copy that already carries an ``image`` column (a local parquet) is used as is.
    """
    if "image" in dataset.column_names:
        return dataset
    return _gqa_process_docs_builtin(dataset)


def exact_match_process_results(doc: dict, results: list[str]) -> dict:
    """Exact match ignoring case and punctuation (what the built-in ``gqa`` task computes) x 100."""
    return {"score": SCALE * (normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


# --------------------------------------------------------------------------- Chart and OCR


def chartqa_process_results(doc: dict, results: list[str]) -> dict:
    """ChartQA relaxed accuracy (5% numeric tolerance; lmms-eval's ``relaxed_overall``) x 100."""
    return {"score": SCALE * _chartqa_builtin(doc, results)["relaxed_overall"]}


def textvqa_process_results(doc: dict, results: list[str]) -> dict:
    """TextVQA VQA accuracy (lmms-eval's ``textvqa_process_results``) x 100."""
    return {"score": SCALE * _textvqa_builtin(_copy_answers(doc), results)["exact_match"]}


def ocrvqa_process_docs(dataset):
    """howard-hou/OCR-VQA keeps several questions per cover image: one row per question.

    Images are carried as undecoded bytes while exploding, so nothing is decoded here.
    """
    from datasets import Image

    if "question" in dataset.column_names:
        return dataset
    dataset = dataset.cast_column("image", Image(decode=False))
    keep = [k for k in dataset.column_names if k not in ("questions", "answers")]

    def _explode(batch):
        out = {k: [] for k in keep + ["question", "answer"]}
        for i, (qs, ans) in enumerate(zip(batch["questions"], batch["answers"])):
            for q, a in zip(qs, ans):
                for k in keep:
                    out[k].append(batch[k][i])
                out["question"].append(q)
                out["answer"].append(a)
        return out

    dataset = dataset.map(_explode, batched=True, remove_columns=dataset.column_names)
    return dataset.cast_column("image", Image(decode=True))


def short_answer_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def image_doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


# --------------------------------------------------------------------------- Geometry

# Seed paper 004: MathVista "geometry reasoning" and "algebraic reasoning" (skills)
# and "geometry problem solving" (task); MATH-Vision's four geometry subjects.
MATHVISTA_SKILLS = ("geometry reasoning", "algebraic reasoning")
MATHVISTA_TASKS = ("geometry problem solving",)
MATHVISION_SUBJECTS = (
    "metric geometry - angle",
    "metric geometry - area",
    "metric geometry - length",
    "solid geometry",
)


def mathvista_geometry_process_docs(dataset):
    """MathVista testmini problems with a geometry/algebra skill or the geometry-problem-solving task."""

    def _keep(doc):
        meta = doc["metadata"] or {}
        skills = set(meta.get("skills") or [])
        return bool(skills & set(MATHVISTA_SKILLS)) or meta.get("task") in MATHVISTA_TASKS

    return dataset.filter(_keep)


def mathvision_geometry_process_docs(dataset):
    """MATH-Vision testmini problems of the four geometry subjects."""
    return dataset.filter(lambda doc: doc["subject"] in MATHVISION_SUBJECTS)


def mathvista_doc_to_visual(doc: dict) -> list:
    return [doc["decoded_image"].convert("RGB")]


def mathvista_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """MathVista's own ``query`` field: hint (answer format), question and choices."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['query']}{kw.get('post_prompt', '')}"


_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+"


def _answer_span(response: str) -> str:
    """The part after the last "answer is"/"Answer:" marker, or after the last ``\\boxed{``, else all."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", response)
    if boxed:
        return boxed[-1]
    parts = re.split(r"(?i)(?:final answer|the answer|answer)\s*(?:is|:)\s*", response)
    return parts[-1] if len(parts) > 1 else response


def extract_mathvista_answer(response: str, doc: dict) -> str | None:
    """Rule-based MathVista answer extraction (in place of the built-in GPT extraction).

    - multiple choice: the choice text itself, a choice letter ("B", "(B)", "B.",
      "answer is B"), else the choice whose text occurs last in the response;
    - integer: the last number, rounded to an integer;
    - float: the last number, rounded to the problem's ``precision`` decimals;
    - text/list: the answer span, stripped.
    Returns None when nothing can be read.
    """
    response = response.strip()
    if not response:
        return None
    span = _answer_span(response).strip().strip("$").strip()
    choices = list(doc.get("choices") or [])
    if doc["question_type"] == "multi_choice" and choices:
        for text in (span, response):
            if text in choices:
                return text
        letters = "".join(chr(ord("A") + i) for i in range(len(choices)))
        m = re.match(rf"^\(?([{letters}])\)?(?:[.:)\s]|$)", span) or re.search(
            rf"(?i:answer is|answer:)\s*\(?([{letters}])\)?\b", response
        )
        if m:
            return choices[ord(m.group(1)) - ord("A")]
        found = [(response.rfind(c), c) for c in choices if c and c in response]
        return max(found)[1] if found else None
    if doc["answer_type"] in ("integer", "float"):
        nums = re.findall(_NUMBER, span) or re.findall(_NUMBER, response)
        if not nums:
            return None
        value = float(nums[-1].replace(",", ""))
        if doc["answer_type"] == "integer":
            return str(int(round(value)))
        precision = int(doc.get("precision") or 0)
        return str(round(value, precision)) if precision > 0 else str(int(round(value)))
    return span or None


def mathvista_answers_equal(pred: str | None, doc: dict) -> bool:
    if pred is None:
        return False
    answer = str(doc["answer"]).strip()
    if doc["answer_type"] in ("integer", "float"):
        try:
            return math.isclose(float(pred), float(answer), rel_tol=0.0, abs_tol=1e-9)
        except ValueError:
            return False
    return pred.strip().lower() == answer.lower()


def mathvista_process_results(doc: dict, results: list[str]) -> dict:
    return {"score": SCALE * mathvista_answers_equal(extract_mathvista_answer(results[0], doc), doc)}


def mathvision_process_results(doc: dict, results: list[str]) -> dict:
    """MATH-Vision's built-in rule-based check (``mathvision_process_results``) x 100."""
    from lmms_eval.tasks.mathvision.utils import mathvision_process_results as builtin

    return {"score": SCALE * bool(builtin(doc, results)["mathvision_standard_eval"]["scores"][0])}


# --------------------------------------------------------------------------- Grounding


def parse_box(text: str) -> list[float] | None:
    """The first four numbers in ``text``; a box with a value above 1 is read on Qwen2-VL's 0-1000 scale.

    The built-in RefCOCO prompt asks for [0, 1] floats; the seed paper trains
    Qwen2-VL with coordinates in [0, 1000), so both are understood.
    """
    nums = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)[:4]]
    if len(nums) < 4:
        return None
    if max(nums) > 1.0:
        nums = [n / 1000.0 for n in nums]
    return nums


def rec_process_results(doc: dict, results: list[str]) -> dict:
    """Accuracy at IoU >= 0.5 against the image-normalised box (built-in ``refcoco_ACC@0.5``) x 100."""
    pred = parse_box(results[0])
    iou = box_iou(pred, list(doc["bbox"])) if pred is not None else 0.0
    return {"score": SCALE * (iou >= 0.5), "iou": SCALE * iou}
