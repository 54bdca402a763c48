"""`harness-merge demo` end to end (shortened training): build, train, copa merge,
and every row of the table (base, each adapter, the merge) by the real lmms-eval
CLI on model `merged` (issue 10: one path, so the table cannot disagree with itself)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("lmms_eval")
    from harness_merge.demo.run import main

    out = tmp_path / "demo"
    assert (
        main(
            [
                "--out",
                str(out),
                "--steps",
                "40",
                "--pretrain-steps",
                "40",
                "--tasks",
                "demo_colour,demo_shape,demo_count,pope_local",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["lmms_eval_rows"]
    assert set(rows) == {
        "base (zero-shot)",
        "adapter colour",
        "adapter shape",
        "adapter count",
        "merged copa",
    }
    lmms = summary["lmms_eval"]
    assert lmms == rows["merged copa"]
    for r in rows.values():
        assert {"demo_colour", "demo_shape", "demo_count", "pope_local"} <= set(r)
    assert "pope_accuracy" in lmms["pope_local"]
    # the adapters were trained on their own task: each beats the base there
    assert (
        rows["adapter colour"]["demo_colour"]["exact_match"]
        >= rows["base (zero-shot)"]["demo_colour"]["exact_match"]
    )
    printed = capsys.readouterr().out
    assert "merged copa" in printed and "adapter colour" in printed and "(in-process)" not in printed
