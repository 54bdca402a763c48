"""Offline tests of the capability-suite task configs (task_configs/capability_suite)."""

from __future__ import annotations

import datasets
import pytest
from task_helpers import FLOAT, IMAGE, INT, STR, image_cell, png, str_list

FOLDER = "capability_suite"
VQA_POST = "\nAnswer the question using a single word or phrase."


def test_vizwiz_vqa(load_local_task):
    rows = [
        {
            "question_id": "VizWiz_val_1.jpg",
            "image": image_cell(png()),
            "question": "what color is this shirt?",
            "answers": ["blue"] * 8 + ["navy", "unanswerable"],
            "category": "other",
        }
    ]
    feats = {"question_id": STR, "image": IMAGE, "question": STR, "answers": str_list(), "category": STR}
    t = load_local_task(FOLDER, "cap_vizwiz_vqa", rows, feats)
    d = t.docs[0]
    assert t.text(d) == (
        "What color is this shirt?\nWhen the provided information is insufficient, respond with "
        "'Unanswerable'.\nAnswer the question using a single word or phrase."
    )
    assert t.results(d, "Blue")["score"] == pytest.approx(100.0)
    assert 0.0 < t.results(d, "navy")["score"] < 100.0
    assert t.results(d, "red")["score"] == 0.0
    assert t.results(d, "Blue")["score"] == pytest.approx(100.0)  # the doc was not altered by scoring


def test_gqa_with_local_images(load_local_task):
    rows = [
        {
            "id": "1",
            "imageId": "n1",
            "question": "Is the cup on the left?",
            "answer": "yes",
            "fullAnswer": "Yes, the cup is on the left.",
            "image": image_cell(png()),
        },
        {
            "id": "2",
            "imageId": "n2",
            "question": "What is on the table?",
            "answer": "laptop",
            "fullAnswer": "A laptop.",
            "image": image_cell(png()),
        },
    ]
    feats = {"id": STR, "imageId": STR, "question": STR, "answer": STR, "fullAnswer": STR, "image": IMAGE}
    t = load_local_task(FOLDER, "cap_gqa", rows, feats)
    assert t.text(t.docs[0]) == "Is the cup on the left?" + VQA_POST
    assert t.visual(t.docs[0])[0].mode == "RGB"
    assert t.results(t.docs[1], "Laptop.")["score"] == 100.0
    assert t.aggregate(["Yes", "a laptop"]) == 50.0


def _mathvista_row(pid, question_type, answer_type, answer, choices, skills, task, precision=0.0):
    return {
        "pid": pid,
        "question": "q",
        "image": f"images/{pid}.jpg",
        "decoded_image": image_cell(png()),
        "choices": choices,
        "unit": "",
        "precision": precision,
        "answer": answer,
        "question_type": question_type,
        "answer_type": answer_type,
        "metadata": {
            "category": "math-targeted-vqa",
            "context": "geometry diagram",
            "grade": "high school",
            "language": "english",
            "skills": skills,
            "source": "Geometry3K",
            "split": "testmini",
            "task": task,
        },
        "query": f"Hint: Please answer the question.\nQuestion: problem {pid}",
    }


def test_mathvista_geometry_rule_based(load_local_task):
    rows = [
        _mathvista_row(
            "1",
            "multi_choice",
            "text",
            "60",
            ["30", "45", "60", "90"],
            ["geometry reasoning"],
            "geometry problem solving",
        ),
        _mathvista_row("2", "free_form", "integer", "12", None, ["algebraic reasoning"], "math word problem"),
        _mathvista_row(
            "3",
            "free_form",
            "float",
            "1.45",
            None,
            ["arithmetic reasoning"],
            "geometry problem solving",
            precision=2.0,
        ),
        _mathvista_row(
            "4", "free_form", "integer", "7", None, ["statistical reasoning"], "figure question answering"
        ),
    ]
    meta = {
        "category": STR,
        "context": STR,
        "grade": STR,
        "language": STR,
        "skills": str_list(),
        "source": STR,
        "split": STR,
        "task": STR,
    }
    feats = {
        "pid": STR,
        "question": STR,
        "image": STR,
        "decoded_image": IMAGE,
        "choices": str_list(),
        "unit": STR,
        "precision": FLOAT,
        "answer": STR,
        "question_type": STR,
        "answer_type": STR,
        "metadata": meta,
        "query": STR,
    }
    t = load_local_task(FOLDER, "cap_mathvista_geometry", rows, feats)
    assert [d["pid"] for d in t.docs] == ["1", "2", "3"]  # pid 4 is neither geometry nor algebra
    mc, integer, flt = t.docs
    assert t.text(mc) == "Hint: Please answer the question.\nQuestion: problem 1"
    for good in ("60", "C", "(C)", "The angle is 60 degrees, so the answer is C.", "Answer: (C) 60"):
        assert t.results(mc, good)["score"] == 100.0, good
    for bad in ("A", "45", "", "I cannot tell"):
        assert t.results(mc, bad)["score"] == 0.0, bad
    assert t.results(integer, "First 3 * 4 = 12. The answer is 12.")["score"] == 100.0
    assert t.results(integer, "\\boxed{12}")["score"] == 100.0
    assert t.results(integer, "13")["score"] == 0.0
    assert t.results(flt, "1.449")["score"] == 100.0  # rounded to precision 2
    assert t.results(flt, "1.5")["score"] == 0.0


