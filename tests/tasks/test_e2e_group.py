"""End to end through lmms-eval's evaluator: a group run on local parquet files reports
the mean of its tasks' `score` (a fake model answers; nothing is downloaded)."""

from __future__ import annotations

import pytest
from task_helpers import IMAGE, INT, STR, image_cell, png, str_list
from test_mm_mergebench import CAPTION_REFS


class _FakeModel:
    """Answers every request from a fixed table keyed by task; built lazily on lmms-eval's base class."""

    ANSWERS = {
        "mmmb_aokvqa": ["C", "A"],
        "mmmb_imagenet_r": ["goldfish", "goldfish"],
        "mmmb_screen2words": [CAPTION_REFS[0][0], "a blue car parked at night"],
        "mmmb_tabmwp": ["4", "pen"],
    }

    @classmethod
    def make(cls):
        from lmms_eval.api.model import lmms

        class Fake(lmms):
            def generate_until(self, requests):
                return [cls.ANSWERS[r.args[4]][r.args[3]] for r in requests]

            def loglikelihood(self, requests):
                raise NotImplementedError

            def generate_until_multi_round(self, requests):
                raise NotImplementedError

        return Fake()


@pytest.mark.slow
def test_unseen_group_averages_task_scores(load_local_task, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    two = [image_cell(png()), image_cell(png((0, 90, 0)))]
    load_local_task(
        "mm_mergebench",
        "mmmb_aokvqa",
        [
            {
                "image": two[i],
                "question_id": str(i),
                "question": "What is it?",
                "choices": ["a", "b", "c", "d"],
                "correct_choice_idx": 2,
            }
            for i in range(2)
        ],
        {
            "image": IMAGE,
            "question_id": STR,
            "question": STR,
            "choices": str_list(),
            "correct_choice_idx": INT,
        },
    )
    load_local_task(
        "mm_mergebench",
        "mmmb_imagenet_r",
        [{"image": two[0], "class_name": "goldfish"}, {"image": two[1], "class_name": "hammerhead"}],
        {"image": IMAGE, "class_name": STR},
    )
    load_local_task(
        "mm_mergebench",
        "mmmb_screen2words",
        [{"screenId": i, "captions": CAPTION_REFS[i], "image": two[i]} for i in range(2)],
        {"screenId": INT, "captions": str_list(), "image": IMAGE},
    )
    load_local_task(
        "mm_mergebench",
        "mmmb_tabmwp",
        [
            {"image": two[0], "question": "Cost?", "options": [], "answer": "4"},
            {"image": two[1], "question": "Cheaper?", "options": ["pen", "book"], "answer": "pen"},
        ],
        {"image": IMAGE, "question": STR, "options": str_list(), "answer": STR},
    )

    manager = TaskManager(include_path=str(tmp_path / "mm_mergebench"), include_defaults=False)
    out = simple_evaluate(
        model=_FakeModel.make(),
        tasks=["mm_mergebench_unseen"],
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
    )
    res = out["results"]
    scores = {t: res[t]["score,none"] for t in _FakeModel.ANSWERS}
    assert (
        scores["mmmb_aokvqa"] == 50.0 and scores["mmmb_imagenet_r"] == 50.0 and scores["mmmb_tabmwp"] == 100.0
    )
    assert scores["mmmb_screen2words"] > 0.0
    assert res["mm_mergebench_unseen"]["score,none"] == pytest.approx(sum(scores.values()) / 4)
