"""Session fixtures for the demo package and the local tasks: tiny models built
from configs (seconds) and one lmms-eval TaskManager over task_configs/local."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
LOCAL_TASKS = REPO / "task_configs" / "local"
SIX = (
    "pope_local",
    "mme_local",
    "mmbench_en_dev_local",
    "scienceqa_img_local",
    "chartqa_local",
    "refcoco_bbox_rec_local",
)
DEMO = ("demo_colour", "demo_shape", "demo_count")


@pytest.fixture(scope="session")
def qwen2vl_dir(tmp_path_factory) -> Path:
    from harness_merge.demo.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny") / "qwen2vl", seed=0)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    from harness_merge.demo.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", seed=0)


@pytest.fixture(scope="session")
def text_lm_dir(tmp_path_factory) -> Path:
    from harness_merge.demo.tiny import build_tiny_text_lm

    return build_tiny_text_lm(tmp_path_factory.mktemp("tiny") / "text", seed=0)


@pytest.fixture(scope="session")
def local_tasks():
    """{task name: lmms-eval Task} for the six benchmarks and the demo tasks."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(LOCAL_TASKS))
    td = get_task_dict(list(SIX + DEMO), tm)

    def walk(d):
        for v in d.values():
            if isinstance(v, dict):
                yield from walk(v)
            else:
                yield v

    return {t.config.task: t for t in walk(td)}
