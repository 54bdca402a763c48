"""Fixtures for the offline task-config tests: load a task on a tiny local parquet.

See ``task_helpers.py`` for how a task's YAML is pointed at the parquet file.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[lmms])")
pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is not installed (comes with lmms-eval)")

from task_helpers import CONFIGS, LocalTask, find_task_yaml, rewrite_for_parquet, write_parquet  # noqa: E402


@pytest.fixture(scope="session")
def _offline_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(cache))
    mp.setenv("HF_DATASETS_CACHE", str(cache))
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture
def load_local_task(tmp_path, _offline_env):
    """``load_local_task(folder, task, rows, features, split=None) -> LocalTask``."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    def _load(
        folder: str, task: str, rows: list[dict], features: dict, split: str | None = None
    ) -> LocalTask:
        copy = tmp_path / folder
        if not copy.exists():
            shutil.copytree(CONFIGS / folder, copy, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
        parquet = write_parquet(rows, features, tmp_path / f"{task}.parquet")
        rewrite_for_parquet(find_task_yaml(copy, task), parquet, split)
        manager = TaskManager(include_path=str(copy), include_defaults=False)
        loaded = get_task_dict([task], manager)[task]
        return LocalTask(loaded)

    return _load
