"""Prompt profiles (harness_merge.harness.profiles): what each renders, checked
against the lmms-eval class behaviour written out here. The end-to-end parity
with the real classes is in test_lmms_parity.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from harness_merge.harness import profiles as P


def _img(w=60, h=45):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_default_profile_follows_model_type_and_overrides_apply():
    assert P.get_profile(None, "qwen2_vl").name == "qwen2_vl"
    assert P.get_profile("auto", "llava").name == "llava_hf"
    assert P.get_profile(None, "qwen2").name == "plain"
    p = P.get_profile("qwen2_vl", None, system_prompt="Be brief.", max_pixels=1000)
    assert p.system_prompt == "Be brief." and p.max_pixels == 1000 and p.min_pixels == 3136
    with pytest.raises(P.ProfileError, match="prompt_profile must be one of"):
        P.get_profile("nope")


def test_qwen2_vl_messages_system_prompt_and_unstripped_context():
    p = P.get_profile("qwen2_vl")
    m = P.messages(p, "<image>\nWhat colour? ", 1)
    assert m[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert m[1]["content"] == [{"type": "image"}, {"type": "text", "text": "\nWhat colour? "}]
    plain = P.messages(P.get_profile("plain"), "<image>\nWhat colour? ", 1)
    assert plain == (
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    )


def test_qwen2_vl_images_are_jpeg85_then_resized_to_multiples_of_28():
    im = _img(60, 45)
    out = P.prepare_images(P.get_profile("qwen2_vl"), [im])[0]
    # oracle: JPEG quality 85 round trip, then qwen's smart_resize (factor 28, bounds 3136..602112)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    h, w = 45, 60
    hb, wb = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
    assert out.size == (wb, hb) == (56, 56)
    assert np.array_equal(np.asarray(out), np.asarray(jpeg.resize((wb, hb))))
    assert not np.array_equal(np.asarray(out), np.asarray(im.resize((wb, hb))))  # JPEG changed pixels


def test_gen_params_defaults_per_profile():
    q = P.gen_params(P.get_profile("qwen2_vl"), {"until": "\n"})
    assert q["max_new_tokens"] == 128 and q["until"] == ("\n",)
    lv = P.gen_params(P.get_profile("llava_hf"), {"until": ["\n"], "max_new_tokens": 5})
    assert lv["max_new_tokens"] == 5 and lv["until"] == ()
    assert P.gen_params(P.get_profile("plain"), {})["max_new_tokens"] is None
    assert P.finish(P.get_profile("qwen2_vl"), "  yes \n") == "yes"
    assert P.finish(P.get_profile("plain"), " yes ") == " yes "
    assert P.get_profile("qwen2_vl").backend_opts() == {
        "eos_from": "tokenizer",
        "min_pixels": 3136,
        "max_pixels": 602112,
    }


def test_llava_hf_image_tokens_text():
    m = P.messages(P.get_profile("llava_hf"), "Is it red?", 2)
    assert m == ({"role": "user", "content": "<image> <image>\nIs it red?"},)


@pytest.mark.parametrize("hw", [(45, 60), (10, 10), (2000, 1500), (28, 5000)])
def test_smart_resize_bounds(hw):
    h, w = hw
    rh, rw = P.qwen_smart_resize(h, w, 28, 3136, 602112)
    assert rh % 28 == 0 and rw % 28 == 0
    assert 3136 <= rh * rw <= 602112
    assert abs(rh / rw - h / w) / (h / w) < 0.5


def test_smart_resize_refuses_extreme_aspect_ratio():
    with pytest.raises(P.ProfileError, match="aspect ratio"):
        P.qwen_smart_resize(10, 2500)


def test_smart_resize_equals_qwen_vl_utils_where_it_imports():
    qvu = pytest.importorskip("qwen_vl_utils.vision_process", reason="qwen_vl_utils needs torchvision")
    for h, w in [(45, 60), (10, 10), (2000, 1500), (333, 777), (28, 5000)]:
        assert P.qwen_smart_resize(h, w, 28, 3136, 602112) == qvu.smart_resize(h, w, 28, 3136, 602112)


def test_llava_hf_image_tokens_use_the_models_placeholder():
    """A model whose processor names another image token gets that token where
    lmms-eval's llava_hf writes ``<image>`` (the tiny LLaVA uses ``<|image_pad|>``)."""
    m = P.messages(P.get_profile("llava_hf"), "Is it red?", 1, image_token="<|image_pad|>")
    assert m == ({"role": "user", "content": "<|image_pad|>\nIs it red?"},)
    m = P.messages(P.get_profile("llava_hf"), "<image>\nIs it red?", 1, image_token="<|image_pad|>")
    assert m[0]["content"] == "<|image_pad|>\nIs it red?"


