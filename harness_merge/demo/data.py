"""Synthetic image tasks for the demo, drawn with PIL (deterministic given a seed).

Three tasks share one kind of picture (coloured shapes on a white 56x56 canvas)
and differ in the question, so one tiny model can learn each from its own
adapter and a merge has something to combine:

- ``colour``: "What colour?"      -> red | green | blue | yellow
- ``shape``:  "What shape?"       -> circle | square | triangle
- ``count``:  "How many shapes?"  -> one | two | three | four

The demo's base model is pre-trained on ``caption`` ("Describe the image." ->
"red circle" for one large shape, "three shapes" for several small ones) and a
few rows of each task; each adapter then trains on one task.

The pictures are made so that a ~0.2M-parameter model learns each task in
seconds: ``shape`` draws one fixed size (circle, square and triangle then
differ in area) and ``count`` draws equal squares in distinct quadrants.

A row is ``{"question_id", "question", "answer", "image"}`` with ``image`` a PIL
image; :func:`to_hf_image` turns it into the HF ``datasets`` Image feature
format ``{"bytes", "path"}`` for parquet files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 56

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")


@dataclass(frozen=True)
class TaskDef:
    name: str
    question: str
    labels: tuple[str, ...]


TASKS: dict[str, TaskDef] = {
    "colour": TaskDef("colour", "What colour?", tuple(COLOURS)),
    "shape": TaskDef("shape", "What shape?", SHAPES),
    "count": TaskDef("count", "How many shapes?", COUNTS),
    "caption": TaskDef(
        "caption",
        "Describe the image.",
        tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
        + ("one shape",)
        + tuple(f"{n} shapes" for n in COUNTS[1:]),
    ),
}
DEMO_TASKS = ("colour", "shape", "count")

POST_PROMPT = ""  # short prompts: byte-level tokens make every character a position


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def draw_single(rng: np.random.RandomState, colour: str, shape: str, size: int | None = None) -> Image.Image:
    """One shape of ``colour`` at a random place; ``size`` (box side) random in
    [26, 40) unless given."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    s = int(rng.randint(26, 40)) if size is None else size
    x0 = int(rng.randint(2, SIZE - s - 2))
    y0 = int(rng.randint(2, SIZE - s - 2))
    _draw_shape(d, shape, (x0, y0, x0 + s, y0 + s), COLOURS[colour])
    return img


def draw_many(rng: np.random.RandomState, n: int) -> Image.Image:
    """``n`` squares of side 20 in ``n`` of the four quadrants, random colours."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    cells = rng.permutation(4)[:n]
    names = list(COLOURS)
    for c in cells:
        cx, cy = (int(c) % 2) * 28, (int(c) // 2) * 28
        s = 20
        x0 = cx + int(rng.randint(2, 28 - s - 1))
        y0 = cy + int(rng.randint(2, 28 - s - 1))
        col = COLOURS[names[int(rng.randint(len(names)))]]
        _draw_shape(d, "square", (x0, y0, x0 + s, y0 + s), col)
    return img


def make_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``task``, labels balanced (round robin), deterministic in ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; known: {sorted(TASKS)}")
    t = TASKS[task]
    # one stream per task so adding rows to one task leaves the others unchanged
    rng = np.random.RandomState([seed, sorted(TASKS).index(task)])
    rows = []
    for i in range(n):
        label = t.labels[i % len(t.labels)]
        if task == "colour":
            img = draw_single(rng, label, SHAPES[int(rng.randint(len(SHAPES)))])
        elif task == "shape":
            img = draw_single(rng, list(COLOURS)[int(rng.randint(len(COLOURS)))], label, size=44)
        elif task == "caption":
            first, second = label.split(" ")
            if first in COLOURS:
                img = draw_single(rng, first, second)
            else:
                img = draw_many(rng, COUNTS.index(first) + 1)
        else:
            img = draw_many(rng, COUNTS.index(label) + 1)
        rows.append(
            {"question_id": f"{task}-{seed}-{i:04d}", "question": t.question, "answer": label, "image": img}
        )
    return rows


def prompt(doc: dict) -> str:
    """The text the model sees for a demo row (the local task's ``doc_to_text``)."""
    return f"{doc['question']}{POST_PROMPT}"


def to_hf_image(img: Image.Image, path: str | None = None) -> dict:
    """PIL image -> the HF ``datasets`` Image feature's storage ``{"bytes", "path"}`` (PNG)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return {"bytes": buf.getvalue(), "path": path}


def score(prediction: str, answer: str) -> float:
    """Exact match after lower-casing and stripping spaces and a final full stop."""
    return float(prediction.strip().strip(".").strip().lower() == answer.strip().lower())
