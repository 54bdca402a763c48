"""Data parallel: ``accelerate launch --num_processes 2 -m lmms_eval --model merged``
on CPU gives the single-process run's per-sample outputs; the merge is built
once (both ranks use one cache entry) and each rank serves its shard."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import REPO, _env, find_results

pytestmark = pytest.mark.slow


def _samples(out):
    _, s = find_results(out)
    return {t: {d["doc_id"]: (d.get("arguments"), d["filtered_resps"]) for d in v} for t, v in s.items()}


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_two_process_accelerate_run_equals_single_process(run_cli, qwen2vl, mm_tasks, hw):
    base, ads = qwen2vl
    tasks = "hm_pope_mini,hm_pope_mc_mini"

    def args(out, cache):
        return [
            "--model",
            "merged",
            "--model_args",
            f"pretrained={base},adapters=[{ads[0]},{ads[1]}],method=copa,cache_dir={cache}",
            "--tasks",
            tasks,
            "--include_path",
            str(mm_tasks),
            "--limit",
            "5",
            "--output_path",
            str(out),
            "--log_samples",
            "--batch_size",
            "1",
        ]

    single = run_cli("lmms_eval", args(hw / "dp_single", hw / "dp_cache1"))
    assert single.returncode == 0, single.stderr[-4000:]
    # `accelerate launch` itself: its console script imports every subcommand, and
    # `accelerate estimate-memory` imports timm -> torchvision, which cannot load in
    # .venv (CPU torch); the launch subcommand's module runs the same launcher.
    # On CPU: `--cpu` starts ONE process (multi-CPU needs mpirun), so the torchrun
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU=true (Accelerator: MULTI_CPU, gloo)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29617",
        "-m",
        "lmms_eval",
    ] + [str(a) for a in args(hw / "dp_two", hw / "dp_cache2")]
    env = _env(hw)
    env["OMP_NUM_THREADS"] = "1"
    env["ACCELERATE_USE_CPU"] = "true"
    two = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-6000:]
    a, b = _samples(hw / "dp_single"), _samples(hw / "dp_two")
    assert set(a) == set(b) == {"hm_pope_mini", "hm_pope_mc_mini"}
    for t in a:
        assert sorted(a[t]) == sorted(b[t]) == list(range(5)), t  # every doc once, no padding duplicates
        for doc_id in a[t]:
            ra, rb = a[t][doc_id][1], b[t][doc_id][1]
            if t == "hm_pope_mc_mini":
                ra = [float(x[0]) for x in ra]
                rb = [float(x[0]) for x in rb]
                assert rb == pytest.approx(ra, abs=1e-5), (t, doc_id)
            else:
                assert ra == rb, (t, doc_id)
    # the merge was built once: one cache entry, both ranks on it
    entries = [p for p in (hw / "dp_cache2").rglob("harness_merge.json")]
    assert len(entries) == 1, entries
    res, _ = find_results(hw / "dp_two")
    assert res["config"]["merge"]["world_size"] == 2
    assert json.dumps(res["config"]["merge"]["manifest"]["adapters"]) == json.dumps(
        find_results(hw / "dp_single")[0]["config"]["merge"]["manifest"]["adapters"]
    )
