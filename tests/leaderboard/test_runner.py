"""Leaderboard runner end to end on the tiny Qwen2-VL and two local demo tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness_merge.errors import MergeError
from harness_merge.leaderboard import regress, runner

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
        "name": "tiny",
        "base": base,
        "adapters": ads,
        "methods": ["ta", {"method": "copa", "params": {"prune_rate": 0.5}}],
        "tasks": ["demo_colour", "demo_shape"],
        "groups": {"seen": ["demo_colour"], "unseen": ["demo_shape"]},
        "include_path": [str(LOCAL)],
        "references": {"base": True, "adapters": False},
        "limit": 3,
        "batch_size": 4,
        "model_args": {"max_new_tokens": 4, "dtype": "float32", "cache_dir": str(root / "cache")},
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
    monkeypatch.setattr(
        runner,
        "evaluate_row",
        lambda row, g, tasks, tm: calls.append((row.label, tuple(tasks))) or real(row, g, tasks, tm),
    )
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
    assert (
        "lmms_eval --model merged --model_args" in card and "method=copa" in card and "prune_rate=0.5" in card
    )
    for a in ads.values():
        assert a in card
    assert copa["manifest"]["merge"]["adapters"][0]["xxh3_128"] in card and "| xxh3_128 |" in card
    assert not any("card" in c for c in data["cells"] if c["label"] == "base (zero-shot)")
    md = (out / "results.md").read_text()
    assert " ± " in md

    # the gate reads the runner's file: equal passes; a drop on 3 docs is noise (reported as
    # changed), and fails only at a loose per-cell alpha
    assert (
        regress.main(["--baseline", str(out / "results.json"), "--results", str(out / "results.json")]) == 0
    )
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


def test_schema_1_results_in_out_are_refused_with_a_message(tiny):
    root, base, ads = tiny
    grid = runner.load_grid(write_grid(root, base, ads))
    out = root / "old_schema"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"schema_version": 1, "grid": grid.spec(), "cells": []}))
    with pytest.raises(runner.GridError, match=r"schema_version 1 file .* --fresh to rerun"):
        runner.run(grid, out)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"methods": ["copaa"]}, r"unknown method 'copaa'. Did you mean: copa"),
        (
            {"methods": [{"method": "ties", "params": {"prune": 0.5}}]},
            "ties: unknown parameter 'prune'; known parameters",
        ),
        (
            {"methods": [{"method": "ties", "params": {"prune_rate": [0.5, 1.5]}}]},
            r"prune_rate must be in \[0, 1\)",
        ),
        (
            {"tasks": ["demo_colour", "demo_shape", "demo_colr"]},
            r"unknown task\(s\): demo_colr \(did you mean: demo_colour",
        ),
        ({"backend": "trt"}, "backend must be hf or vllm"),
        ({"groups": {"seen": ["pope"]}}, r"group 'seen' names task\(s\) \['pope'\]"),
    ],
)
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
    g = runner.load_grid(
        write_grid(
            root,
            base,
            ads,
            methods=[{"method": "ties", "params": {"prune_rate": [0.5, 0.8], "weights": [1, 2]}}],
            references={"base": False, "adapters": True},
        ),
        check_tasks=False,
    )
    assert [r.label for r in g.rows] == [
        "adapter:a1",
        "adapter:a2",
        "ties(prune_rate=0.5,weights=[1, 2])",
        "ties(prune_rate=0.8,weights=[1, 2])",
    ]
    assert g.rows[0].adapters == (ads["a1"],) and g.rows[0].method == "ta"


def test_vllm_grid_shares_one_engine_for_lora_rows(tiny, monkeypatch):
    """backend: vllm -> one prepare_engine call with every LoRA artifact, and the
    full-weight rows (dense methods) run after the shared-engine rows.
    (The real vLLM run of a grid is in tests/backends/test_vllm.py's venv.)"""
    import sys
    import types

    root, base, ads = tiny
    grid = runner.load_grid(
        write_grid(
            root,
            base,
            ads,
            backend="vllm",
            methods=["ties", "copa", "ta"],
            model_args={"max_new_tokens": 4, "cache_dir": str(root / "cache")},
        )
    )
    calls = {}
    fake = types.ModuleType("harness_merge.backends.vllm")
    fake.prepare_engine = lambda b, arts, **opts: calls.setdefault(
        "prepare", (b, [a.kind for a in arts], opts)
    )
    monkeypatch.setitem(sys.modules, "harness_merge.backends.vllm", fake)
    order = runner.share_vllm_engine(grid, list(grid.rows))
    assert [r.label for r in order] == ["base (zero-shot)", "copa", "ta", "ties"]
    assert calls["prepare"][0] == base and calls["prepare"][1] == ["lora", "lora"]


def _fake_results(grid, value, stderr, samples=None):
    cells = []
    for r in grid.rows:
        for t in grid.tasks:
            v = value(r.label, t)
            cells.append(
                {
                    "method": r.method,
                    "label": r.label,
                    "params": r.params,
                    "task": t,
                    "metric": "exact_match,none",
                    "value": v,
                    "stderr": stderr,
                    "n": 100,
                    "samples": samples(r.label, t) if samples else None,
                }
            )
    return {"schema_version": 2, "grid": grid.spec(), "cells": cells}


def test_reports_show_stderr_normalised_accuracy_and_only_significant_best(tiny, tmp_path):
    """Tables from a fabricated results file (no model): value ± stderr, normalised accuracy
    against the experts, best-marking only outside the noise, labelled colour bar."""
    import numpy as np

    root, base, ads = tiny
    grid = runner.load_grid(
        write_grid(
            root,
            base,
            ads,
            references={"base": True, "adapters": True},
            experts={"demo_colour": "a1", "demo_shape": "a2"},
        ),
        check_tasks=False,
    )
    labels = [r.label for r in grid.rows]
    assert labels == ["base (zero-shot)", "adapter:a1", "adapter:a2", "ta", "copa(prune_rate=0.5)"]
    # demo_colour: copa 80 vs ta 40 over 100 docs (clear); demo_shape: copa 51 vs ta 50 (noise)
    score = {
        ("base (zero-shot)", "demo_colour"): 10,
        ("adapter:a1", "demo_colour"): 100,
        ("ta", "demo_colour"): 40,
        ("copa(prune_rate=0.5)", "demo_colour"): 80,
        ("base (zero-shot)", "demo_shape"): 20,
        ("adapter:a2", "demo_shape"): 50,
        ("ta", "demo_shape"): 50,
        ("copa(prune_rate=0.5)", "demo_shape"): 51,
    }

    def samples(label, task):
        k = score.get((label, task), 0)
        return {"doc_id": list(range(100)), "score": [1.0] * k + [0.0] * (100 - k), "answer": [None] * 100}

    data = _fake_results(grid, lambda lab, t: score.get((lab, t), 0) / 100, 0.04, samples)
    header, rows = runner.table(data, grid)
    assert rows[3][1] == (0.4, 0.04)
    assert rows[3][header.index("avg")] == (pytest.approx(0.45), pytest.approx(np.sqrt(2 * 0.04**2) / 2))
    nh, nrows = runner.normalised(data, grid)
    assert nh == ["method", "demo_colour", "demo_shape", "avg"]
    norm = {r[0]: r for r in nrows}
    assert set(norm) == {"base (zero-shot)", "ta", "copa(prune_rate=0.5)"}  # experts are 100 by definition
    assert norm["copa(prune_rate=0.5)"][1][0] == pytest.approx(80.0)
    assert norm["copa(prune_rate=0.5)"][2][0] == pytest.approx(102.0)
    r, se = norm["ta"][1]
    assert r == pytest.approx(40.0) and se == pytest.approx(
        40.0 * np.sqrt((0.04 / 0.4) ** 2 + (0.04 / 1.0) ** 2)
    )
    best = runner.best_cells(data, grid, header, rows, n_reference=3)
    assert (4, 0) in best  # copa beats ta on demo_colour beyond the noise
    assert not any(j == 1 for _, j in best)  # 51 vs 50 on demo_shape is noise: no best
    out = tmp_path / "rep"
    out.mkdir()
    runner.write_reports(data, grid, out)
    md = (out / "results.md").read_text()
    assert "0.40 ± 0.04" in md and "## Normalised accuracy (%)" in md and "80.00 ±" in md
    csv_head = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "demo_colour_stderr" in csv_head
    assert (out / "results.png").stat().st_size > 0


def test_plot_labels_its_colour_bar(tmp_path, monkeypatch):
    import matplotlib.figure

    labels = []
    real = matplotlib.figure.Figure.colorbar

    def spy(self, *a, **k):
        cb = real(self, *a, **k)
        labels.append(cb)
        return cb

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", spy)
    header = ["method", "t1", "avg"]
    rows = [["a", (1.0, 0.1), (1.0, 0.1)], ["b", (2.0, None), (2.0, None)]]
    runner.plot(header, rows, tmp_path / "p.png", title="x", n_reference=1, best={(1, 0)})
    assert labels and labels[0].ax.get_ylabel() == "score (the metric's own units)"


def test_experts_must_name_grid_tasks_and_adapters(tiny):
    root, base, ads = tiny
    with pytest.raises(MergeError, match=r"experts: task 'demo_count' is not in 'tasks'"):
        runner.load_grid(write_grid(root, base, ads, experts={"demo_count": "a1"}), check_tasks=False)
    with pytest.raises(MergeError, match=r"experts: 'demo_colour' names adapter 'a9'"):
        runner.load_grid(write_grid(root, base, ads, experts={"demo_colour": "a9"}), check_tasks=False)
    with pytest.raises(MergeError, match="experts needs the adapters' own rows"):
        runner.load_grid(write_grid(root, base, ads, experts={"demo_colour": "a1"}), check_tasks=False)


@pytest.mark.slow
def test_model_card_command_reproduces_the_row(tiny, tmp_path):
    """The card's lmms_eval command, run as written, gives the row's per-sample scores."""
    import os
    import shutil
    import subprocess
    import sys

    root, base, ads = tiny
    grid = runner.load_grid(
        write_grid(
            root,
            base,
            ads,
            methods=["ta"],
            tasks=["demo_colour"],
            groups={},
            references={"base": False, "adapters": False},
        )
    )
    data = runner.run(grid, tmp_path / "lb")
    [c] = data["cells"]
    card = (tmp_path / "lb" / c["card"]).read_text()
    command = card.split("```\n", 1)[1].split("\n```", 1)[0]
    assert command == c["manifest"]["command"] and command.startswith("lmms_eval --model merged ")
    bindir = os.path.dirname(sys.executable)
    assert shutil.which("lmms_eval", path=bindir)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    work = tmp_path / "repro"
    work.mkdir()
    subprocess.run(command, shell=True, cwd=work, env=env, check=True, capture_output=True, timeout=600)
    [samples] = list((work / "out").rglob("*_samples_demo_colour.jsonl"))
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == c["samples"]["doc_id"]
    assert [float(r["exact_match"]) for r in rows] == c["samples"]["score"]
    assert [regress.answer_hash(r["filtered_resps"]) for r in rows] == c["samples"]["answer"]
