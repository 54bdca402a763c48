"""The Ray executor's dispatch, on a stand-in ``ray`` module (in-process actors,
``wait`` returning the oldest call): rows spread over the workers, results
come back to the runner as the one writer of results.json, in grid order,
equal to the serial run's; a dead worker fails its row only. The real local
Ray run is tests/leaderboard/test_ray_executor.py (slow)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from harness_merge.leaderboard import executors, runner

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "task_configs" / "local"


class _Ref:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args


def fake_ray(resources=None, die_on=None):
    """A ``ray`` module whose actors run in this process."""
    mod = types.ModuleType("ray")
    state = {"init": False, "actors": [], "killed": 0, "init_kw": None}

    class Handle:
        def __init__(self, obj):
            self._obj = obj

        def __getattr__(self, name):
            fn = getattr(self._obj, name)
            return types.SimpleNamespace(remote=lambda *a: _Ref(fn, a))

    def remote(**opts):
        def wrap(cls):
            def make(*a):
                h = Handle(cls(*a))
                state["actors"].append((h, opts))
                return h

            return types.SimpleNamespace(remote=make)

        return wrap

    def get(ref):
        if die_on and ref.args[0].label == die_on:
            raise RuntimeError("actor died")
        return ref.fn(*ref.args)

    mod.is_initialized = lambda: state["init"]
    mod.init = lambda **kw: state.update(init=True, init_kw=kw)
    mod.shutdown = lambda: state.update(init=False)
    mod.cluster_resources = lambda: resources or {"CPU": 4.0}
    mod.remote = remote
    mod.wait = lambda refs, num_returns=1: (refs[:1], refs[1:])
    mod.get = get
    mod.kill = lambda a: state.update(killed=state["killed"] + 1)
    mod.state = state
    return mod


@pytest.fixture
def grid(tmp_path, monkeypatch):
    for a in ("a1", "a2"):
        (tmp_path / a).mkdir()
    p = tmp_path / "grid.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "name": "fake",
                "base": "b",
                "adapters": ["a1", "a2"],
                "methods": ["ta", "copa", "ties"],
                "tasks": ["t1", "t2"],
                "references": {"base": True, "adapters": True},
                "resources": {"num_cpus": 2, "num_gpus": 0},
            }
        )
    )
    g = runner.load_grid(p, check_tasks=False)

    def evaluate_row(row, grid, tasks, tm):  # deterministic per (row, task); no harness
        return (
            {t: {"score,none": float(len(row.label) * 10 + i)} for i, t in enumerate(tasks)},
            {"manifest": None},
            None,
        )

    monkeypatch.setattr(runner, "evaluate_row", evaluate_row)
    monkeypatch.setattr(runner, "_task_manager", lambda include: None)
    monkeypatch.setattr(runner, "write_reports", lambda data, grid, out: None)
    return g


def test_fake_ray_equals_serial(grid, tmp_path, monkeypatch, capsys):
    ray = fake_ray({"CPU": 4.0})
    monkeypatch.setitem(sys.modules, "ray", ray)
    serial = runner.run(grid, tmp_path / "serial")
    par = runner.run(grid, tmp_path / "ray", executor=executors.RayExecutor())
    err = capsys.readouterr().err

    def strip(cells):
        return [(c["label"], c["task"], c["metric"], c["value"]) for c in cells]

    assert strip(par["cells"]) == strip(serial["cells"]) and len(par["cells"]) == 6 * 2
    on_disk = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert strip(on_disk["cells"]) == strip(serial["cells"])
    # 4 CPUs / num_cpus 2 -> 2 workers, each holding the grid's resources
    assert "ray: 2 worker(s) (num_cpus=2, num_gpus=0 each)" in err
    assert [o for _, o in ray.state["actors"]] == [{"num_cpus": 2.0, "num_gpus": 0.0}] * 2
    assert ray.state["killed"] == 2 and not ray.state["init"]  # actors and the local Ray torn down
    assert ray.state["init_kw"]["runtime_env"]["env_vars"] is not None
    assert "done 6/6" in err and "ETA 0s" in err


def test_dead_worker_fails_its_row_only(grid, tmp_path, monkeypatch):
    ray = fake_ray({"CPU": 2.0}, die_on="copa")
    monkeypatch.setitem(sys.modules, "ray", ray)
    data = runner.run(grid, tmp_path / "ray", executor=executors.RayExecutor(workers=1))
    failed = {c["label"] for c in data["cells"] if c["value"] is None}
    assert failed == {"copa"} and data["failed_cells"] == 2
    assert len(ray.state["actors"]) == 2  # a fresh worker replaced the dead one
    # resume: only the failed row runs again
    ray2 = fake_ray({"CPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", ray2)
    data = runner.run(grid, tmp_path / "ray", executor=executors.RayExecutor(workers=1))
    assert data["failed_cells"] == 0 and len(data["cells"]) == 12


def test_address_is_passed_and_missing_ray_is_clear(grid, tmp_path, monkeypatch):
    ray = fake_ray()
    monkeypatch.setitem(sys.modules, "ray", ray)
    runner.run(grid, tmp_path / "a", executor=executors.RayExecutor(address="head:6379"))
    assert ray.state["init_kw"]["address"] == "head:6379"
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(Exception, match=r"--executor ray needs Ray: pip install 'harness-merge\[ray\]'"):
        runner.run(grid, tmp_path / "b", executor=executors.RayExecutor())
