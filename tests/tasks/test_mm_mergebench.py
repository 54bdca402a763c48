"""Offline tests of the MM-MergeBench task configs (task_configs/mm_mergebench)."""

from __future__ import annotations

import pytest
from task_helpers import IMAGE, INT, STR, image_cell, png, str_list

FOLDER = "mm_mergebench"


def test_scienceqa(load_local_task):
    rows = [
        {
            "image": image_cell(png()),
            "question": "Which is a mammal?",
            "choices": ["frog", "dog", "shark"],
            "answer": 1,
            "hint": "Look at the animals.",
            "task": "closed choice",
            "grade": "grade2",
            "subject": "natural science",
            "topic": "biology",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
        },
        {
            "image": image_cell(png((0, 0, 255))),
            "question": "Pick the warmer one.",
            "choices": ["ice", "tea"],
            "answer": 1,
            "hint": "",
            "task": "closed choice",
            "grade": "grade3",
            "subject": "natural science",
            "topic": "physics",
            "category": "c",
            "skill": "s",
            "lecture": "",
            "solution": "",
        },
    ]
    feats = {
        "image": IMAGE,
        "question": STR,
        "choices": str_list(),
        "answer": INT,
        "hint": STR,
        "task": STR,
        "grade": STR,
        "subject": STR,
        "topic": STR,
        "category": STR,
        "skill": STR,
        "lecture": STR,
        "solution": STR,
    }
    t = load_local_task(FOLDER, "mmmb_scienceqa", rows, feats)
    d0 = t.docs[0]
    assert t.text(d0) == (
        "Context: Look at the animals.\nWhich is a mammal?\nA. frog\nB. dog\nC. shark\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert t.visual(d0)[0].mode == "RGB"
    assert t.target(d0) == "B"
    assert t.results(d0, "B") == {"score": 100.0}
    assert t.results(d0, "A") == {"score": 0.0}
    assert t.aggregate(["B", "B"]) == 100.0
    assert t.aggregate(["B", "A"]) == 50.0


def test_imagenet_classlabel_and_containment(load_local_task):
    import datasets

    rows = [{"image": image_cell(png()), "label": 0}, {"image": image_cell(png((9, 9, 9))), "label": 1}]
    feats = {
        "image": IMAGE,
        "label": datasets.ClassLabel(names=["tench, Tinca tinca", "goldfish, Carassius auratus"]),
    }
    t = load_local_task(FOLDER, "mmmb_imagenet", rows, feats)
    d0, d1 = t.docs
    assert t.text(d0) == "What is the object in the image? Answer the question using a single word or phrase."
    assert t.target(d0) == "tench"
    assert t.results(d0, "Tench.")["score"] == 100.0
    assert t.results(d0, "a tinca tinca fish")["score"] == 100.0  # any synonym, label inside prediction
    assert t.results(d1, "goldfish")["score"] == 100.0
    assert t.results(d1, "tench")["score"] == 0.0
    assert t.results(d1, "")["score"] == 0.0  # empty prediction never matches
    assert t.aggregate(["tench", "shark"]) == 50.0


def test_vqav2_vqa_accuracy(load_local_task):
    answers = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
        for i, a in enumerate(["two"] * 9 + ["three"])
    ]
    rows = [
        {
            "image": image_cell(png()),
            "question": "How many dogs?",
            "question_id": 1,
            "answers": answers,
            "multiple_choice_answer": "2",
            "answer_type": "number",
            "question_type": "how many",
            "image_id": 7,
        }
    ]
    feats = {
        "image": IMAGE,
        "question": STR,
        "question_id": INT,
        "answers": [{"answer": STR, "answer_confidence": STR, "answer_id": INT}],
        "multiple_choice_answer": STR,
        "answer_type": STR,
        "question_type": STR,
        "image_id": INT,
    }
    t = load_local_task(FOLDER, "mmmb_vqav2", rows, feats)
    d = t.docs[0]
    assert t.text(d) == "How many dogs?\nAnswer the question using a single word or phrase."
    assert t.results(d, "2")["score"] == pytest.approx(100.0)  # "two" -> "2" by the VQA normaliser
    assert t.results(d, "3")["score"] == pytest.approx(100.0 / 3 * 0.9)  # one of ten said three
    assert t.results(d, "cat")["score"] == 0.0


