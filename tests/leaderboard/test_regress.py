"""The regression gate on value-only cells (schema 1 files, compared with --tolerance):
equal files pass, drops beyond tolerance and missing cells fail, other grids are refused.
The paired statistical gate on per-sample scores is in test_regress_stats.py."""

from __future__ import annotations

import copy
import json

import pytest

from harness_merge.errors import MergeError
from harness_merge.leaderboard.regress import (
    GridMismatchError,
    RegressError,
    compare,
    grid_id,
    main,
)

SPEC = {
    "base": "tiny-qwen2-vl",
    "adapters": ["sqa", "vqa", "ocr"],
    "methods": [
        {"label": "copa", "method": "copa", "params": {"prune_rate": 0.8}},
        {"label": "ta", "method": "ta", "params": {"scale": 1.0}},
    ],
    "tasks": ["pope_local", "mme_local"],
}
VALUES = {
    ("copa", "pope_local"): 87.3,
    ("copa", "mme_local"): 61.0,
    ("ta", "pope_local"): 85.0,
    ("ta", "mme_local"): 58.5,
}


def make_results(values=VALUES, spec=SPEC, metric="score,none"):
    return {
        "schema_version": 1,
        "grid": {**spec, "grid_id": grid_id(spec)},
        "cells": [
            {
                "method": m,
                "params": {},
                "task": t,
                "metric": metric,
                "value": v,
                "manifest": {"code_version": "abc"},
            }
            for (m, t), v in values.items()
        ],
    }


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def run(tmp_path, base, new, *extra):
    return main(
        [
            "--baseline",
            write(tmp_path, "old.json", base),
            "--results",
            write(tmp_path, "new.json", new),
            *extra,
        ]
    )


def test_grid_id_is_stable_and_ignores_its_own_field():
    assert grid_id(SPEC) == grid_id(json.loads(json.dumps(SPEC)))
    assert grid_id({**SPEC, "grid_id": "whatever"}) == grid_id(SPEC)
    assert grid_id(dict(reversed(list(SPEC.items())))) == grid_id(SPEC)
    assert grid_id({**SPEC, "tasks": ["pope_local"]}) != grid_id(SPEC)


def test_equal_files_pass(tmp_path, capsys):
    report = compare(make_results(), make_results(), 0.0)
    assert report.ok and report.exit_code == 0
    assert {r.status for r in report.rows} == {"within"}
    assert run(tmp_path, make_results(), make_results(), "--tolerance", "0") == 0
    assert "PASS" in capsys.readouterr().out


def test_injected_drop_fails_and_is_shown(tmp_path, capsys):
    new = make_results({**VALUES, ("copa", "pope_local"): 80.0})
    report = compare(make_results(), new, 1.0)
    assert not report.ok
    [drop] = report.drops
    assert drop.key == ("copa", "pope_local", "score,none")
    assert drop.delta == pytest.approx(-7.3) and drop.tolerance == 1.0
    assert run(tmp_path, make_results(), new, "--tolerance", "1.0") == 1
    out = capsys.readouterr().out
    assert "DROP" in out and "copa" in out and "pope_local" in out and "-7.30" in out and "FAIL" in out


def test_drop_within_tolerance_passes(tmp_path):
    new = make_results({**VALUES, ("copa", "pope_local"): 86.5, ("ta", "mme_local"): 57.5})  # -0.8, -1.0
    assert compare(make_results(), new, 1.0).ok
    assert run(tmp_path, make_results(), new, "--tolerance", "1.0") == 0
    assert run(tmp_path, make_results(), new, "--tolerance", "0.5") == 1


def test_per_task_and_relative_tolerance(tmp_path):
    new = make_results({**VALUES, ("copa", "mme_local"): 58.0})  # -3.0 points, -4.9% of 61
    assert run(tmp_path, make_results(), new, "--tolerance", "1.0") == 1
    assert run(tmp_path, make_results(), new, "--tolerance", "1.0", "--tolerance-for", "mme_local=3.5") == 0
    assert run(tmp_path, make_results(), new, "--tolerance", "5", "--relative") == 0
    assert run(tmp_path, make_results(), new, "--tolerance", "4", "--relative") == 1
    assert compare(make_results(), new, {"mme_local": 3.0, "*": 0.0}).ok


