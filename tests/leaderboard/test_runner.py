"""Leaderboard runner end to end on the tiny Qwen2-VL and two local demo tasks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness_merge.leaderboard import regress, runner
from harness_merge.errors import MergeError

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "task_configs" / "local"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_qwen2vl, random_lora

    root = tmp_path_factory.mktemp("lb")
    base = build_tiny_qwen2vl(root / "base", seed=0)
    ads = {f"a{i}": str(random_lora(base, root / f"a{i}", rank=4, alpha=8, seed=i, std=2.0)) for i in (1, 2)}
    return root, str(base), ads


def write_grid(root: Path, base: str, ads: dict, **over) -> Path:
    grid = {
        "name": "tiny", "base": base, "adapters": ads,
        "methods": ["ta", {"method": "copa", "params": {"prune_rate": 0.5}}],
        "tasks": ["demo_colour", "demo_shape"], "groups": {"seen": ["demo_colour"], "unseen": ["demo_shape"]},
        "include_path": [str(LOCAL)], "references": {"base": True, "adapters": False},
        "limit": 3, "batch_size": 4, "model_args": {"max_new_tokens": 4, "dtype": "float32", "cache_dir": str(root / "cache")},
    }
    grid.update(over)
    p = root / "grid.yaml"
    p.write_text(yaml.safe_dump(grid))
    return p


def test_grid_runs_resumes_and_feeds_the_gate(tiny, monkeypatch):
    root, base, ads = tiny
    grid = runner.load_grid(write_grid(root, base, ads))
    assert [r.label for r in grid.rows] == ["base (zero-shot)", "ta", "copa(prune_rate=0.5)"]
    out = root / "out"
    data = runner.run(grid, out)
    assert data["failed_cells"] == 0
    for f in ("results.json", "results.md", "results.csv", "results.png"):
        assert (out / f).stat().st_size > 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 6
    assert all(0.0 <= c["value"] <= 100.0 for c in cells)
    assert {c["manifest"]["kind"] for c in cells} == {"base", "merge"}
    copa = next(c for c in cells if c["label"].startswith("copa"))
    assert copa["manifest"]["merge"]["method"] == "copa" and copa["manifest"]["versions"]["lmms_eval"]
    md = (out / "results.md").read_text()
    assert "avg:seen" in md and "copa(prune_rate=0.5)" in md

    # resume: nothing left to do -> no model is built
    calls = []
    real = runner.evaluate_row
    monkeypatch.setattr(runner, "evaluate_row", lambda row, g, tasks, tm: calls.append((row.label, tuple(tasks))) or real(row, g, tasks, tm))
    runner.run(grid, out)
    assert calls == []
    # a lost cell is the only work redone
    data = json.loads((out / "results.json").read_text())
    data["cells"] = [c for c in data["cells"] if not (c["label"] == "ta" and c["task"] == "demo_shape")]
    (out / "results.json").write_text(json.dumps(data))
    runner.run(grid, out)
    assert calls == [("ta", ("demo_shape",))]

    # cells carry evidence: stderr, n, per-sample scores, lmms-eval's own files, a model card
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == regress.SCHEMA_VERSION == 2
    for c in data["cells"]:
        assert c["n"] == 3 and len(c["samples"]["score"]) == 3 and c["samples"]["doc_id"] == [0, 1, 2]
        assert c["value"] == pytest.approx(sum(c["samples"]["score"]) / 3)
        assert c["stderr"] is not None and c["stderr"] >= 0
        lines = [json.loads(x) for x in (out / c["samples"]["file"]).read_text().splitlines()]
        assert [x["doc_id"] for x in lines] == [0, 1, 2] and all("filtered_resps" in x for x in lines)
        assert [float(x[c["metric"].split(",")[0]]) for x in lines] == c["samples"]["score"]
        lmms = json.loads((out / c["lmms_results"]).read_text())
        assert lmms["results"][c["task"]][c["metric"]] == pytest.approx(c["value"])
        assert "configs" in lmms and "n-samples" in lmms
    copa = next(c for c in data["cells"] if c["label"].startswith("copa"))
    card = (out / copa["card"]).read_text()
    assert card.startswith("---\nbase_model: ") and "model-index:" in card
    assert "lmms_eval --model merged --model_args" in card and "method=copa" in card and "prune_rate=0.5" in card
    for a in ads.values():
        assert a in card
    assert copa["manifest"]["merge"]["adapters"][0]["sha256"] in card
    assert not any("card" in c for c in data["cells"] if c["label"] == "base (zero-shot)")
    md = (out / "results.md").read_text()
    assert " ± " in md

    # the gate reads the runner's file: equal passes; a drop on 3 docs is noise (reported as
    # changed), and fails only at a loose per-cell alpha
    assert regress.main(["--baseline", str(out / "results.json"), "--results", str(out / "results.json")]) == 0
    best, worse = json.loads(json.dumps(data)), json.loads(json.dumps(data))
    for f, s in ((best, 100.0), (worse, 0.0)):
        f["cells"][0]["samples"]["score"] = [s] * 3
        f["cells"][0]["value"] = s
    (root / "best.json").write_text(json.dumps(best))
    (root / "worse.json").write_text(json.dumps(worse))
    args = ["--baseline", str(root / "best.json"), "--results", str(root / "worse.json")]
    assert regress.main(args) == 0
    assert regress.main(args + ["--correction", "none", "--alpha", "0.2"]) == 1


def test_results_of_another_grid_are_refused(tiny):
    root, base, ads = tiny
    out = root / "other"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"grid": {"grid_id": "deadbeef"}, "cells": []}))
    with pytest.raises(runner.GridError, match="holds results of another grid"):
        runner.run(runner.load_grid(write_grid(root, base, ads)), out)


@pytest.mark.parametrize("over,match", [
    ({"methods": ["copaa"]}, r"unknown method 'copaa'. Did you mean: copa"),
    ({"methods": [{"method": "ties", "params": {"prune": 0.5}}]}, "ties: unknown parameter 'prune'; known parameters"),
    ({"methods": [{"method": "ties", "params": {"prune_rate": [0.5, 1.5]}}]}, r"prune_rate must be in \[0, 1\)"),
    ({"tasks": ["demo_colour", "demo_shape", "demo_colr"]}, r"unknown task\(s\): demo_colr \(did you mean: demo_colour"),
    ({"backend": "trt"}, "backend must be hf or vllm"),
    ({"groups": {"seen": ["pope"]}}, r"group 'seen' names task\(s\) \['pope'\]"),
])
def test_bad_grid_fails_before_work(tiny, over, match):
    root, base, ads = tiny
    with pytest.raises(MergeError, match=match):
        runner.load_grid(write_grid(root, base, ads, **over))


def test_unknown_grid_key(tiny):
    root, base, ads = tiny
    p = write_grid(root, base, ads)
    p.write_text(p.read_text() + "sweeps: 3\n")
    with pytest.raises(MergeError, match=r"unknown key\(s\) \['sweeps'\]; valid keys"):
        runner.load_grid(p)


def test_sweep_expands_to_labelled_rows(tiny):
    root, base, ads = tiny
    g = runner.load_grid(write_grid(root, base, ads, methods=[{"method": "ties", "params": {"prune_rate": [0.5, 0.8], "weights": [1, 2]}}],
                                    references={"base": False, "adapters": True}), check_tasks=False)
    assert [r.label for r in g.rows] == ["adapter:a1", "adapter:a2", "ties(prune_rate=0.5,weights=[1, 2])", "ties(prune_rate=0.8,weights=[1, 2])"]
    assert g.rows[0].adapters == (ads["a1"],) and g.rows[0].method == "ta"


def test_vllm_grid_shares_one_engine_for_lora_rows(tiny, monkeypatch):
    """backend: vllm -> one prepare_engine call with every LoRA artifact, and the
    full-weight rows (dense methods) run after the shared-engine rows.
    (The real vLLM run of a grid is in tests/backends/test_vllm.py's venv.)"""
    import sys
    import types

    root, base, ads = tiny
    grid = runner.load_grid(write_grid(root, base, ads, backend="vllm", methods=["ties", "copa", "ta"],
                                       model_args={"max_new_tokens": 4, "cache_dir": str(root / "cache")}))
    calls = {}
    fake = types.ModuleType("harness_merge.backends.vllm")
    fake.prepare_engine = lambda b, arts, **opts: calls.setdefault("prepare", (b, [a.kind for a in arts], opts))
    monkeypatch.setitem(sys.modules, "harness_merge.backends.vllm", fake)
    order = runner.share_vllm_engine(grid, list(grid.rows))
    assert [r.label for r in order] == ["base (zero-shot)", "copa", "ta", "ties"]
    assert calls["prepare"][0] == base and calls["prepare"][1] == ["lora", "lora"]