def test_rec_coco_square_boxes(load_local_task):
    # 200 x 100 image, box x=50,y=25,w=100,h=50 -> padded to 200x200: [0.25, 0.375, 0.75, 0.625]
    rows = [
        {
            "question_id": "1",
            "image": image_cell(png(size=(200, 100))),
            "question": "",
            "answer": ["the red car", "car on the left"],
            "segmentation": [0.0],
            "bbox": [50.0, 25.0, 100.0, 50.0],
            "iscrowd": 0,
            "file_name": "a.jpg",
        }
    ]
    feats = {
        "question_id": STR,
        "image": IMAGE,
        "question": STR,
        "answer": str_list(),
        "segmentation": datasets_seq_float(),
        "bbox": datasets_seq_float(),
        "iscrowd": INT,
        "file_name": STR,
    }
    t = load_local_task(FOLDER, "mmmb_rec_coco", rows, feats, split="val")
    assert len(t.docs) == 2  # one row per referring expression
    d = t.docs[0]
    assert t.text(d) == (
        "Please provide the bounding box coordinate of the region this sentence describes: the red car."
    )
    assert t.target(d) == "[0.25, 0.38, 0.75, 0.62]"
    good = t.results(d, "[0.25, 0.375, 0.75, 0.625]")
    assert good["score"] == 100.0 and good["iou"] == pytest.approx(100.0)
    near = t.results(d, "[0.26, 0.38, 0.74, 0.62]")
    assert near["score"] == 100.0 and 80.0 < near["iou"] < 100.0
    # image-normalised box of the same region is wrong under the square convention here
    assert t.results(d, "[0.25, 0.25, 0.75, 0.75]")["iou"] < 100.0
    assert t.results(d, "[0.0, 0.0, 0.1, 0.1]")["score"] == 0.0
    assert t.results(d, "no box")["score"] == 0.0


def datasets_seq_float():
    import datasets

    return datasets.Sequence(datasets.Value("float64"))


def test_ocrvqa_explodes_questions(load_local_task):
    rows = [
        {
            "image_id": "b1",
            "image": image_cell(png()),
            "questions": ["Who wrote this book?", "Is this a comic book?"],
            "answers": ["Jane Austen", "No"],
            "ocr_tokens": ["PRIDE"],
            "title": "Pride",
            "authorName": "Jane Austen",
            "genre": "Literature",
            "image_width": 32,
            "image_height": 24,
            "set_name": "test",
        }
    ]
    feats = {
        "image_id": STR,
        "image": IMAGE,
        "questions": str_list(),
        "answers": str_list(),
        "ocr_tokens": str_list(),
        "title": STR,
        "authorName": STR,
        "genre": STR,
        "image_width": INT,
        "image_height": INT,
        "set_name": STR,
    }
    t = load_local_task(FOLDER, "mmmb_ocrvqa", rows, feats)
    assert [d["question"] for d in t.docs] == ["Who wrote this book?", "Is this a comic book?"]
    assert t.visual(t.docs[1])[0].size == (32, 24)
    assert t.text(t.docs[0]) == "Who wrote this book?\nAnswer the question using a single word or phrase."
    assert t.results(t.docs[0], "jane austen.")["score"] == 100.0
    assert t.results(t.docs[0], "Austen")["score"] == 0.0
    assert t.aggregate(["Jane Austen", "Yes"]) == 50.0


CAPTION_REFS = [
    ["a man rides a red bicycle down the street", "a person riding a bike on a road"],
    ["two dogs play with a ball on the grass", "dogs playing in a green park"],
    ["a plate of pasta with tomato sauce", "a bowl of spaghetti on a table"],
]


def _caption_scores(t):
    right = [refs[0] for refs in CAPTION_REFS]
    wrong = ["a blue car parked at night"] * 3
    best, worst = t.aggregate(right), t.aggregate(wrong)
    assert best > 100.0 and worst == pytest.approx(0.0)
    assert worst < t.aggregate([right[0], wrong[1], wrong[2]]) < best


def test_vizwiz_caption_cider(load_local_task):
    rows = [
        {"image_id": i, "image": image_cell(png((i * 40, 0, 0))), "caption": refs}
        for i, refs in enumerate(CAPTION_REFS)
    ]
    t = load_local_task(
        FOLDER, "mmmb_vizwiz_caption", rows, {"image_id": INT, "image": IMAGE, "caption": str_list()}
    )
    assert t.text(t.docs[0]) == "What is happening in the image? Generate a brief caption for the image."
    assert t.target(t.docs[0]) == CAPTION_REFS[0][0]
    _caption_scores(t)


def test_flickr30k_cider(load_local_task):
    rows = [
        {
            "image": image_cell(png()),
            "caption": refs,
            "sentids": ["1", "2"],
            "img_id": str(i),
            "filename": f"{i}.jpg",
        }
        for i, refs in enumerate(CAPTION_REFS)
    ]
    feats = {"image": IMAGE, "caption": str_list(), "sentids": str_list(), "img_id": STR, "filename": STR}
    t = load_local_task(FOLDER, "mmmb_flickr30k", rows, feats)
    assert t.text(t.docs[1]) == "What is happening in the image? Generate a brief caption for the image."
    _caption_scores(t)


def test_screen2words_cider(load_local_task):
    rows = [
        {"screenId": i, "captions": refs, "file_name": f"{i}.jpg", "image": image_cell(png())}
        for i, refs in enumerate(CAPTION_REFS)
    ]
    feats = {"screenId": INT, "captions": str_list(), "file_name": STR, "image": IMAGE}
    t = load_local_task(FOLDER, "mmmb_screen2words", rows, feats)
    assert t.text(t.docs[0]) == "You are given a phone UI screen. Describe the screen in one sentence."
    _caption_scores(t)


