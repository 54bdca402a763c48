"""Regenerate the tiny parquet files of ``task_configs/local/`` (deterministic).

    python scripts/make_local_tasks.py            # write all
    python scripts/make_local_tasks.py --check    # exit 1 if a file would change

Six benchmarks in the column schema of the real lmms-eval 0.7.3 datasets
(POPE, MME, MMBench en dev, ScienceQA-IMG, ChartQA, RefCOCO bbox REC), with
synthetic PIL pictures whose answers are true for the picture, and the demo's
synthetic tasks (colour, shape, count) from ``harness_merge.demo.data``.
Images are stored as the HF ``datasets`` Image feature ({bytes, path}), so
``doc["image"]`` is a PIL image, as with the hub datasets.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "task_configs" / "local"
sys.path.insert(0, str(ROOT))

from harness_merge.demo import data as ddata

COL = ddata.COLOURS


def _png(img: Image.Image) -> dict:
    return ddata.to_hf_image(img)


def scene(objs: list[tuple[str, str, tuple[int, int, int, int]]], size=(84, 56)) -> Image.Image:
    """White canvas with (colour, shape, box) objects."""
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    for colour, shape, box in objs:
        ddata._draw_shape(d, shape, box, COL[colour])
    return img


def bar_chart(values: list[int], labels: list[str]) -> Image.Image:
    img = Image.new("RGB", (84, 56), (255, 255, 255))
    d = ImageDraw.Draw(img)
    w = 84 // len(values)
    for i, v in enumerate(values):
        d.rectangle((i * w + 3, 50 - 4 * v, i * w + w - 3, 50), fill=COL[list(COL)[i % 4]])
        d.text((i * w + 4, 50), labels[i][0], fill=(0, 0, 0))
    d.line((0, 50, 83, 50), fill=(0, 0, 0))
    return img


# ----------------------------------------------------------------------------- benchmarks


def pope_rows():
    objs = [("red", "circle", (6, 10, 34, 38)), ("blue", "square", (46, 14, 74, 42))]
    img = scene(objs)
    qs = [
        ("Is there a red circle in the image?", "yes", "random"),
        ("Is there a green triangle in the image?", "no", "random"),
        ("Is there a blue square in the image?", "yes", "popular"),
        ("Is there a yellow circle in the image?", "no", "popular"),
        ("Is there a blue circle in the image?", "no", "adversarial"),
        ("Is there a square in the image?", "yes", "adversarial"),
    ]
    return [
        {
            "id": str(i),
            "question_id": str(i + 1),
            "question": q,
            "answer": a,
            "image_source": "synthetic_000",
            "image": _png(img),
            "category": c,
        }
        for i, (q, a, c) in enumerate(qs)
    ]


def mme_rows():
    # pairs: same image, same question_id, one Yes and one No question (MME scores acc and acc+)
    pairs = [
        (
            "existence",
            scene([("green", "triangle", (28, 8, 56, 48))]),
            ("Is there a triangle in this image?", "Yes"),
            ("Is there a circle in this image?", "No"),
        ),
        (
            "count",
            scene([("red", "square", (4, 10, 24, 30)), ("red", "square", (44, 10, 64, 30))]),
            ("Are there two squares in this image?", "Yes"),
            ("Are there three squares in this image?", "No"),
        ),
        (
            "color",
            scene([("yellow", "circle", (20, 8, 60, 48))]),
            ("Is the circle yellow?", "Yes"),
            ("Is the circle blue?", "No"),
        ),
        (
            "position",
            scene([("blue", "square", (4, 16, 28, 40)), ("red", "circle", (52, 16, 76, 40))]),
            ("Is the blue square on the left of the red circle?", "Yes"),
            ("Is the blue square on the right of the red circle?", "No"),
        ),
    ]
    rows = []
    for cat, img, *qa in pairs:
        qid = f"{cat}/synthetic_{len(rows) // 2:03d}.png"
        for q, a in qa:
            rows.append(
                {
                    "question_id": qid,
                    "image": _png(img),
                    "question": f"{q} Please answer yes or no.",
                    "answer": a,
                    "category": cat,
                }
            )
    return rows


def mmbench_rows():
    items = [
        (
            scene([("red", "circle", (20, 8, 60, 48))]),
            "What colour is the circle?",
            ("red", "green", "blue", "yellow"),
            "A",
            "attribute_recognition",
            "finegrained_perception (instance-level)",
        ),
        (
            scene([("green", "triangle", (20, 6, 62, 50))]),
            "Which shape is shown in the image?",
            ("circle", "triangle", "square", "star"),
            "B",
            "object_localization",
            "finegrained_perception (instance-level)",
        ),
        (
            scene(
                [
                    ("blue", "square", (4, 4, 20, 20)),
                    ("blue", "square", (30, 30, 46, 46)),
                    ("blue", "square", (60, 8, 76, 24)),
                ]
            ),
            "How many squares are there?",
            ("one", "two", "three", "four"),
            "C",
            "attribute_recognition",
            "finegrained_perception (instance-level)",
        ),
        (
            scene([("yellow", "circle", (4, 14, 30, 40)), ("red", "square", (54, 14, 80, 40))]),
            "Which object is on the right?",
            ("yellow circle", "green square", "blue circle", "red square"),
            "D",
            "spatial_relationship",
            "relation_reasoning",
        ),
    ]
    rows = []
    for i, (img, q, opts, ans, cat, l2) in enumerate(items):
        rows.append(
            {
                "index": i,
                "question": q,
                "hint": "The image shows simple coloured shapes." if i == 3 else None,
                "A": opts[0],
                "B": opts[1],
                "C": opts[2],
                "D": opts[3],
                "answer": ans,
                "category": cat,
                "image": _png(img),
                "source": "synthetic",
                "L2-category": l2,
                "comment": "",
                "split": "dev",
            }
        )
    return rows


def scienceqa_rows():
    items = [
        (
            scene([("blue", "circle", (20, 8, 60, 48))]),
            "Which colour is the circle in the picture?",
            ["red", "blue"],
            1,
            "Look at the picture.",
        ),
        (
            scene([("red", "square", (8, 8, 40, 40)), ("red", "square", (48, 20, 64, 36))]),
            "Which square is larger?",
            ["the left square", "the right square", "they are the same size"],
            0,
            "",
        ),
        (
            scene([("yellow", "triangle", (24, 6, 60, 50))]),
            "Which shape has three sides?",
            ["triangle", "circle"],
            0,
            "",
        ),
        (
            bar_chart([2, 9, 5], ["a", "b", "c"]),
            "Which bar is the tallest?",
            ["a", "b", "c"],
            1,
            "The chart shows three bars.",
        ),
    ]
    return [
        {
            "image": _png(img),
            "question": q,
            "choices": ch,
            "answer": a,
            "hint": hint,
            "task": "closed choice",
            "grade": "grade2",
            "subject": "natural science",
            "topic": "shapes",
            "category": "Geometry",
            "skill": "Identify shapes and colours",
            "lecture": "",
            "solution": f"The answer is {ch[a]}.",
        }
        for img, q, ch, a, hint in items
    ]


def chartqa_rows():
    rows = []
    charts = [([3, 7, 5], ["x", "y", "z"]), ([8, 2, 6, 4], ["p", "q", "r", "s"])]
    for (vals, labels), kind in zip(charts, ("human_test", "augmented_test")):
        img = bar_chart(vals, labels)
        hi = int(np.argmax(vals))
        rows.append(
            {
                "type": kind,
                "question": "What is the value of the tallest bar?",
                "answer": str(vals[hi]),
                "image": _png(img),
            }
        )
        rows.append(
            {
                "type": kind,
                "question": "Which label has the tallest bar?",
                "answer": labels[hi],
                "image": _png(img),
            }
        )
    return rows


def refcoco_rows():
    items = [
        (
            [("red", "circle", (6, 10, 34, 38)), ("blue", "square", (46, 14, 74, 42))],
            ["the red circle", "circle on the left"],
            (6, 10, 28, 28),
        ),
        (
            [("green", "triangle", (10, 4, 50, 44)), ("yellow", "square", (58, 30, 78, 50))],
            ["yellow square"],
            (58, 30, 20, 20),
        ),
        ([("blue", "circle", (30, 6, 74, 50))], ["the blue circle"], (30, 6, 44, 44)),
    ]
    rows = []
    for i, (objs, answers, bbox) in enumerate(items):
        x, y, w, h = bbox
        rows.append(
            {
                "question_id": str(1000 + i),
                "image": _png(scene(objs)),
                "question": "Please carefully observe the area circled in the image and come up with a caption for the area.",
                "answer": answers,
                "segmentation": [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)],
                "bbox": [float(v) for v in bbox],
                "iscrowd": 0,
                "file_name": f"synthetic_{i:03d}.jpg",
            }
        )
    return rows


# ----------------------------------------------------------------------------- demo tasks

DEMO_EVAL_ROWS = 24  # per task; small so an lmms-eval run takes seconds
DEMO_SEED = 7  # eval rows; training uses other seeds (harness_merge.demo.train)


def demo_rows(task: str):
    return [{**r, "image": _png(r["image"])} for r in ddata.make_rows(task, DEMO_EVAL_ROWS, seed=DEMO_SEED)]


# ----------------------------------------------------------------------------- writing


def _features(name: str):
    from datasets import Features, Sequence, Value
    from datasets import Image as HFImage

    s, img = Value("string"), HFImage()
    return {
        "pope": Features(
            {
                "id": s,
                "question_id": s,
                "question": s,
                "answer": s,
                "image_source": s,
                "image": img,
                "category": s,
            }
        ),
        "mme": Features({"question_id": s, "image": img, "question": s, "answer": s, "category": s}),
        "mmbench": Features(
            {
                "index": Value("int64"),
                "question": s,
                "hint": s,
                "A": s,
                "B": s,
                "C": s,
                "D": s,
                "answer": s,
                "category": s,
                "image": img,
                "source": s,
                "L2-category": s,
                "comment": s,
                "split": s,
            }
        ),
        "scienceqa": Features(
            {
                "image": img,
                "question": s,
                "choices": Sequence(s),
                "answer": Value("int8"),
                "hint": s,
                "task": s,
                "grade": s,
                "subject": s,
                "topic": s,
                "category": s,
                "skill": s,
                "lecture": s,
                "solution": s,
            }
        ),
        "chartqa": Features({"type": s, "question": s, "answer": s, "image": img}),
        "refcoco": Features(
            {
                "question_id": s,
                "image": img,
                "question": s,
                "answer": Sequence(s),
                "segmentation": Sequence(Value("float32")),
                "bbox": Sequence(Value("float32")),
                "iscrowd": Value("int8"),
                "file_name": s,
            }
        ),
        "demo": Features({"question_id": s, "question": s, "answer": s, "image": img}),
    }[name]


# file (relative to task_configs/local) -> (feature set, row builder)
FILES = {
    "pope_local/pope_local.parquet": ("pope", pope_rows),
    "mme_local/mme_local.parquet": ("mme", mme_rows),
    "mmbench_local/mmbench_en_dev_local.parquet": ("mmbench", mmbench_rows),
    "scienceqa_local/scienceqa_img_local.parquet": ("scienceqa", scienceqa_rows),
    "chartqa_local/chartqa_local.parquet": ("chartqa", chartqa_rows),
    "refcoco_local/refcoco_bbox_rec_local.parquet": ("refcoco", refcoco_rows),
    **{f"demo/demo_{t}.parquet": ("demo", (lambda t=t: demo_rows(t))) for t in ddata.DEMO_TASKS},
}


def parquet_bytes(rel: str) -> bytes:
    """The parquet file ``rel`` as bytes (built in memory)."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    kind, build = FILES[rel]
    ds = Dataset.from_list(build(), features=_features(kind))
    table = ds.data.table
    # HF features in the schema metadata: load_dataset("parquet") restores Image()
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False, store_schema=True)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    ap.add_argument("--out", type=Path, default=LOCAL, help="task_configs/local (default)")
    args = ap.parse_args(argv)
    from harness_merge.task_utils import sync_generated

    return sync_generated({rel: parquet_bytes(rel) for rel in FILES}, args.out, check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
