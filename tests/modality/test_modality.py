"""Modality merging: only the shared LLM is merged; every encoder and connector
is kept bit for bit; each modality model loads and runs on the merged LLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harness_merge.errors import InputError
from harness_merge.modality import merge_modalities

# where each family's saved checkpoint keeps the LLM, written out by hand
LLM_PREFIX = {"vision": "language_model.", "audio": "language_model.model."}


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_modality_models, build_tiny_text_lm

    root = tmp_path_factory.mktemp("modality")
    base = build_tiny_text_lm(root / "base", seed=0)
    models = build_tiny_modality_models(base, root, seed=0, rel_std=0.3)
    out = root / "merged"
    rec = merge_modalities(
        str(base), {k: str(v) for k, v in models.items()}, "ta", {"scaling": "0.5"}, out=out
    )
    return base, models, out, rec


def test_llm_merged_encoders_kept(mm):
    base, models, out, rec = mm
    b = load_file(str(base / "model.safetensors"))
    src = {m: load_file(str(p / "model.safetensors")) for m, p in models.items()}
    got = {m: load_file(str(out / m / "model.safetensors")) for m in models}
    n_llm = 0
    for name, th0 in b.items():
        taus = [src[m][LLM_PREFIX[m] + name].float() - th0.float() for m in models]
        if th0.dim() == 2 and "embed_tokens" not in name:
            exp = th0.float() + 0.5 * sum(taus)
        else:  # 1-D and embeddings: the average of the fine-tuned models
            exp = th0.float() + sum(taus) / len(taus)
        for m in models:
            torch.testing.assert_close(
                got[m][LLM_PREFIX[m] + name].float(), exp, rtol=1e-5, atol=1e-6, msg=name
            )
        n_llm += 1
    assert n_llm == rec["shared_tensors"] > 10
    # everything else is the modality's own, unchanged
    for m in models:
        llm_keys = {LLM_PREFIX[m] + k for k in b}
        kept = [k for k in src[m] if k not in llm_keys]
        assert any("vision_tower" in k or "audio_tower" in k for k in kept)
        assert any("multi_modal_projector" in k for k in kept)
        for k in kept:
            assert torch.equal(got[m][k], src[m][k]), k
        assert set(got[m]) == set(src[m])  # no tensor dropped
    man = json.loads((out / "harness_merge.json").read_text())
    assert man["mode"] == "modality" and set(man["modalities"]) == {"vision", "audio"}


def test_each_modality_runs_on_the_merged_llm(mm):
    from transformers import (
        LlavaForConditionalGeneration,
        Qwen2AudioForConditionalGeneration,
    )

    _, models, out, _ = mm
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for cls, m in ((LlavaForConditionalGeneration, "vision"), (Qwen2AudioForConditionalGeneration, "audio")):
        merged = cls.from_pretrained(str(out / m)).eval()
        own = cls.from_pretrained(str(models[m])).eval()
        with torch.no_grad():
            a, b = merged(input_ids=ids).logits, own(input_ids=ids).logits
        assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)
    # audio input through the merged LLM: one audio token fed by the encoder
    audio = Qwen2AudioForConditionalGeneration.from_pretrained(str(out / "audio")).eval()
    cfg = audio.config
    feats = torch.randn(1, cfg.audio_config.num_mel_bins, 2 * cfg.audio_config.max_source_positions)
    conv_len = (feats.shape[-1] - 1) // 2 + 1  # Whisper conv stride 2, then Qwen2-Audio's avg-pool stride 2
    n_audio = (conv_len - 2) // 2 + 1
    ids = torch.tensor([[1, 2] + [cfg.audio_token_index] * n_audio + [3]])
    mask = torch.ones(1, feats.shape[-1], dtype=torch.long)
    with torch.no_grad():
        lg = audio(input_ids=ids, input_features=feats, feature_attention_mask=mask).logits
        lg_silent = audio(
            input_ids=ids, input_features=torch.zeros_like(feats), feature_attention_mask=mask
        ).logits
    assert torch.isfinite(lg).all()
    assert not torch.allclose(lg, lg_silent, atol=1e-4)  # the audio encoder feeds the merged LLM


def test_model_without_the_shared_llm_refused(mm, tiny_base, tmp_path):
    base, models, _, _ = mm
    other = tiny_base  # another LLM (hidden 32, not 64)
    with pytest.raises(InputError, match="must share the base language model"):
        merge_modalities(
            str(base), {"vision": str(models["vision"]), "other": str(other)}, "ta", out=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()
