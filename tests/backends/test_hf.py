"""The transformers backend in-process: a one-adapter ``ta`` merge reproduces
base + PeftModel of that adapter; images, stop strings, loglikelihood."""

from __future__ import annotations

import pytest
import torch

from harness_merge.api import MergeSpec, merge
from harness_merge.backends import BackendError, GenRequest, LLRequest, load_backend
from harness_merge.errors import InputError


def _img(c=(200, 30, 30)):
    from PIL import Image

    return Image.new("RGB", (56, 56), c)


def _mm_req(text="Is there a red square?", **kw):
    return GenRequest(
        messages=({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},),
        images=(_img(),),
        **kw,
    )


@pytest.fixture(scope="module")
def ta_one(qwen2vl, merge_cache):
    base, ads = qwen2vl
    return merge(
        MergeSpec(adapters=(str(ads[0]),), method="ta", base=str(base)), cache_dir=merge_cache, progress=False
    )


def _peft_reference(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(m, str(adapter)).eval()


@pytest.mark.parametrize("fold", [False, True])
def test_ta_one_adapter_reproduces_peft(qwen2vl, ta_one, fold):
    base, ads = qwen2vl
    be = load_backend("hf", ta_one, str(base), dtype="float32", fold=fold, batch_size=2)
    ref = _peft_reference(base, ads[0])
    enc = be._encode([be.render(_mm_req())], [_img()], "left")
    with torch.no_grad():
        got = be.model(**enc).logits
        want = ref(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and greedy generations agree token for token
    with torch.no_grad():
        ids_ref = ref.generate(**enc, max_new_tokens=6, do_sample=False)
    text_ref = be.tokenizer.decode(ids_ref[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert be.generate([_mm_req(max_new_tokens=6)]) == [text_ref]


def test_merge_changes_outputs(qwen2vl, ta_one):
    base, _ = qwen2vl
    plain = load_backend("hf", None, str(base), dtype="float32")
    merged = load_backend("hf", ta_one, str(base), dtype="float32")
    r = [LLRequest(continuation="yes", messages=_mm_req().messages, images=(_img(),))]
    (a, _), (b, _) = plain.loglikelihood(r)[0], merged.loglikelihood(r)[0]
    assert abs(a - b) > 1e-3


def test_generate_batched_equals_single_and_honours_stops(qwen2vl, ta_one):
    base, _ = qwen2vl
    be = load_backend("hf", ta_one, str(base), dtype="float32", batch_size=3)
    reqs = [
        _mm_req("one", max_new_tokens=8),
        _mm_req("a longer question here", max_new_tokens=8),
        GenRequest(messages=({"role": "user", "content": "text only"},), max_new_tokens=8),
    ]
    batched = be.generate(reqs)
    single = [be.generate([r])[0] for r in reqs]
    assert batched == single
    full = be.generate([GenRequest(prompt="hello", max_new_tokens=10)])[0]
    if len(full) >= 3:
        stop = full[2]
        cut = be.generate([GenRequest(prompt="hello", max_new_tokens=10, until=(stop,))])[0]
        assert cut == full[: full.index(stop)]


def test_loglikelihood_matches_manual_sum(text_lm):
    base, _ = text_lm
    be = load_backend("hf", None, str(base), dtype="float32", batch_size=2)
    ctx, cont = "hello", " world"
    tok = be.tokenizer
    c, t = tok(ctx, add_special_tokens=False)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([c + t])
    with torch.no_grad():
        lp = torch.log_softmax(be.model(input_ids=ids).logits[0].float(), -1)
    want = sum(lp[len(c) - 1 + i, t[i]].item() for i in range(len(t)))
    got = be.loglikelihood(
        [
            LLRequest(context=ctx, continuation=cont),
            LLRequest(context="a much longer context string", continuation="x"),
        ]
    )
    assert got[0][0] == pytest.approx(want, abs=1e-4)
    # greedy continuation is recognised as greedy
    g = be.generate([GenRequest(prompt=ctx, max_new_tokens=3)])[0]
    if g and tok(g, add_special_tokens=False)["input_ids"]:
        assert be.loglikelihood([LLRequest(context=ctx, continuation=g)])[0][1] is True


def test_text_only_base_refuses_images(text_lm):
    be = load_backend("hf", None, str(text_lm[0]), dtype="float32")
    with pytest.raises(BackendError, match="text-only"):
        be.generate([_mm_req()])


def test_vllm_options_rejected_by_hf(text_lm):
    with pytest.raises(BackendError, match="backend=vllm only"):
        load_backend("hf", None, str(text_lm[0]), max_lora_rank=64)


def test_base_that_does_not_load(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackendError, match="cannot load the base model"):
        load_backend("hf", None, str(tmp_path))


def test_fit_check_names_adapter_and_module(qwen2vl, text_lm):
    # the one fit check (inputs.fit, run by api.merge) replaces backends.hf.check_lora_fits
    from harness_merge.inputs import open_inputs
    from harness_merge.inputs.fit import check_lora_fits

    check_lora_fits(open_inputs([str(a) for a in qwen2vl[1]]), str(qwen2vl[0]))  # fits: no error
    with pytest.raises(InputError, match=r"does not have"):
        check_lora_fits(open_inputs([str(text_lm[1][0])]), str(qwen2vl[0]))


def test_fit_check_shape_mismatch(hw, text_lm):
    """An adapter for a wider model: same module names, other shapes."""
    import json

    from harness_merge.demo.tiny import random_lora
    from harness_merge.inputs import open_inputs
    from harness_merge.inputs.fit import check_lora_fits

    wide = hw / "textlm_wide"
    if not wide.exists():
        from transformers import AutoConfig, Qwen2ForCausalLM

        cfg = AutoConfig.from_pretrained(text_lm[0])
        cfg.hidden_size, cfg.intermediate_size = 128, 256
        Qwen2ForCausalLM(cfg).save_pretrained(wide)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (text_lm[0] / f).exists():
                (wide / f).write_text((text_lm[0] / f).read_text())
    ad = random_lora(wide, hw / "wide_lora", rank=4, alpha=8, seed=3)
    with pytest.raises(InputError, match=r"shape mismatch at .*q_proj.*in_features 128.*in_features 64"):
        check_lora_fits(open_inputs([str(ad)]), str(text_lm[0]))
    json  # noqa: B018


def test_method_none_is_the_base_model(qwen2vl, merge_cache):
    from harness_merge.harness import load_merged
    from harness_merge.harness.model_args import parse_model_args

    base, _ = qwen2vl
    loaded = load_merged(
        parse_model_args(f"pretrained={base},method=none,dtype=float32,cache_dir={merge_cache}")
    )
    assert loaded.artifact is None and loaded.record["manifest"]["method"] == "none"
    plain = load_backend("hf", None, str(base), dtype="float32")
    r = [LLRequest(continuation="yes", messages=_mm_req().messages, images=(_img(),))]
    assert loaded.backend.loglikelihood(r) == plain.loglikelihood(r)
