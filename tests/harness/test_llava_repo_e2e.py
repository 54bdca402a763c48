"""LLaVA-repo checkpoints (adapter + non_lora_trainables.bin) merged with copa and
served with LLaVA's vicuna_v1 template, through the real ``lmms_eval`` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import find_results
from .test_lmms_e2e import _explain, _lls, _lmms, _model_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llava_repo(hw):
    from harness_merge.demo.tiny import build_tiny_llava, save_llava_repo_lora

    base = build_tiny_llava(hw / "llava_hf_base", seed=0)
    cks = [
        save_llava_repo_lora(
            base, hw / f"llava_repo_ck{i}", rank=4, alpha=8, seed=40 + i, std=2.0, projector_std=0.5
        )
        for i in (1, 2)
    ]
    return Path(base), [Path(c) for c in cks]


def test_llava_repo_copa_vicuna_v1_through_lmms_eval(run_cli, llava_repo, mm_tasks, merge_cache, hw):
    from transformers import LlavaForConditionalGeneration

    base, cks = llava_repo
    out = hw / "lmms_llava_repo"
    ma = _model_args(base, cks, "copa", cache_dir=merge_cache, conv_template="vicuna_v1")
    p = _lmms(run_cli, ma, "hm_pope_mini,hm_pope_mc_mini", mm_tasks, out)
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(out)
    merge = results["config"]["merge"]
    assert merge["conv_template"] == "vicuna_v1"
    assert merge["artifact"]["kind"] == "full"
    assert merge["manifest"]["non_lora"]["layout"] == "llava_repo"
    assert len(samples["hm_pope_mini"]) == 4
    # the served weights hold the averaged projector of the two checkpoints
    art = Path(merge["artifact"]["path"])
    sd = LlavaForConditionalGeneration.from_pretrained(str(art)).state_dict()
    nls = [torch.load(str(c / "non_lora_trainables.bin"), weights_only=True) for c in cks]
    for orig, hf in (("0.weight", "linear_1.weight"), ("2.bias", "linear_2.bias")):
        mean = (
            nls[0][f"base_model.model.model.mm_projector.{orig}"]
            + nls[1][f"base_model.model.model.mm_projector.{orig}"]
        ) / 2
        torch.testing.assert_close(
            sd[f"model.multi_modal_projector.{hf}"].float(), mean, rtol=1e-5, atol=1e-5
        )

    # the template is used: without it the same merge scores the choices differently
    out2 = hw / "lmms_llava_repo_chatml"
    p2 = _lmms(
        run_cli, _model_args(base, cks, "copa", cache_dir=merge_cache), "hm_pope_mc_mini", mm_tasks, out2
    )
    assert p2.returncode == 0, _explain(p2)
    r2, s2 = find_results(out2)
    assert r2["config"]["merge"]["cache_hit"] is True
    ll1 = [v for s in sorted(samples["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    ll2 = [v for s in sorted(s2["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    assert len(ll1) == len(ll2) > 0 and max(abs(a - b) for a, b in zip(ll1, ll2)) > 1e-3
