"""The committed mini-benchmark: grid, models, baseline and task files agree; the
build script still trains a model that learns; the task generators are sound."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from harness_merge import methods as registry
from harness_merge.leaderboard import regress, runner
from harness_merge.minibench import build as mbuild
from harness_merge.minibench import data as mdata
from harness_merge.minibench import tasks as mtasks

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "minibench"
MODELS = BENCH / "models"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the grid names its models relative to the repository root
    try:
        yield runner.load_grid(BENCH / "grid.yaml")  # checks every method, parameter and task name
    finally:
        os.chdir(cwd)


def test_grid_covers_every_method_task_and_group(grid):
    defaults = {r.method for r in grid.rows if r.kind == "merge" and not r.params}
    assert defaults == set(registry.available()), "every registered method has a row with its defaults"
    assert grid.tasks == [mtasks.task_name(t) for t in mdata.TASKS]
    assert grid.groups == {"seen": [mtasks.task_name(t) for t in mdata.SEEN],
                           "unseen": [mtasks.task_name(t) for t in mdata.UNSEEN]}
    assert grid.adapters == {t: f"benchmarks/minibench/models/experts/{t}" for t in mdata.SEEN}
    assert grid.base == "benchmarks/minibench/models/base"  # repo-relative: grid_id is checkout-independent
    assert (REPO / grid.base / "model.safetensors").is_file()
    assert all((REPO / p / "adapter_model.safetensors").is_file() for p in grid.adapters.values())
    assert grid.limit is None and grid.backend == "hf" and grid.model_args["dtype"] == "float32"


def test_committed_models_are_small():
    size = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert size < 5 * 2**20, f"{size} bytes"


def test_baseline_is_a_run_of_the_committed_grid(grid):
    base = regress.load_results(BENCH / "baseline" / "results.json")
    assert base.grid_id == grid.spec()["grid_id"], "grid.yaml changed: rerun the baseline (see grid.yaml)"
    assert {c.label for c in base.cells.values()} == {r.label for r in grid.rows}
    assert len(base.cells) == len(grid.rows) * len(grid.tasks)
    assert all(c.value is not None and 0 <= c.value <= 100 for c in base.cells.values())
    for f in ("results.md", "results.csv", "results.png"):
        assert (BENCH / "baseline" / f).stat().st_size > 0
    # the gate passes the baseline against itself and fails a one-doc drop
    data = json.loads((BENCH / "baseline" / "results.json").read_text())
    assert regress.compare(data, data, 0.5).ok
    worse = json.loads(json.dumps(data))
    worse["cells"][0]["value"] -= 100 / 24
    assert not regress.compare(data, worse, 0.5).ok


def test_task_files_are_current():
    assert mtasks.main(["--check"]) == 0, "run: python -m harness_merge.minibench.tasks"


def test_each_committed_expert_beats_the_base_on_its_task():
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from harness_merge.demo.tiny import load_processor

    processor = load_processor(MODELS / "base")
    base = mbuild.accuracies(Qwen2VLForConditionalGeneration.from_pretrained(MODELS / "base"), processor,
                             mdata.SEEN, n=12)
    for task in mdata.SEEN:
        expert = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(MODELS / "base"),
                                           MODELS / "experts" / task)
        acc = mbuild.accuracies(expert, processor, [task], n=12)[task]
        assert acc >= 75 and acc > base[task] + 25, (task, acc, base[task])


def test_build_on_a_short_budget_learns(tmp_path):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from harness_merge.demo.tiny import load_processor

    info = mbuild.build(tmp_path, pretrain_steps=SHORT["pretrain"], expert_steps=SHORT["expert"],
                        expert_lr=SHORT["lr"], experts=("colour",), check=False)
    assert info["settings"]["expert_steps"] == SHORT["expert"]
    processor = load_processor(tmp_path / "base")
    base = mbuild.accuracies(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base"), processor,
                             ["colour"], n=12)["colour"]
    expert = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                       tmp_path / "experts" / "colour")
    acc = mbuild.accuracies(expert, processor, ["colour"], n=12)["colour"]
    assert acc > base + 25, (acc, base)
    cfg = json.loads((tmp_path / "experts" / "colour" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None  # no path of the building machine


# ~15 s; measured: base 0, expert 75 on 12 docs (20 + 60 steps do not learn)
SHORT = {"pretrain": 100, "expert": 80, "lr": 5e-3}


@pytest.mark.parametrize("task", list(mdata.TASKS))
def test_generators_are_deterministic_and_balanced(task):
    a = mdata.make_rows(task, 24, seed=3)
    b = mdata.make_rows(task, 24, seed=3)
    assert [r["image"].tobytes() for r in a] == [r["image"].tobytes() for r in b]
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert a[0]["image"].tobytes() != mdata.make_rows(task, 1, seed=4)[0]["image"].tobytes()
    counts = Counter(r["answer"] for r in a)
    labels = mdata.TASKS[task].labels
    assert set(counts) == set(labels[: min(24, len(labels))])
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all(r["question"] == mdata.TASKS[task].question and r["question_id"].startswith("mb_") for r in a)


def test_size_pictures_differ_in_area():
    import numpy as np

    area = {lab: [] for lab in mdata.SIZES}
    for r in mdata.make_rows("size", 40, seed=0):
        area[r["answer"]].append(int((np.asarray(r["image"]).min(axis=2) < 250).sum()))
    assert min(area["big"]) > max(area["small"])


def test_unseen_questions_are_not_expert_questions():
    seen_q = {mdata.TASKS[t].question for t in mdata.SEEN}
    assert all(mdata.TASKS[t].question not in seen_q for t in mdata.UNSEEN)
    assert mdata.score(" Red circle. ", "red circle") == 100.0 and mdata.score("red", "red circle") == 0.0
