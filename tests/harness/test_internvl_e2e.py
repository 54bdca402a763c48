"""InternVL2.5 (transformers' native classes): full-checkpoint merges served by
hf through the real ``lmms_eval`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import find_results
from .test_lmms_e2e import _explain, _lls, _lmms, _model_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def internvl(hw):
    from harness_merge.demo.tiny import build_tiny_internvl, perturbed_checkpoint

    base = build_tiny_internvl(hw / "internvl_base", seed=0)
    cks = [perturbed_checkpoint(base, hw / f"internvl_ft{i}", seed=50 + i, rel_std=0.3) for i in (1, 2)]
    return Path(base), [Path(c) for c in cks]


def test_internvl_full_checkpoint_merge_through_lmms_eval(run_cli, internvl, mm_tasks, merge_cache, hw):
    from transformers import InternVLForConditionalGeneration

    base, cks = internvl
    out = hw / "lmms_internvl_ta"
    p = _lmms(
        run_cli,
        _model_args(base, cks, "ta", cache_dir=merge_cache, scaling=0.5),
        "hm_pope_mini,hm_pope_mc_mini",
        mm_tasks,
        out,
    )
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(out)
    merge = results["config"]["merge"]
    assert merge["artifact"]["kind"] == "full" and merge["manifest"]["inputs_kind"] == "dense"
    assert len(samples["hm_pope_mini"]) == 4

    # the served weights: theta_0 + 0.5 * sum_n (theta_n - theta_0), vision tower and projector included
    def load(d):
        return InternVLForConditionalGeneration.from_pretrained(str(d)).state_dict()

    got, th0 = load(merge["artifact"]["path"]), load(base)
    ths = [load(c) for c in cks]
    checked = 0
    for k in got:
        if (
            any(
                s in k
                for s in ("vision_tower", "multi_modal_projector", "language_model.layers.0.self_attn.q_proj")
            )
            and got[k].dim() == 2
        ):
            exp = th0[k] + 0.5 * sum(t[k] - th0[k] for t in ths)
            torch.testing.assert_close(got[k], exp, rtol=1e-5, atol=1e-5, msg=k)
            checked += 1
    assert checked >= 5

    # the merge is what is served: the base alone scores the choices differently
    out0 = hw / "lmms_internvl_base"
    p0 = _lmms(run_cli, f"pretrained={base},method=none", "hm_pope_mc_mini", mm_tasks, out0)
    assert p0.returncode == 0, _explain(p0)
    _, s0 = find_results(out0)
    ll0 = [v for s in sorted(s0["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    ll1 = [v for s in sorted(samples["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    assert len(ll0) == len(ll1) > 0 and max(abs(a - b) for a, b in zip(ll0, ll1)) > 1e-3
