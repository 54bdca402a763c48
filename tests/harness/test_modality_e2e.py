"""A modality-merged artifact: the vision model (its own encoder and connector on
the merged LLM) answers an image task through the real ``lmms_eval`` command."""

from __future__ import annotations

import pytest

from .conftest import find_results
from .test_lmms_e2e import _explain, _lls, _lmms

pytestmark = pytest.mark.slow


def test_vision_modality_of_merged_artifact_through_lmms_eval(run_cli, mm_tasks, hw):
    from harness_merge.demo.tiny import build_tiny_modality_models, build_tiny_text_lm
    from harness_merge.modality import merge_modalities

    root = hw / "modality"
    base = build_tiny_text_lm(root / "base", seed=0)
    models = build_tiny_modality_models(base, root, seed=0, rel_std=0.5)
    out = root / "merged"
    merge_modalities(str(base), {k: str(v) for k, v in models.items()}, "ties", out=out)
    lls = {}
    for name, path in (("merged", out / "vision"), ("own", models["vision"])):
        res_dir = hw / f"lmms_modality_{name}"
        p = _lmms(
            run_cli, f"pretrained={path},method=none", "hm_pope_mini,hm_pope_mc_mini", mm_tasks, res_dir
        )
        assert p.returncode == 0, _explain(p)
        _, samples = find_results(res_dir)
        assert len(samples["hm_pope_mini"]) == 4
        lls[name] = [
            v for s in sorted(samples["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)
        ]
    # the merged LLM is what answers: scores differ from the unmerged vision model's
    assert max(abs(a - b) for a, b in zip(lls["merged"], lls["own"])) > 1e-3
