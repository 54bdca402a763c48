"""A damaged ``results.json`` is refused on resume with the ways out; the
runner keeps the previous version as ``results.json.bak``."""

from __future__ import annotations

import json
import types

import pytest

from harness_merge.artifact import fsio
from harness_merge.leaderboard import runner


def _grid(grid_id="g1"):
    # run() reads only grid.spec() before it looks at an existing results.json
    return types.SimpleNamespace(spec=lambda: {"grid_id": grid_id})


def test_write_keeps_the_previous_version(tmp_path):
    p = tmp_path / "results.json"
    fsio.atomic_write_text(p, '{"v": 1}', backup=True)
    assert not (tmp_path / "results.json.bak").exists()
    fsio.atomic_write_text(p, '{"v": 2}', backup=True)
    assert json.loads(p.read_text()) == {"v": 2}
    assert json.loads((tmp_path / "results.json.bak").read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["results.json", "results.json.bak"]


def test_truncated_results_name_the_backup_and_fresh(tmp_path):
    p = tmp_path / "results.json"
    good = json.dumps({"grid": {"grid_id": "g1"}, "cells": []})
    fsio.atomic_write_text(p, good, backup=True)
    fsio.atomic_write_text(p, good + " ", backup=True)
    p.write_text(good[: len(good) // 2])  # a truncated file
    with pytest.raises(runner.GridError) as ei:
        runner.run(_grid(), tmp_path)
    msg = str(ei.value)
    assert str(p) in msg and "damaged" in msg and "--fresh" in msg and f"cp {p}.bak {p}" in msg
    assert p.read_text() == good[: len(good) // 2]  # nothing rewritten


def test_leaderboard_out_under_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    from harness_merge.harness.cli import main as cli_main

    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(
        runner,
        "load_grid",
        lambda path: types.SimpleNamespace(spec=lambda: {"grid_id": "g"}, limit=None, out=None),
    )
    code = cli_main(["leaderboard", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "f" / "lb")])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.count("\n") == 1
        and err.startswith("harness-merge: error: ")
        and str(tmp_path / "f") in err
    )
