"""The local task YAMLs load in lmms-eval's TaskManager (--include_path) and the
real lmms-eval utils process their parquet rows; regeneration is deterministic."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
LOCAL_TASKS = REPO / "task_configs" / "local"
SIX = (
    "pope_local",
    "mme_local",
    "mmbench_en_dev_local",
    "scienceqa_img_local",
    "chartqa_local",
    "refcoco_bbox_rec_local",
)
DEMO = ("demo_colour", "demo_shape", "demo_count")

pytest.importorskip("lmms_eval")


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def _make_local_tasks():
    spec = importlib.util.spec_from_file_location(
        "make_local_tasks", REPO / "scripts" / "make_local_tasks.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", SIX + DEMO)
def test_task_docs_go_through_the_real_utils(local_tasks, name):
    task = local_tasks[name]
    docs = _docs(task)
    assert docs, name
    for doc in docs:
        visuals = task.doc_to_visual(doc)
        assert visuals and all(isinstance(v, Image.Image) for v in visuals)
        text = task.doc_to_text(doc)
        assert isinstance(text, str) and text.strip()
        target = task.doc_to_target(doc)
        # a perfect answer and a wrong one give metrics of the YAML (chartqa reports
        # one of its two split metrics per row; mmbench adds `submission`)
        metrics = {m["metric"] for m in task.config.metric_list}
        for pred in (target if isinstance(target, str) else str(target), "zzz"):
            res = task.process_results(doc, [pred])
            assert metrics & set(res), (name, set(res))
            assert set(res) - metrics <= {"submission"}, (name, set(res))


def _aggregate(task, preds):
    docs = _docs(task)
    per_metric = {}
    for doc, pred in zip(docs, preds):
        for k, v in task.process_results(doc, [pred]).items():
            per_metric.setdefault(k, []).append(v)
    aggs = task.aggregation()
    out = {}
    for m in task.config.metric_list:
        fn = aggs[m["metric"]]
        try:
            out[m["metric"]] = fn(per_metric[m["metric"]])
        except TypeError:  # aggregations that also take the CLI args (mmbench)
            import argparse

            out[m["metric"]] = fn(per_metric[m["metric"]], argparse.Namespace(output_path=None))
    return out


def _gold(task, doc):
    t = task.doc_to_target(doc)
    if task.config.task == "refcoco_bbox_rec_local":
        return "[" + ", ".join(f"{v:.3f}" for v in t) + "]"
    return str(t)


@pytest.mark.parametrize("name", SIX + DEMO)
def test_gold_answers_score_full_marks(local_tasks, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mmbench writes a results file next to the submission
    task = local_tasks[name]
    scores = _aggregate(task, [_gold(task, d) for d in _docs(task)])
    main = {
        "pope_local": ("pope_accuracy", 1.0),
        "mme_local": ("mme_perception_score", 200.0 * 4),  # 4 categories x (acc 100 + acc+ 100)
        "mmbench_en_dev_local": ("gpt_eval_score", 100.0),
        "scienceqa_img_local": ("exact_match", 1.0),
        "chartqa_local": ("relaxed_overall", 1.0),
        "refcoco_bbox_rec_local": ("refcoco_ACC@0.9", 1.0),
    }.get(name, ("exact_match", 1.0))
    assert math.isclose(scores[main[0]], main[1], rel_tol=1e-6), scores


def test_wrong_answers_score_zero(local_tasks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("pope_local", "mme_local", "mmbench_en_dev_local", "chartqa_local"):
        task = local_tasks[name]
        scores = _aggregate(task, ["zzz"] * len(_docs(task)))
        assert all(v == 0 for k, v in scores.items() if k != "pope_yes_ratio"), (name, scores)


def test_mme_rows_come_in_yes_no_pairs(local_tasks):
    docs = _docs(local_tasks["mme_local"])
    by_id = {}
    for d in docs:
        by_id.setdefault((d["category"], d["question_id"]), []).append(d["answer"])
    assert all(sorted(v) == ["No", "Yes"] for v in by_id.values())


def test_group_merge_six_local_lists_the_six():
    import yaml

    group = yaml.safe_load((LOCAL_TASKS / "merge_six_local.yaml").read_text())
    assert group["group"] == "merge_six_local" and tuple(group["task"]) == SIX


def test_parquet_regeneration_is_deterministic():
    mod = _make_local_tasks()
    for rel in mod.FILES:
        committed = (LOCAL_TASKS / rel).read_bytes()
        assert mod.parquet_bytes(rel) == committed, f"{rel}: run scripts/make_local_tasks.py"
        assert len(committed) < 20_000


def test_demo_parquet_rows_match_the_demo_eval_rows():
    """The demo's eval rows (scored through lmms-eval on these parquet files)
    are the generator's rows with the eval seed, which training never uses."""
    from datasets import load_dataset

    from harness_merge.demo import data as ddata

    mod = _make_local_tasks()
    for t in ddata.DEMO_TASKS:
        ds = load_dataset("parquet", data_files={"test": str(LOCAL_TASKS / "demo" / f"demo_{t}.parquet")})[
            "test"
        ]
        rows = ddata.make_rows(t, mod.DEMO_EVAL_ROWS, seed=mod.DEMO_SEED)
        assert [r["answer"] for r in rows] == ds["answer"]
        assert rows[0]["image"].tobytes() == ds[0]["image"].convert("RGB").tobytes()
