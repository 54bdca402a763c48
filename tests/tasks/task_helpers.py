"""Helpers for the offline task-config tests (``tests/tasks``).

Each test writes a tiny parquet file in the real dataset's column schema, points a
copy of the task's YAML at it (``dataset_path: parquet``), loads the task through
lmms-eval's ``TaskManager`` with ``include_path`` and calls the task's own
``doc_to_visual`` / ``doc_to_text`` / ``doc_to_target`` / ``process_results`` /
aggregation on its rows. Nothing is downloaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import PIL.Image as PIL_Image
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "task_configs"

# --------------------------------------------------------------------------- YAML rewriting


class _Function(str):
    """A ``!function module.name`` tag, kept verbatim through load and dump."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def find_task_yaml(folder: Path, task: str) -> Path:
    for path in sorted(folder.glob("*.yaml")):
        if read_yaml(path).get("task") == task:
            return path
    raise LookupError(f"no YAML in {folder} defines task {task!r}")


def rewrite_for_parquet(yaml_path: Path, parquet: Path, split: str | None = None) -> dict:
    """Point a task YAML at a local parquet file, in place; returns the new top-level config.

    ``dataset_path`` becomes ``parquet``, ``dataset_name`` goes, and
    ``dataset_kwargs`` becomes ``{data_files: {<split>: <parquet>}}`` where the
    split is the task's ``test_split`` unless given.
    """
    cfg = read_yaml(yaml_path)
    split = split or cfg.get("test_split")
    if split is None:
        raise ValueError(f"{yaml_path.name} has no test_split; pass split=")
    cfg["dataset_path"] = "parquet"
    cfg.pop("dataset_name", None)
    cfg["dataset_kwargs"] = {"data_files": {split: str(parquet)}}
    cfg["test_split"] = split
    with open(yaml_path, "w", encoding="utf-8") as f:
        yaml.dump(cfg, f, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    return cfg


# --------------------------------------------------------------------------- data helpers


def png(color=(200, 30, 30), size=(32, 24)) -> "PIL_Image.Image":
    return PIL_Image.new("RGB", size, color)


def image_cell(img) -> dict:
    """An HF ``Image`` feature cell: ``{"bytes": <png>, "path": None}``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(rows: list[dict], features: dict, path: Path) -> Path:
    """Write ``rows`` with HF ``features`` (images as ``{bytes, path}``) to ``path``."""
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    ds.to_parquet(str(path))
    return path


IMAGE = datasets.Image()
STR = datasets.Value("string")
INT = datasets.Value("int64")
FLOAT = datasets.Value("float64")


def str_list():
    return datasets.Sequence(datasets.Value("string"))


# --------------------------------------------------------------------------- loading


class LocalTask:
    """A task loaded from a rewritten copy of its config folder, with scoring shortcuts."""

    def __init__(self, task):
        self.task = task
        self.docs = list(task.test_docs())

    def text(self, doc) -> str:
        return self.task.doc_to_text(doc)

    def visual(self, doc) -> list:
        return self.task.doc_to_visual(doc)

    def target(self, doc):
        return self.task.doc_to_target(doc)

    def results(self, doc, pred: str) -> dict:
        return self.task.process_results(doc, [pred])

    def aggregate(self, preds: list[str], metric: str = "score") -> float:
        """Score the whole split with one prediction per doc, through the task's own aggregation."""
        items = [self.results(doc, p)[metric] for doc, p in zip(self.docs, preds, strict=True)]
        return self.task.aggregation()[metric](items)
