"""The mini-benchmark's synthetic image tasks (PIL, deterministic given a seed).

Seen tasks (one LoRA expert each):

- ``colour``: "What colour?"            -> red | green | blue | yellow   (demo generator)
- ``shape``:  "What shape?"             -> circle | square | triangle    (demo generator)
- ``count``:  "How many shapes?"        -> one | two | three | four      (demo generator)
- ``size``:   "Big or small?"           -> big | small   (new: one shape, side 32-42 or 12-20)

Unseen tasks (no expert trained on them; they need the experts' skills):

- ``colour_shape``: "What colour and shape?" -> "red circle" (colour + shape
  skills in one answer; the format is known to the base from its captions)
- ``colour_alt``:   "Which colour is it?"    -> colour (held-out wording)
- ``shape_alt``:    "Which shape is it?"     -> shape  (held-out wording)

The base is pre-trained on ``caption`` ("Describe the image.") and a few rows of
each seen task. A row is ``{"question_id", "question", "answer", "image"}``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from harness_merge.demo import data as ddata

COLOURS = tuple(ddata.COLOURS)
SHAPES = ddata.SHAPES
SIZES = ("big", "small")


@dataclass(frozen=True)
class TaskDef:
    name: str
    question: str
    labels: tuple[str, ...]
    seen: bool  # an expert trains on it


TASKS: dict[str, TaskDef] = {
    "colour": TaskDef("colour", ddata.TASKS["colour"].question, COLOURS, True),
    "shape": TaskDef("shape", ddata.TASKS["shape"].question, SHAPES, True),
    "count": TaskDef("count", ddata.TASKS["count"].question, ddata.COUNTS, True),
    "size": TaskDef("size", "Big or small?", SIZES, True),
    "colour_shape": TaskDef(
        "colour_shape", "What colour and shape?", tuple(f"{c} {s}" for c in COLOURS for s in SHAPES), False
    ),
    "colour_alt": TaskDef("colour_alt", "Which colour is it?", COLOURS, False),
    "shape_alt": TaskDef("shape_alt", "Which shape is it?", SHAPES, False),
}
SEEN = tuple(n for n, t in TASKS.items() if t.seen)
UNSEEN = tuple(n for n, t in TASKS.items() if not t.seen)
DEMO_GENERATED = ("colour", "shape", "count", "caption")


def draw_sized(rng: np.random.RandomState, label: str) -> Image.Image:
    """One shape of random colour and kind: side 32-42 for ``big``, 12-20 for ``small``
    (any big shape covers more pixels than any small one)."""
    side = int(rng.randint(32, 43)) if label == "big" else int(rng.randint(12, 21))
    colour = COLOURS[int(rng.randint(len(COLOURS)))]
    shape = SHAPES[int(rng.randint(len(SHAPES)))]
    img = Image.new("RGB", (ddata.SIZE, ddata.SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0 = int(rng.randint(2, ddata.SIZE - side - 1))
    y0 = int(rng.randint(2, ddata.SIZE - side - 1))
    ddata._draw_shape(d, shape, (x0, y0, x0 + side, y0 + side), ddata.COLOURS[colour])
    return img


def make_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``task`` (or ``caption``), labels balanced round robin, deterministic in ``seed``.

    ``colour``, ``shape``, ``count`` and ``caption`` are the demo's own rows
    (:func:`harness_merge.demo.data.make_rows`); the question ids are ``mb_``-prefixed."""
    if task in DEMO_GENERATED:
        rows = ddata.make_rows(task, n, seed=seed)
        return [{**r, "question_id": f"mb_{r['question_id']}"} for r in rows]
    if task not in TASKS:
        raise ValueError(f"unknown minibench task {task!r}; known: {sorted(TASKS)} and 'caption'")
    t = TASKS[task]
    rng = np.random.RandomState([seed, zlib.crc32(task.encode()) % (2**31)])
    rows = []
    for i in range(n):
        label = t.labels[i % len(t.labels)]
        if task == "size":
            img = draw_sized(rng, label)
        elif task == "colour_shape":
            colour, shape = label.split(" ")
            img = ddata.draw_single(rng, colour, shape, size=44)
        elif task == "colour_alt":
            img = ddata.draw_single(rng, label, SHAPES[int(rng.randint(len(SHAPES)))])
        elif task == "shape_alt":
            img = ddata.draw_single(rng, COLOURS[int(rng.randint(len(COLOURS)))], label, size=44)
        else:  # pragma: no cover - every TaskDef is handled above
            raise AssertionError(task)
        rows.append(
            {
                "question_id": f"mb_{task}-{seed}-{i:04d}",
                "question": t.question,
                "answer": label,
                "image": img,
            }
        )
    return rows


prompt = ddata.prompt


def score(prediction: str, answer: str) -> float:
    """100 for an exact match (case, spaces and a final full stop ignored), else 0."""
    return 100.0 * ddata.score(prediction, answer)
