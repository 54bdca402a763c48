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


def test_image_audio_video_tasks_of_one_modality_merge_through_lmms_eval(run_cli, mm_tasks, hw, monkeypatch):
    """``modalities={vision,audio,video}`` merged on load (ta): the image, audio and
    video tasks each answered by their modality in one run; the video scores move
    with the clip (the encoder is used) and differ from the unmerged video model's
    (the merged LLM answers)."""
    import shutil

    from modality.av_tasks import build_av_tasks

    from harness_merge.demo.tiny import build_tiny_modality_models, build_tiny_text_lm

    root = hw / "modality_av"
    base = build_tiny_text_lm(root / "base", seed=0)
    models = build_tiny_modality_models(
        base, root, seed=0, rel_std=0.5, modalities=("vision", "audio", "video")
    )
    monkeypatch.setenv("HF_HOME", str(root / "hf_home"))
    inc = build_av_tasks(root / "tasks", root / "hf_home")
    shutil.copytree(mm_tasks, inc / "image", dirs_exist_ok=True)
    spec = ",".join(f"{m}={p}" for m, p in models.items())
    ma = f"pretrained={base},modalities={{{spec}}},method=ta,scaling=0.5,cache_dir={root / 'cache'}"
    av = "hm_clotho_aqa,hm_nextqa_mc,hm_music_avqa,hm_music_avqa_audio,hm_music_avqa_av,hm_music_avqa_mc_mini"
    res_dir = hw / "lmms_modality_av"
    p = _lmms(run_cli, ma, f"hm_pope_mc_mini,{av}", inc, res_dir)
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(res_dir)
    for t in ("hm_clotho_aqa", "hm_nextqa_mc", "hm_music_avqa", "hm_music_avqa_audio", "hm_music_avqa_av"):
        assert 0.0 <= results["results"][t]["exact_match,none"] <= 1.0
        assert len(samples[t]) == 2, t
    rec = results["config"]["merge"]
    assert rec["mode"] == "modality" and rec["manifest"]["method"] == "ta"
    assert rec["composed"] == "video+audio"  # hm_music_avqa_av: clip + audio track in one request
    assert {n: m["kinds"] for n, m in rec["modalities"].items()} == {
        "vision": ["image"],
        "audio": ["audio"],
        "video": ["video"],
    }
    merged = [_lls(s) for s in sorted(samples["hm_music_avqa_mc_mini"], key=lambda s: s["doc_id"])]
    assert max(abs(a - b) for a, b in zip(merged[0], merged[1])) > 1e-4  # the clip matters
    assert len(samples["hm_pope_mc_mini"]) == 4

    own_dir = hw / "lmms_modality_av_own"
    p = _lmms(run_cli, f"pretrained={models['video']},method=none", "hm_music_avqa_mc_mini", inc, own_dir)
    assert p.returncode == 0, _explain(p)
    _, own_samples = find_results(own_dir)
    own = [_lls(s) for s in sorted(own_samples["hm_music_avqa_mc_mini"], key=lambda s: s["doc_id"])]
    assert max(abs(a - b) for x, y in zip(merged, own) for a, b in zip(x, y)) > 1e-3
