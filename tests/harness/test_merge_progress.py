"""A merge inside a harness shows its bar on stderr, respecting the harness's
verbosity (lmms-eval: $VERBOSITY; lm-eval: the 'lm_eval' logger's level)."""

from __future__ import annotations

import logging

import pytest

from harness_merge import harness
from harness_merge.harness import load_merged, merge_progress
from harness_merge.harness.model_args import parse_model_args


@pytest.fixture
def quiet_env(monkeypatch):
    for k in ("VERBOSITY", "HARNESS_MERGE_PROGRESS"):
        monkeypatch.delenv(k, raising=False)
    lm = logging.getLogger("lm_eval")
    level = lm.level
    yield monkeypatch
    lm.setLevel(level)


def test_verbosity_rules(quiet_env):
    assert merge_progress()  # nothing configured: show it
    quiet_env.setenv("VERBOSITY", "WARNING")
    assert not merge_progress()
    quiet_env.setenv("VERBOSITY", "DEBUG")
    assert merge_progress()
    quiet_env.setenv("HARNESS_MERGE_PROGRESS", "0")
    assert not merge_progress()
    quiet_env.delenv("HARNESS_MERGE_PROGRESS")
    quiet_env.delenv("VERBOSITY")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    assert not merge_progress()
    logging.getLogger("lm_eval").setLevel(logging.INFO)
    assert merge_progress()


@pytest.mark.parametrize("verbosity,shown", [("INFO", True), ("WARNING", False)])
def test_load_merged_bar_on_stderr(quiet_env, adapters, tiny_base, tmp_path, capsys, verbosity, shown):
    from harness_merge import backends

    quiet_env.setenv("VERBOSITY", verbosity)
    quiet_env.setattr(backends, "load_backend", lambda *a, **k: object())  # the merge is what is tested
    h = parse_model_args(
        {
            "pretrained": str(tiny_base),
            "adapters": [str(a) for a in adapters],
            "method": "ties",
            "rank": 4,
            "cache_dir": str(tmp_path / "c"),
        }
    )
    load_merged(h)
    err = capsys.readouterr().err
    assert ("merge ties: " in err) is shown  # the bar: "merge ties:  50%|..."
    assert ("hashing the inputs" in err) is shown
    assert harness.FAILURES == []


@pytest.mark.slow
@pytest.mark.parametrize("verbosity,shown", [("INFO", True), ("WARNING", False)])
def test_lmms_eval_cli_shows_the_bar(run_cli, qwen2vl, mm_tasks, hw, verbosity, shown):
    """The real ``lmms_eval`` command: the merge bar on stderr at INFO, none at WARNING."""
    base, ads = qwen2vl
    ma = (
        f"pretrained={base},adapters=[{','.join(map(str, ads))}],method=ties,rank=4,"
        f"cache_dir={hw / f'progress_cache_{verbosity}'}"
    )
    p = run_cli(
        "lmms_eval",
        [
            "--model",
            "merged",
            "--model_args",
            ma,
            "--tasks",
            "hm_pope_mini",
            "--include_path",
            str(mm_tasks),
            "--limit",
            "2",
            "--verbosity",
            verbosity,
            "--output_path",
            str(hw / f"progress_{verbosity}"),
        ],
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert ("merge ties: " in p.stderr) is shown, p.stderr[-4000:]
