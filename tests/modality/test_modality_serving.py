"""Modality merging with video, served: vision (LLaVA), audio (Qwen2-Audio) and
video (Video-LLaVA) models sharing one LLM; model 'merged' routes each request
to its modality, whose served weights are the merged LLM (formula written here)
plus that modality's own encoder and connector (compared with its source)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harness_merge.backends.base import BackendError, LLRequest
from harness_merge.modality import merge_modalities

# where each family's saved checkpoint keeps the LLM, written out by hand
LLM_PREFIX = {"vision": "language_model.", "audio": "language_model.model.", "video": "language_model."}
ENCODERS = {  # encoder and connector prefixes
    "vision": ("vision_tower", "multi_modal_projector"),
    "audio": ("audio_tower", "multi_modal_projector"),
    "video": ("video_tower", "image_tower", "multi_modal_projector"),
}


@pytest.fixture(scope="module")
def mm3(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_modality_models, build_tiny_text_lm, write_tiny_clip

    root = tmp_path_factory.mktemp("modality3")
    base = build_tiny_text_lm(root / "base", seed=0)
    models = build_tiny_modality_models(
        base, root, seed=0, rel_std=0.3, modalities=("vision", "audio", "video")
    )
    out = root / "merged"
    merge_modalities(str(base), {k: str(v) for k, v in models.items()}, "ta", {"scaling": "0.5"}, out=out)
    clips = [
        write_tiny_clip(root / "clips" / "red.mp4", ((200, 30, 30),) * 2),
        write_tiny_clip(root / "clips" / "blue.mp4", ((30, 30, 200), (30, 200, 30))),
    ]
    return base, models, out, clips


def _expected_llm(base, models) -> dict:
    """Task arithmetic, scaling 0.5, on the LLM only (1-D and embeddings: the average)."""
    b = load_file(str(base / "model.safetensors"))
    src = {m: load_file(str(p / "model.safetensors")) for m, p in models.items()}
    exp = {}
    for name, th0 in b.items():
        taus = [src[m][LLM_PREFIX[m] + name].float() - th0.float() for m in models]
        if th0.dim() == 2 and "embed_tokens" not in name:
            exp[name] = th0.float() + 0.5 * sum(taus)
        else:
            exp[name] = th0.float() + sum(taus) / len(taus)
    return exp


def test_video_modality_merged_like_the_others(mm3):
    base, models, out, _ = mm3
    exp = _expected_llm(base, models)
    src = load_file(str(models["video"] / "model.safetensors"))
    got = load_file(str(out / "video" / "model.safetensors"))
    for name, e in exp.items():
        torch.testing.assert_close(got[LLM_PREFIX["video"] + name].float(), e, rtol=1e-5, atol=1e-6, msg=name)
    kept = [k for k in src if k not in {LLM_PREFIX["video"] + n for n in exp}]
    assert any(k.startswith("video_tower.") for k in kept) and any("multi_modal_projector" in k for k in kept)
    for k in kept:
        assert torch.equal(got[k], src[k]), k
    man = json.loads((out / "harness_merge.json").read_text())
    assert set(man["modalities"]) == {"vision", "audio", "video"}


class _Inst:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lmm(mm3):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[lmms])")
    from harness_merge.harness.lmms_model import MergedLMM

    _, _, out, _ = mm3
    lm = MergedLMM(pretrained=str(out), method="none", dtype="float32", device="cpu")
    return lm


def _tone(hz, n=16000):
    t = np.arange(n) / 16000
    return {"array": (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), "sampling_rate": 16000}


def test_served_weights_are_the_merged_llm_and_each_modalitys_encoder(mm3, lmm):
    base, models, _, _ = mm3
    exp = _expected_llm(base, models)
    assert {n: set(m.kinds) for n, m in lmm.modalities.items()} == {
        "vision": {"image"},
        "audio": {"audio"},
        "video": {"video"},
    }
    for name, mod in lmm.modalities.items():
        served = mod.backend.model.state_dict()
        src = load_file(str(models[name] / "model.safetensors"))
        # the merged LLM, found under the family's in-memory names by suffix
        for b, e in exp.items():
            tail = b.removeprefix("model.")  # in memory: language_model.layers... / model.language_model...
            hits = [k for k in served if (k == tail or k.endswith("." + tail)) and "tower" not in k]
            assert len(hits) == 1, (name, b, hits)
            torch.testing.assert_close(served[hits[0]].float(), e, rtol=1e-5, atol=1e-6, msg=f"{name} {b}")
        # every encoder tensor of the source model is served unchanged
        n_enc = 0
        for k, t in src.items():
            if k.split(".")[0] in ENCODERS[name]:
                rest = k.split(".", 1)[1]
                hits = [s for s in served if s.endswith(k.split(".")[0] + "." + rest)]
                assert len(hits) == 1, (name, k, hits)
                assert torch.equal(served[hits[0]], t), (name, k)
                n_enc += 1
        assert n_enc > 10, name


def test_requests_routed_to_their_modality(mm3, lmm):
    from harness_merge.backends.hf import HFBackend

    base, models, out, clips = mm3
    from PIL import Image

    docs = [
        {"v": [Image.new("RGB", (40, 40), (200, 30, 30))]},
        {"v": [_tone(440)]},
        {"v": [{"array": np.zeros(16000, np.float32), "sampling_rate": 16000}]},
        {"v": [str(clips[0])]},
        {"v": [str(clips[1])]},
        {"v": [_tone(440, 8000) | {"sampling_rate": 8000}]},  # resampled to 16 kHz
    ]
    lmm.task_dict = {"t": {"test": docs}}
    reqs = [_Inst("Is it red?", " yes", lambda d: d["v"], i, "t", "test") for i in range(len(docs))]
    ll = [x for x, _ in (r.text for r in lmm.loglikelihood(reqs))]
    assert all(np.isfinite(ll))
    assert abs(ll[1] - ll[2]) > 1e-4  # the audio encoder feeds the merged LLM (tone vs silence)
    assert abs(ll[3] - ll[4]) > 1e-4  # the video encoder feeds it (red vs blue/green frames)
    assert abs(ll[1] - ll[5]) < 0.5  # 440 Hz at 8 kHz resampled: close to the 16 kHz clip

    # the audio request is answered by the audio folder's model: same number as that model alone
    msgs = ({"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Is it red?"}]},)
    req = LLRequest(continuation=" yes", messages=msgs, audios=(_tone(440),))
    alone = HFBackend(None, str(out / "audio"), dtype="float32").loglikelihood([req])[0][0]
    own = HFBackend(None, str(models["audio"]), dtype="float32").loglikelihood([req])[0][0]
    assert ll[1] == pytest.approx(alone, abs=1e-5)
    assert abs(alone - own) > 1e-3  # ... which is the merged LLM, not the unmerged audio model

    gen = lmm.generate_until(
        [
            _Inst("Is it red?", {"max_new_tokens": 3, "until": []}, lambda d: d["v"], i, "t", "test")
            for i in (0, 1, 3)
        ]
    )
    assert len(gen) == 3 and all(isinstance(g, str) for g in gen)


def test_audio_plus_video_request_composed(mm3, lmm):
    """One request with a clip and its audio (MUSIC-AVQA / AVQA): the video
    model's inputs with the audio model's features inserted, on the shared LLM."""
    from harness_merge.backends.composed_av import ComposedAV

    _, _, _, clips = mm3
    docs = [
        {"v": [str(clips[0]), _tone(440)]},
        {"v": [str(clips[0]), _tone(2000)]},
        {"v": [str(clips[1]), _tone(440)]},
    ]
    lmm.task_dict = {"av": {"test": docs}}
    reqs = [_Inst("Is the cello playing?", " yes", lambda d: d["v"], i, "av", "test") for i in range(3)]
    ll = [r.text[0] for r in lmm.loglikelihood(reqs)]
    assert all(np.isfinite(ll))
    assert abs(ll[0] - ll[1]) > 1e-4  # the audio features reach the LLM
    assert abs(ll[0] - ll[2]) > 1e-4  # so do the video features
    comp = lmm._composed
    assert isinstance(comp, ComposedAV) and comp.v is lmm.modalities["video"].backend
    assert comp.a is lmm.modalities["audio"].backend
    # the composed sequence: every video placeholder's and every audio placeholder's feature
    req = LLRequest(
        continuation=" yes",
        messages=(
            {
                "role": "user",
                "content": [{"type": "video"}, {"type": "audio"}, {"type": "text", "text": "q"}],
            },
        ),
        audios=(_tone(440),),
        videos=(str(clips[0]),),
    )
    emb, n = comp._embeds(req)
    v_only = comp.v._encode(
        [comp.v.render(LLRequest(continuation="x", messages=comp._split(req)[0]))],
        [],
        "right",
        videos=[str(clips[0])],
    )
    assert emb.shape[0] == v_only["input_ids"].shape[1] + n["audio_features"] and n["audio_features"] > 0
    gen = lmm.generate_until(
        [_Inst("q", {"max_new_tokens": 3, "until": []}, lambda d: d["v"], 0, "av", "test")]
    )
    assert len(gen) == 1 and isinstance(gen[0], str)


def test_audio_plus_video_without_a_video_modality_refused():
    from harness_merge.harness.modality_serving import Modality, route

    mods = {
        "vision": Modality("vision", None, object(), None, "<image>", frozenset({"image"})),
        "audio": Modality("audio", None, object(), None, "<image>", frozenset({"audio"})),
    }
    with pytest.raises(BackendError, match=r"audio \+ video inputs, which no modality"):
        route(mods, {"audio", "video"}, "av")
    assert route(mods, {"audio"}, "a") is mods["audio"] and route(mods, set(), "t") is mods["vision"]


def test_audio_to_a_backend_without_the_flag_refused(lmm):
    class NoAV:  # e.g. the vLLM backend today: no supports_audio / supports_video
        name, base = "vllm", "/m/x"

    with pytest.raises(BackendError, match=r"sends audio inputs but the model /m/x \(backend=vllm\)"):
        lmm._check_av_support([_tone(440)], [], "t", NoAV())
    with pytest.raises(BackendError, match="sends video inputs"):
        lmm._check_av_support([], ["/v.mp4"], "t", NoAV())


def test_audio_sent_to_a_model_without_audio_encoder(mm3):
    from harness_merge.backends.hf import HFBackend

    base, _, _, _ = mm3
    b = HFBackend(None, str(base), dtype="float32")
    msgs = ({"role": "user", "content": "q"},)
    with pytest.raises(BackendError, match="has no audio encoder but the task sent 1 audios"):
        b.loglikelihood([LLRequest(continuation=" yes", messages=msgs, audios=(_tone(440),))])


def test_model_args_modalities():
    from harness_merge.harness.model_args import ModelArgsError, parse_model_args

    h = parse_model_args("pretrained=/llm,modalities={vision=/m/v,audio=/m/a},method=ties,num_frames=4")
    assert h.modalities == {"vision": "/m/v", "audio": "/m/a"} and h.method == "ties"
    assert h.adapters == () and h.backend_opts["num_frames"] == 4
    with pytest.raises(ModelArgsError, match="modality merge"):
        h.merge_spec()
    with pytest.raises(ModelArgsError, match="give a method"):
        parse_model_args("pretrained=/llm,modalities={vision=/m/v,audio=/m/a},method=none")
    with pytest.raises(ModelArgsError, match="not both"):
        parse_model_args("pretrained=/llm,modalities={vision=/m/v,audio=/m/a},adapters=[/x],method=ta")
    with pytest.raises(ModelArgsError, match="two or more"):
        parse_model_args("pretrained=/llm,modalities={vision=/m/v},method=ta")
    with pytest.raises(ModelArgsError, match="backend=hf only"):
        parse_model_args("pretrained=/llm,method=none,backend=vllm,num_frames=4")


def test_cli_merge_modalities(mm3, tmp_path, capsys):
    from harness_merge.harness.cli import main

    base, models, out, _ = mm3
    args = ["merge-modalities", "--base", str(base), "--method", "ta", "--param", "scaling=0.5", "-q"]
    for m in ("vision", "audio"):
        args += ["--modality", f"{m}={models[m]}"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "wrote modality artifact" in capsys.readouterr().out
    # the same method and inputs as the fixture's merge: the same LLM tensors
    a = load_file(str(tmp_path / "o" / "audio" / "model.safetensors"))
    exp = _expected_llm(base, {m: models[m] for m in ("vision", "audio")})
    for name, e in exp.items():
        torch.testing.assert_close(a[LLM_PREFIX["audio"] + name].float(), e, rtol=1e-5, atol=1e-6)
    assert main([*args[:-2], "--modality", "vision", "--out", str(tmp_path / "p")]) == 2
    assert "--modality expects NAME=DIR" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_merge_on_load_is_cached_by_inputs(mm3, tmp_path):
    from harness_merge.harness.modality_serving import merged_artifact
    from harness_merge.harness.model_args import parse_model_args

    base, models, _, _ = mm3
    spec = ",".join(f"{m}={models[m]}" for m in ("vision", "audio"))
    said = []
    h = parse_model_args(
        f"pretrained={base},modalities={{{spec}}},method=ta,scaling=0.5,cache_dir={tmp_path}"
    )
    a = merged_artifact(h, say=said.append)
    stamp = (a / "harness_merge.json").stat().st_mtime_ns
    assert merged_artifact(h, say=said.append) == a and "[cache hit]" in said[-1]
    assert (a / "harness_merge.json").stat().st_mtime_ns == stamp  # nothing rewritten
    exp = _expected_llm(base, {m: models[m] for m in ("vision", "audio")})
    got = load_file(str(a / "vision" / "model.safetensors"))
    for name, e in exp.items():
        torch.testing.assert_close(got[LLM_PREFIX["vision"] + name].float(), e, rtol=1e-5, atol=1e-6)
    h2 = parse_model_args(
        f"pretrained={base},modalities={{{spec}}},method=ta,scaling=0.3,cache_dir={tmp_path}"
    )
    assert merged_artifact(h2, say=said.append) != a  # other params: another merge
