"""The group configs: every task is indexed, and `score` is averaged the way the papers average.

Group aggregation is lmms-eval's own ``consolidate_group_results`` run on made-up
per-task results, so no dataset is loaded.
"""

from __future__ import annotations

import pytest
from task_helpers import CONFIGS, read_yaml

SUITES = {
    "mm_mergebench": {
        "mm_mergebench_seen": [
            "mmmb_scienceqa",
            "mmmb_imagenet",
            "mmmb_vqav2",
            "mmmb_rec_coco",
            "mmmb_ocrvqa",
            "mmmb_vizwiz_caption",
            "mmmb_flickr30k",
            "mmmb_iconqa",
        ],
        "mm_mergebench_unseen": ["mmmb_aokvqa", "mmmb_imagenet_r", "mmmb_screen2words", "mmmb_tabmwp"],
    },
    "capability_suite": {
        "cap_vqa": ["cap_vizwiz_vqa", "cap_gqa"],
        "cap_geometry": ["cap_mathvista_geometry", "cap_mathvision_geometry"],
        "cap_chart": ["cap_chartqa"],
        "cap_ocr": ["cap_textvqa", "cap_ocrvqa"],
        "cap_grounding": ["cap_refcoco", "cap_refcoco_plus", "cap_refcocog"],
    },
}


def _group_yamls(folder: str) -> dict[str, dict]:
    out = {}
    for path in (CONFIGS / folder).glob("*.yaml"):
        cfg = read_yaml(path)
        if "group" in cfg and "task" in cfg and isinstance(cfg["task"], list):
            out[cfg["group"]] = cfg
    return out


@pytest.mark.parametrize("folder", sorted(SUITES))
def test_task_manager_indexes_every_task_and_group(folder):
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(CONFIGS / folder), include_defaults=False)
    subgroups = SUITES[folder]
    expected_tasks = {t for tasks in subgroups.values() for t in tasks}
    assert expected_tasks <= set(manager.all_subtasks)
    assert set(subgroups) | {folder} <= set(manager.all_groups)
    groups = _group_yamls(folder)
    assert groups[folder]["task"] == list(subgroups)
    for name, tasks in subgroups.items():
        assert groups[name]["task"] == tasks
    for cfg in groups.values():
        assert cfg["aggregate_metric_list"] == [
            {"metric": "score", "aggregation": "mean", "weight_by_size": False}
        ]


def _fake_task(name: str):
    from lmms_eval.api.task import ConfigurableTask

    class _Named(ConfigurableTask):  # a Task that only knows its name; never loads data
        def __init__(self):
            pass

        task_name = property(lambda self: name)

    return _Named()


@pytest.mark.parametrize("folder", sorted(SUITES))
def test_groups_average_score_over_tasks(folder):
    """Each subgroup reports the plain mean of its tasks' `score`; the suite the mean over all tasks."""
    from lmms_eval.api.group import ConfigurableGroup
    from lmms_eval.evaluator_utils import consolidate_group_results

    groups = _group_yamls(folder)
    subgroups = SUITES[folder]
    task_dict, results, versions, value = {}, {}, {}, {}
    inner = {}
    for i, (group, tasks) in enumerate(subgroups.items()):
        members = {}
        for j, task in enumerate(tasks):
            value[task] = 10.0 * i + j + 1  # distinct numbers, unequal sample sizes
            results[task] = {
                "alias": task,
                "score,none": value[task],
                "score_stderr,none": 0.5,
                "samples": 10 * (j + 1),
                "iou,none": 3.0,
            }
            members[task] = _fake_task(task)
        inner[ConfigurableGroup(config=groups[group])] = members
        results[group] = {"alias": group}
    task_dict[ConfigurableGroup(config=groups[folder])] = inner
    results[folder] = {"alias": folder}

    results, _, show, _ = consolidate_group_results(results, versions, task_dict)
    assert show
    for group, tasks in subgroups.items():
        assert results[group]["score,none"] == pytest.approx(sum(value[t] for t in tasks) / len(tasks))
        assert "iou,none" not in results[group]
    everything = [t for tasks in subgroups.values() for t in tasks]
    assert results[folder]["score,none"] == pytest.approx(sum(value[t] for t in everything) / len(everything))
