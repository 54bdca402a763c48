"""End to end through the real ``lmms_eval`` command (subprocesses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import REPO, find_results

pytestmark = pytest.mark.slow

LIMIT = 4


def _model_args(base, adapters, method="copa", **extra) -> str:
    parts = [f"pretrained={base}", f"adapters=[{','.join(str(a) for a in adapters)}]", f"method={method}"]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return ",".join(parts)


def _lmms(run_cli, model_args: str, tasks: str, include: Path, out: Path, *extra: str):
    return run_cli(
        "lmms_eval",
        [
            "--model",
            "merged",
            "--model_args",
            model_args,
            "--tasks",
            tasks,
            "--include_path",
            str(include),
            "--limit",
            str(LIMIT),
            "--output_path",
            str(out),
            "--log_samples",
            "--batch_size",
            "2",
            *extra,
        ],
    )


def _lls(sample) -> list[float]:
    """The per-choice log-likelihoods of a multiple_choice sample (lmms-eval
    writes ``filtered_resps`` as ``[[ll, is_greedy], ...]``, as strings)."""
    return [float(x[0]) for x in sample["filtered_resps"]]


def _explain(p) -> str:
    return f"rc={p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-6000:]}"


@pytest.fixture(scope="module")
def copa_run(run_cli, qwen2vl, mm_tasks, merge_cache, hw):
    base, ads = qwen2vl
    out = hw / "lmms_copa"
    ma = _model_args(base, ads, "copa", cache_dir=merge_cache, prune_rate=0.5)
    p = _lmms(run_cli, ma, "hm_pope_mini,hm_pope_mc_mini", mm_tasks, out)
    return p, out, ma


def test_copa_run_writes_results(copa_run):
    p, out, _ = copa_run
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(out)
    r = results["results"]
    assert 0.0 <= r["hm_pope_mini"]["exact_match,none"] <= 1.0
    assert 0.0 <= r["hm_pope_mc_mini"]["acc,none"] <= 1.0
    assert set(samples) >= {"hm_pope_mini", "hm_pope_mc_mini"}
    assert len(samples["hm_pope_mini"]) == LIMIT
    for s in samples["hm_pope_mini"]:
        assert isinstance(s["filtered_resps"][0], str)
    for s in samples["hm_pope_mc_mini"]:
        lls = _lls(s)
        assert len(lls) == 2 and all(v < 0 for v in lls)


def test_copa_run_records_merge_in_results(copa_run, qwen2vl):
    p, out, _ = copa_run
    results, _ = find_results(out)
    merge = results["config"]["merge"]
    man = merge["manifest"]
    assert man["method"] == "copa"
    assert man["params"]["prune_rate"] == 0.5
    assert [a["ref"] for a in man["adapters"]] == [str(a) for a in qwen2vl[1]]
    assert man["content_hash"] == "xxh3_128" and all(len(a["xxh3_128"]) == 32 for a in man["adapters"])
    assert merge["artifact"]["kind"] in ("lora", "full")
    assert "method=copa" in p.stderr and "harness-merge" in p.stderr
    # issue 10: the run is named by what was merged, not by its base
    base = qwen2vl[0]
    rid = merge["model_name"]
    assert rid.startswith(f"{base.name}__copa-") and len(rid.rsplit("-", 1)[1]) == 8
    assert results["model_name"] == rid
    res_file = sorted(out.rglob("*results*.json"))[-1]
    assert rid in str(res_file.relative_to(out)), res_file
    # the profile chosen from the base's model_type, and the first prompt it rendered
    assert merge["prompt_profile"]["name"] == "qwen2_vl"
    assert merge["first_prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "HookWarning" not in p.stderr  # every lmms-eval hook bound silently (harness._compat)


def test_second_run_hits_merge_cache(copa_run, run_cli, mm_tasks, hw):
    p0, _, ma = copa_run
    assert p0.returncode == 0, _explain(p0)
    out = hw / "lmms_copa_again"
    p = _lmms(run_cli, ma, "hm_pope_mini", mm_tasks, out)
    assert p.returncode == 0, _explain(p)
    results, _ = find_results(out)
    assert results["config"]["merge"]["cache_hit"] is True
    assert "[cache hit]" in p.stderr


def test_merged_outputs_differ_from_base(copa_run, run_cli, qwen2vl, mm_tasks, merge_cache, hw):
    """The base alone (ta with scaling 0 = zero update) vs the merge: the
    log-likelihoods of the multiple-choice task must differ."""
    base, ads = qwen2vl
    _, out_merged, _ = copa_run
    out = hw / "lmms_zero"
    ma = _model_args(base, ads[:1], "ta", cache_dir=merge_cache, scaling=0)
    p = _lmms(run_cli, ma, "hm_pope_mc_mini", mm_tasks, out)
    assert p.returncode == 0, _explain(p)
    _, s0 = find_results(out)
    _, s1 = find_results(out_merged)
    ll0 = [v for s in sorted(s0["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    ll1 = [v for s in sorted(s1["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    assert len(ll0) == len(ll1) > 0
    assert max(abs(a - b) for a, b in zip(ll0, ll1)) > 1e-3


def test_unknown_model_arg_is_visible_and_fails(run_cli, qwen2vl, mm_tasks, hw):
    """The one error path run through the real command: lmms-eval swallows the
    model's exception, the exit status and the banner still reach the user.
    The other error paths are checked in-process (test_error_paths.py)."""
    base, ads = qwen2vl
    ma = _model_args(base, ads, "copa", prune_rat=0.5)
    p = _lmms(run_cli, ma, "hm_pope_mini", mm_tasks, hw / "lmms_badarg")
    assert p.returncode != 0, _explain(p)
    assert "harness-merge ERROR" in p.stderr
    assert "prune_rat" in p.stderr and "prune_rate" in p.stderr  # did-you-mean + valid keys


def test_upstream_lmms_eval_command_finds_merged(run_cli):
    """The entry point makes ``merged`` visible to lmms-eval's own registry."""
    import subprocess
    import sys

    code = (
        "from lmms_eval.models import get_model; c = get_model('merged'); "
        "print(c.__module__ + '.' + c.__name__)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "harness_merge.harness.lmms_model.MergedLMM" in p.stdout


LOCAL_TASKS = REPO / "task_configs" / "local"


@pytest.mark.skipif(
    not (LOCAL_TASKS / "pope_local.yaml").exists() and not any(LOCAL_TASKS.rglob("pope_local*.yaml"))
    if LOCAL_TASKS.exists()
    else True,
    reason="task_configs/local (pope_local, mme_local) not in this checkout",
)
def test_local_copies_of_real_benchmarks(run_cli, qwen2vl, merge_cache, hw):
    """The demo's local POPE/MME copies run through the real CLI with their own metrics
    (an even limit: MME scores questions in pairs)."""
    base, ads = qwen2vl
    out = hw / "lmms_local"
    p = run_cli(
        "lmms_eval",
        [
            "--model",
            "merged",
            "--model_args",
            _model_args(base, ads, "copa", cache_dir=merge_cache),
            "--include_path",
            str(LOCAL_TASKS),
            "--tasks",
            "pope_local,mme_local",
            "--limit",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
        ],
    )
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(out)
    assert "pope_local" in results["results"] and "mme_local" in results["results"]
    for task, metrics in results["results"].items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and "stderr" not in k and k != "alias":
                assert v >= 0, (task, k, v)
