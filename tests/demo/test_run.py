"""`harness-merge demo` end to end (shortened training): build, train, copa merge,
the real lmms-eval CLI on model `merged`, and the in-process numbers agree."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("lmms_eval")
    from harness_merge.demo.run import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--steps", "40", "--pretrain-steps", "40", "--tasks",
                 "demo_colour,demo_shape,demo_count,pope_local"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["in_process"]) == {"base (zero-shot)", "adapter colour", "adapter shape", "adapter count",
                                          "merged copa (in-process)"}
    lmms = summary["lmms_eval"]
    assert {"demo_colour", "demo_shape", "demo_count", "pope_local"} <= set(lmms)
    merged = summary["in_process"]["merged copa (in-process)"]
    for t in ("colour", "shape", "count"):  # same rows, same prompt, same greedy decoding
        assert lmms[f"demo_{t}"]["exact_match"] == pytest.approx(merged[t])
    assert "pope_accuracy" in lmms["pope_local"]
    printed = capsys.readouterr().out
    assert "merged copa (lmms-eval)" in printed and "adapter colour" in printed
