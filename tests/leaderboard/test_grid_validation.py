"""Grid fields: a path or list field takes a string or a list (one path is not
a list of characters); a wrong type is an error naming the key. Executors and
the runner's per-row ETA."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness_merge.errors import MergeError
from harness_merge.leaderboard import executors, runner

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "task_configs" / "local"


def _grid(tmp_path, **over) -> Path:
    (tmp_path / "a1").mkdir(exist_ok=True)
    g = {
        "name": "v",
        "base": "some/base",
        "adapters": ["a1"],
        "methods": ["ta"],
        "tasks": ["demo_colour"],
        "include_path": str(LOCAL),
    }
    g.update(over)
    for k in [k for k, v in g.items() if v is None]:
        del g[k]
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(g))
    return p


def test_strings_where_lists_go(tmp_path):
    g = runner.load_grid(
        _grid(tmp_path, tasks="demo_colour", methods="copa", adapters="a1", groups={"seen": "demo_colour"})
    )
    assert g.include_path == [str(LOCAL)]  # not a list of characters
    assert g.tasks == ["demo_colour"] and g.groups == {"seen": ["demo_colour"]}
    assert [r.label for r in g.rows][-1] == "copa" and g.adapters == {"a1": str((tmp_path / "a1").resolve())}
    assert g.resources == {"num_cpus": 1, "num_gpus": 0}


@pytest.mark.parametrize(
    "over,match",
    [
        ({"include_path": {"a": 1}}, r"'include_path' must be a string or a list of strings, got \{'a': 1\}"),
        ({"tasks": 3}, "'tasks' must be a string or a list of strings, got 3"),
        ({"tasks": [["demo_colour"]]}, "'tasks' must be a string or a list"),
        ({"adapters": {"a1": ["x"]}}, "'adapters.a1' must be a path or hub id"),
        ({"groups": {"seen": {"x": 1}}}, "'groups.seen' must be a string or a list"),
        ({"groups": ["seen"]}, "'groups' must be a mapping"),
        ({"model_args": "max_new_tokens=4"}, "'model_args' must be a mapping"),
        ({"batch_size": "8"}, "'batch_size' must be an integer, got '8'"),
        ({"limit": "all"}, "'limit' must be a number"),
        ({"base": ["b1", "b2"]}, "'base' must be a path or hub id"),
        ({"methods": [{"method": "ties", "params": [0.5]}]}, r"'methods\[ties\].params' must be a mapping"),
        ({"methods": 5}, "'methods' must be a method name or a list"),
        ({"resources": {"num_gpu": 1}}, r"resources: unknown key\(s\) \['num_gpu'\]"),
        ({"resources": {"num_gpus": -1}}, r"'resources.num_gpus' must be a number >= 0"),
    ],
)
def test_wrong_types_name_the_key(tmp_path, over, match):
    with pytest.raises(MergeError, match=match):
        runner.load_grid(_grid(tmp_path, **over), check_tasks=False)


def test_eta_and_executor_choice():
    assert executors.eta_line(1, 4, 30.0) == "elapsed 30s, ETA 1m30s"
    assert executors.eta_line(4, 4, 3700.0) == "elapsed 1h01m, ETA 0s"
    assert executors.make_executor("serial").name == "serial"
    assert executors.make_executor("ray", workers=2).name == "ray"
    with pytest.raises(MergeError, match="apply to --executor ray only"):
        executors.make_executor("serial", address="host:6379")
    with pytest.raises(MergeError, match="unknown executor 'dask'"):
        executors.make_executor("dask")
    with pytest.raises(MergeError, match="--workers must be >= 1"):
        executors.make_executor("ray", workers=0)