def test_vllm_profile_text_first_verbatim_and_lmms_vllm_defaults():
    """lmms-eval's vllm class: the context as is, then the images; max(task's, 1024)
    new tokens; no stop strings; small images scaled up only for a Qwen-VL path."""
    p = P.get_profile("vllm")
    m = P.messages(p, "<image>\nWhat colour? ", 1)
    assert m == (
        {"role": "user", "content": [{"type": "text", "text": "<image>\nWhat colour? "}, {"type": "image"}]},
    )
    g = P.gen_params(p, {"max_new_tokens": 10, "until": ["\n"]})
    assert g["max_new_tokens"] == 1024 and g["until"] == ()
    assert P.gen_params(p, {"max_new_tokens": 2000})["max_new_tokens"] == 2000
    assert P.gen_params(p, {})["max_new_tokens"] == 1024
    small = Image.new("RGB", (40, 20), (1, 2, 3))
    assert P.prepare_images(p, [small])[0].size == (40, 20)  # path unknown: left alone
    q = P.get_profile("vllm", pretrained="/m/Qwen2-VL-7B-Instruct")
    assert q.upscale_min_side == 28
    assert P.prepare_images(q, [small])[0].size == (56, 28)  # int(40 * 28/20), 28
    assert P.prepare_images(q, [_img(60, 45)])[0].size == (60, 45)
    assert P.get_profile("vllm", pretrained="/m/llava-1.5").upscale_min_side is None
    assert P.finish(p, "ab\ufffd\ufffd") == "ab" and P.finish(p, " a\ufffdb ") == " a\ufffdb "
    assert P.finish(P.get_profile("plain"), "ab\ufffd") == "ab\ufffd"


def test_internvl_profile_images_then_verbatim_context_and_class_settings():
    """lmms-eval's internvl_hf_chat: its task's chat builder puts the images, then
    doc_to_text as is; bfloat16, patches 1..12, tokenizer EOS, 1024 tokens, no stops."""
    p = P.get_profile(None, "internvl")
    assert p.name == "internvl"
    assert P.messages(p, "<image>\nWhat colour? ", 1) == (
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>\nWhat colour? "}]},
    )
    assert p.backend_opts() == {
        "eos_from": "tokenizer",
        "dtype": "bfloat16",
        "min_patches": 1,
        "max_patches": 12,
    }
    g = P.gen_params(p, {"until": ["\n"]})
    assert g["max_new_tokens"] == 1024 and g["until"] == ()
    assert P.finish(p, " yes ") == " yes "


def test_llava_hf_loglikelihood_context_as_the_class_writes_it():
    """llava_hf.loglikelihood: f"{' '.join(['<image>'] * n)}\\n{context}" for every request."""
    p = P.get_profile("llava_hf")
    r = P.ll_request(p, "Is it red?", " yes", [_img(28, 28)])
    assert r.messages == ({"role": "user", "content": "<image>\nIs it red?"},)
    assert P.ll_request(p, "Is it red?", " yes", []).messages == (
        {"role": "user", "content": "\nIs it red?"},
    )