def test_mathvision_geometry_builtin_rules(load_local_task):
    base = {"image": "images/1.jpg", "decoded_image": image_cell(png()), "solution": "", "level": 2}
    rows = [
        {
            **base,
            "id": "1",
            "question": "Find the angle x.",
            "options": [],
            "answer": "40",
            "subject": "metric geometry - angle",
        },
        {
            **base,
            "id": "2",
            "question": "Which solid is shown?",
            "options": ["cube", "cone", "sphere"],
            "answer": "B",
            "subject": "solid geometry",
        },
        {
            **base,
            "id": "3",
            "question": "Count the dots.",
            "options": [],
            "answer": "5",
            "subject": "counting",
        },
    ]
    feats = {
        "image": STR,
        "decoded_image": IMAGE,
        "solution": STR,
        "level": INT,
        "id": STR,
        "question": STR,
        "options": str_list(),
        "answer": STR,
        "subject": STR,
    }
    t = load_local_task(FOLDER, "cap_mathvision_geometry", rows, feats)
    assert [d["id"] for d in t.docs] == ["1", "2"]
    angle, solid = t.docs
    assert t.text(solid).endswith(
        "Choices: A. cube\nB. cone\nC. sphere\n"
        "Answer the question with the option's letter from the given choices directly."
    )
    assert t.results(angle, "x = 40, so \\boxed{40}")["score"] == 100.0
    assert t.results(angle, "\\boxed{50}")["score"] == 0.0
    assert t.results(solid, "\\boxed{B}")["score"] == 100.0
    assert t.results(solid, "\\boxed{A}")["score"] == 0.0


def test_chartqa_relaxed(load_local_task):
    rows = [
        {
            "type": "human_test",
            "question": "What is the peak value?",
            "answer": "50",
            "image": image_cell(png()),
        },
        {
            "type": "augmented_test",
            "question": "Which country is highest?",
            "answer": "Japan",
            "image": image_cell(png()),
        },
    ]
    t = load_local_task(
        FOLDER, "cap_chartqa", rows, {"type": STR, "question": STR, "answer": STR, "image": IMAGE}
    )
    assert t.text(t.docs[0]) == "What is the peak value?\nAnswer the question with a single word."
    assert t.results(t.docs[0], "51")["score"] == 100.0  # within 5%
    assert t.results(t.docs[0], "60")["score"] == 0.0
    assert t.aggregate(["50", "China"]) == 50.0


def test_textvqa(load_local_task):
    rows = [
        {
            "image_id": "i1",
            "question_id": 1,
            "question": "what brand is the phone?",
            "answers": ["nokia"] * 10,
            "image": image_cell(png()),
            "ocr_tokens": ["NOKIA"],
        }
    ]
    feats = {
        "image_id": STR,
        "question_id": INT,
        "question": STR,
        "answers": str_list(),
        "image": IMAGE,
        "ocr_tokens": str_list(),
    }
    t = load_local_task(FOLDER, "cap_textvqa", rows, feats)
    assert t.text(t.docs[0]) == "What brand is the phone?" + VQA_POST
    assert t.results(t.docs[0], "Nokia")["score"] == pytest.approx(100.0)
    assert t.results(t.docs[0], "samsung")["score"] == 0.0


def test_ocrvqa(load_local_task):
    rows = [
        {
            "image_id": "b1",
            "image": image_cell(png()),
            "questions": ["What is the title of this book?", "What type of book is this?"],
            "answers": ["The Hobbit", "Fantasy"],
            "title": "The Hobbit",
            "genre": "Fantasy",
        }
    ]
    feats = {
        "image_id": STR,
        "image": IMAGE,
        "questions": str_list(),
        "answers": str_list(),
        "title": STR,
        "genre": STR,
    }
    t = load_local_task(FOLDER, "cap_ocrvqa", rows, feats)
    assert len(t.docs) == 2
    assert t.text(t.docs[1]) == "What type of book is this?" + VQA_POST
    assert t.results(t.docs[0], "the hobbit")["score"] == 100.0
    assert t.aggregate(["The Hobbit", "Horror"]) == 50.0


@pytest.mark.parametrize("task", ["cap_refcoco", "cap_refcoco_plus", "cap_refcocog"])
def test_grounding_image_normalised_and_qwen_scale(load_local_task, task):
    # 200 x 100 image, box x=50,y=25,w=100,h=50 -> image-normalised [0.25, 0.25, 0.75, 0.75]
    rows = [
        {
            "question_id": "1",
            "image": image_cell(png(size=(200, 100))),
            "question": "",
            "answer": ["the red car"],
            "segmentation": [0.0],
            "bbox": [50.0, 25.0, 100.0, 50.0],
            "iscrowd": 0,
            "file_name": "a.jpg",
        }
    ]
    seq_f = datasets.Sequence(datasets.Value("float64"))
    feats = {
        "question_id": STR,
        "image": IMAGE,
        "question": STR,
        "answer": str_list(),
        "segmentation": seq_f,
        "bbox": seq_f,
        "iscrowd": INT,
        "file_name": STR,
    }
    t = load_local_task(FOLDER, task, rows, feats)
    d = t.docs[0]
    assert t.text(d).endswith(
        "Please provide the bounding box coordinate of the region this sentence describes: the red car"
    )
    assert t.results(d, "[0.25, 0.25, 0.75, 0.75]") == {"score": 100.0, "iou": pytest.approx(100.0)}
    assert (
        t.results(d, "<|box_start|>(250,250),(750,750)<|box_end|>")["score"] == 100.0
    )  # Qwen2-VL 0-1000 scale
    assert t.results(d, "[0.25, 0.375, 0.75, 0.625]")["score"] == 100.0  # IoU 0.5
    assert t.results(d, "[0.0, 0.0, 0.2, 0.2]")["score"] == 0.0
    assert t.results(d, "left side")["score"] == 0.0