def test_iconqa_single_image_types(load_local_task):
    base = {
        "query_image": image_cell(png()),
        "choice_image_0": None,
        "choice_image_1": None,
        "grade": "grade1",
        "label": "",
        "question_id": "0",
    }
    rows = [
        {
            **base,
            "question": "What shape is this?",
            "choices": "circle,square",
            "answer": "square",
            "ques_type": "choose_txt",
        },
        {
            **base,
            "question": "How many dots are there?",
            "choices": "",
            "answer": "4",
            "ques_type": "fill_in_blank",
        },
        {
            **base,
            "question": "Which picture shows a cat?",
            "choices": "",
            "answer": "0",
            "ques_type": "choose_img",
        },
    ]
    feats = {
        "query_image": IMAGE,
        "choice_image_0": IMAGE,
        "choice_image_1": IMAGE,
        "grade": STR,
        "label": STR,
        "question_id": STR,
        "question": STR,
        "choices": STR,
        "answer": STR,
        "ques_type": STR,
    }
    t = load_local_task(FOLDER, "mmmb_iconqa", rows, feats)
    assert len(t.docs) == 2  # choose_img dropped
    assert t.text(t.docs[0]) == (
        "What shape is this?\nChoices: circle, square\nAnswer the question using a single word or phrase."
    )
    assert len(t.visual(t.docs[0])) == 1
    assert t.results(t.docs[0], "Square")["score"] == 100.0
    assert t.results(t.docs[1], "5")["score"] == 0.0


def test_aokvqa_letters(load_local_task):
    rows = [
        {
            "image": image_cell(png()),
            "question_id": "q1",
            "question": "What is the man holding?",
            "choices": ["umbrella", "phone", "cup", "book"],
            "correct_choice_idx": 2,
            "direct_answers": ["cup"] * 10,
            "difficult_direct_answer": False,
            "rationales": ["r"],
        }
    ]
    feats = {
        "image": IMAGE,
        "question_id": STR,
        "question": STR,
        "choices": str_list(),
        "correct_choice_idx": INT,
        "direct_answers": str_list(),
        "difficult_direct_answer": datasets_bool(),
        "rationales": str_list(),
    }
    t = load_local_task(FOLDER, "mmmb_aokvqa", rows, feats)
    d = t.docs[0]
    assert t.text(d) == (
        "What is the man holding?\nA. umbrella\nB. phone\nC. cup\nD. book\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert t.target(d) == "C"
    for good in ("C", "C.", "(C)", "C. cup", "The answer is C."):
        assert t.results(d, good)["score"] == 100.0, good
    for bad in ("A", "D. book", "Cup", ""):
        assert t.results(d, bad)["score"] == 0.0, bad


def datasets_bool():
    import datasets

    return datasets.Value("bool")


def test_imagenet_r_containment(load_local_task):
    rows = [
        {"image": image_cell(png()), "wnid": "n01443537", "class_name": "goldfish"},
        {"image": image_cell(png()), "wnid": "n01484850", "class_name": "great_white_shark"},
    ]
    t = load_local_task(FOLDER, "mmmb_imagenet_r", rows, {"image": IMAGE, "wnid": STR, "class_name": STR})
    assert t.text(t.docs[0]) == "What is the object in the image?"
    assert t.results(t.docs[0], "A goldfish.")["score"] == 100.0
    assert t.results(t.docs[1], "great white shark")["score"] == 100.0
    assert t.results(t.docs[1], "dolphin")["score"] == 0.0


def test_tabmwp_exact_or_numeric(load_local_task):
    rows = [
        {
            "image": image_cell(png()),
            "id": "1",
            "question": "How much do two pens cost?",
            "options": [],
            "answer": "$4.00",
        },
        {
            "image": image_cell(png()),
            "id": "2",
            "question": "Which is cheaper?",
            "options": ["pen", "book"],
            "answer": "pen",
        },
    ]
    feats = {"image": IMAGE, "id": STR, "question": STR, "options": str_list(), "answer": STR}
    t = load_local_task(FOLDER, "mmmb_tabmwp", rows, feats)
    assert (
        t.text(t.docs[0]) == "How much do two pens cost?\nAnswer the question using a single word or phrase."
    )
    assert t.text(t.docs[1]) == (
        "Which is cheaper?\nChoices: pen, book\nAnswer the question using a single word or phrase."
    )
    assert t.results(t.docs[0], "4")["score"] == 100.0
    assert t.results(t.docs[0], "$4.00")["score"] == 100.0
    assert t.results(t.docs[0], "5")["score"] == 0.0
    assert t.results(t.docs[1], "Pen.")["score"] == 100.0
    assert t.aggregate(["4", "book"]) == 50.0
