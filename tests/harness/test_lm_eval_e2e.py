"""End to end through the real ``lm-eval-merged`` command (subprocesses)."""

from __future__ import annotations

import math

import pytest

from .conftest import find_results

pytestmark = pytest.mark.slow


def _explain(p) -> str:
    return f"rc={p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-6000:]}"


def _run(run_cli, model_args, tasks, include, out, *extra, model="merged"):
    return run_cli(
        "lm-eval-merged",
        [
            "--model",
            model,
            "--model_args",
            model_args,
            "--tasks",
            tasks,
            "--include_path",
            str(include),
            "--limit",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
            "--batch_size",
            "2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def ties_run(run_cli, text_lm, text_tasks, merge_cache, hw):
    base, ads = text_lm
    ma = f"pretrained={base},adapters={ads[0]};{ads[1]},method=ties,prune_rate=0.5,cache_dir={merge_cache}"
    out = hw / "lm_ties"
    return _run(run_cli, ma, "hm_text_gen,hm_text_mc,hm_text_ppl", text_tasks, out), out


def test_lm_eval_results(ties_run, text_lm):
    p, out = ties_run
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(out)
    r = results["results"]
    assert 0.0 <= r["hm_text_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= r["hm_text_mc"]["acc,none"] <= 1.0
    ppl = r["hm_text_ppl"]["word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1.0
    assert len(samples["hm_text_mc"]) == 4
    merge = results["config"]["merge"]
    assert merge["manifest"]["method"] == "ties"
    assert merge["manifest"]["params"]["prune_rate"] == 0.5
    assert [a["ref"] for a in merge["manifest"]["adapters"]] == [str(a) for a in text_lm[1]]
    # issue 10: results' model_name and output folder name the merge, not the base
    rid = merge["model_name"]
    assert rid.startswith(f"{text_lm[0].name}__ties-") and results["model_name"] == rid
    assert any(rid in str(f.relative_to(out)) for f in out.rglob("*results*.json"))
    assert "HookWarning" not in p.stderr  # every lm-eval hook bound silently (harness._compat)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "apply_chat_template"])
def test_builtin_hf_beside_merged_and_equal_per_sample(run_cli, text_lm, text_tasks, hw, chat):
    """``lm-eval-merged --model hf`` runs lm-eval's own model (registering ``merged``
    no longer hides the built-ins), and ``merged method=none`` gives its
    log-likelihoods sample for sample."""
    base, _ = text_lm
    extra = ("--apply_chat_template",) if chat else ()
    tag = "chat" if chat else "plain"
    p_ref = _run(
        run_cli,
        f"pretrained={base},dtype=float32",
        "hm_text_mc",
        text_tasks,
        hw / f"lm_hf_{tag}",
        *extra,
        model="hf",
    )
    assert p_ref.returncode == 0, _explain(p_ref)
    p_our = _run(
        run_cli,
        f"pretrained={base},method=none,dtype=float32",
        "hm_text_mc",
        text_tasks,
        hw / f"lm_none_{tag}",
        *extra,
    )
    assert p_our.returncode == 0, _explain(p_our)
    _, s_ref = find_results(hw / f"lm_hf_{tag}")
    _, s_our = find_results(hw / f"lm_none_{tag}")
    ref = sorted(s_ref["hm_text_mc"], key=lambda s: s["doc_id"])
    our = sorted(s_our["hm_text_mc"], key=lambda s: s["doc_id"])
    assert len(ref) == len(our) == 4
    for a, b in zip(ref, our):
        assert a["arguments"] == b["arguments"]
        la = [float(r[0]) for r in a["filtered_resps"]]
        lb = [float(r[0]) for r in b["filtered_resps"]]
        assert lb == pytest.approx(la, abs=1e-4)