def test_improvements_and_new_cells_do_not_fail(tmp_path, capsys):
    new = make_results({**VALUES, ("ta", "pope_local"): 90.0})
    new["cells"].append({"method": "ta", "task": "pope_local", "metric": "iou,none", "value": 40.0})
    report = compare(make_results(), new, 1.0)
    assert report.ok
    assert [r.key for r in report.of("improved")] == [("ta", "pope_local", "score,none")]
    assert [r.key for r in report.of("new")] == [("ta", "pope_local", "iou,none")]
    assert run(tmp_path, make_results(), new, "--tolerance", "1.0") == 0
    out = capsys.readouterr().out
    assert "IMPROVED" in out and "NEW" in out


def test_missing_cell_fails(tmp_path, capsys):
    new = make_results({k: v for k, v in VALUES.items() if k != ("ta", "mme_local")})
    report = compare(make_results(), new, 1.0)
    assert [r.key for r in report.missing] == [("ta", "mme_local", "score,none")]
    assert not report.ok
    assert run(tmp_path, make_results(), new) == 1
    assert "MISSING" in capsys.readouterr().out


def test_failed_cell_with_null_value_counts_as_missing():
    new = make_results()
    new["cells"][0]["value"] = None
    assert len(compare(make_results(), new, 1.0).missing) == 1


def test_lower_is_better_metric():
    base, new = make_results(), make_results()
    for data, wer in ((base, 10.0), (new, 14.0)):
        data["cells"].append(
            {
                "method": "copa",
                "task": "pope_local",
                "metric": "wer,none",
                "value": wer,
                "higher_is_better": False,
            }
        )
    [drop] = compare(base, new, 1.0).drops
    assert drop.key[2] == "wer,none" and drop.delta == pytest.approx(-4.0)


def test_different_grid_id_is_refused(tmp_path, capsys):
    other = make_results(spec={**SPEC, "base": "another-base"})
    with pytest.raises(GridMismatchError, match="grid_id differs"):
        compare(make_results(), other, 1.0)
    assert run(tmp_path, make_results(), other) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "grid_id differs" in err


def test_different_task_or_method_sets_are_refused(tmp_path, capsys):
    base = make_results()
    fewer_tasks = make_results()
    fewer_tasks["grid"]["tasks"] = ["pope_local"]  # same id (as if hashed differently), other tasks
    with pytest.raises(GridMismatchError, match=r"tasks differ \(only in baseline: mme_local\)"):
        compare(base, fewer_tasks)
    more_methods = copy.deepcopy(base)
    more_methods["grid"]["methods"].append({"label": "ties", "method": "ties", "params": {}})
    assert run(tmp_path, base, more_methods) == 2
    assert "methods differ (only in results: ties)" in capsys.readouterr().err


def test_sets_come_from_cells_when_grid_does_not_declare_them():
    spec = {"base": "b"}
    base = make_results(spec=spec)
    new = make_results({k: v for k, v in VALUES.items() if k[0] == "copa"}, spec=spec)
    with pytest.raises(GridMismatchError, match="only in baseline: ta"):
        compare(base, new)


@pytest.mark.parametrize(
    "broken, message",
    [
        ([], "expected a JSON object"),
        ({"cells": []}, "grid_id"),
        ({"grid": {"grid_id": "x"}, "cells": [{"method": "m", "task": "t", "value": 1}]}, "lacks metric"),
        (
            {
                "grid": {"grid_id": "x"},
                "cells": [{"method": "m", "task": "t", "metric": "s", "value": "high"}],
            },
            "must be a number or null",
        ),
        ({"schema_version": 3, "grid": {"grid_id": "x"}, "cells": []}, "schema_version 3"),
    ],
)
def test_malformed_files_are_errors(tmp_path, capsys, broken, message):
    with pytest.raises(RegressError, match=message):
        compare(broken, make_results())
    assert issubclass(RegressError, MergeError)
    assert run(tmp_path, broken, make_results()) == 2
    assert message.split()[0] in capsys.readouterr().err


def test_duplicate_cells_and_unreadable_files(tmp_path, capsys):
    dup = make_results()
    dup["cells"].append(dict(dup["cells"][0]))
    with pytest.raises(RegressError, match="two cells"):
        compare(dup, make_results())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--baseline", str(bad), "--results", str(bad)]) == 2
    assert main(["--baseline", str(tmp_path / "nope.json"), "--results", str(bad)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_tolerance_arguments(tmp_path):
    with pytest.raises(SystemExit):
        run(tmp_path, make_results(), make_results(), "--tolerance-for", "pope_local")
    assert run(tmp_path, make_results(), make_results(), "--tolerance", "-1") == 2
