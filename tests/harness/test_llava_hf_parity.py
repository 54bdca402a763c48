"""Parity with lmms-eval's own ``llava_hf`` class (``lmms_eval/models/simple/llava_hf.py``):
``merged method=none`` with the ``llava_hf`` profile (the default for a LLaVA base)
on the same tiny LLaVA and the same ``Instance`` s, both classes' own
``generate_until`` / ``loglikelihood`` called in-process.

- generate_until: the answers are identical, sample for sample (contexts with and
  without ``<image>``, trailing whitespace, a stop string the class ignores).
- loglikelihood: the *context* is rendered identically (checked token for token
  against the class's own rendering), but by default the numbers are not the
  same quantity (``loglikelihood=llava_hf`` returns the class's, tested below to
  be identical per sample): lmms-eval 0.7.3's ``llava_hf`` returns the
  model's mean cross-entropy (positive; higher = less likely) over every label
  after the context's length measured *before* the image placeholder is
  expanded, so it also scores part of the image placeholder and the template's
  end-of-turn tokens, and its "greedy" flag compares logits with the tokens at
  the same position (unshifted). ``merged`` returns the sum of the
  continuation's log-probabilities, as every other lmms-eval and lm-eval class
  does. Both are checked here against formulas written in the test, so a change
  on either side fails.
- a tokenizer without a chat template: the class falls back to its Vicuna
  template, and so does the profile (generate_until and loglikelihood=llava_hf).

The tiny LLaVA uses ``<image>`` as its image token, as the llava-hf checkpoints
do (the class writes ``<image>`` into the prompt). ``llava_hf.py`` imports
``decord`` at module level; an empty module stands in when it is not installed
(image requests never touch it). Runs in ``.venv`` (no torchvision needed).
"""

from __future__ import annotations

import sys
import types

import pytest

pytest.importorskip("lmms_eval")
try:
    import decord  # noqa: F401
except ImportError:  # the smallest honest shim: llava_hf.py imports it at module level
    _shim = types.ModuleType("decord")
    _shim.VideoReader = _shim.cpu = None  # `from decord import VideoReader, cpu`; video only
    sys.modules["decord"] = _shim

from lmms_eval.api.instance import Instance  # noqa: E402

TASK, SPLIT = "hm_llava_parity", "test"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny LLaVA (CLIP 28 px / patch 14: 4 image tokens) whose image token is
    ``<image>``; every matrix re-drawn with std 1.5/sqrt(fan_in) so answers depend
    on the image and the prompt."""
    import torch
    from transformers import AddedToken, CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    from harness_merge.demo import tiny as T

    tok = T.build_tokenizer()
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    cfg = T.tiny_llava_config(tok)
    cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    model.generation_config = T._generation_config(tok)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=T.CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>"),
    )
    return str(T.save_model(model, proc, tmp_path_factory.mktemp("llava_parity") / "llava"))


@pytest.fixture(scope="module")
def docs():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    ims = [
        Image.new("RGB", (56, 56), (200, 30, 30)),
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (84, 60, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)),
    ]
    qs = ["<image>\nIs the square red?", "What colour is it? ", "Describe the image.\n", "Count the dots."]
    return [{"image": im, "question": q} for im, q in zip(ims, qs)]


def _visual(doc):
    return [doc["image"]]


def _gen_requests(docs):
    return [
        Instance(
            request_type="generate_until",
            arguments=(
                d["question"],
                {"max_new_tokens": 10, "until": ["\n\n"], "temperature": 0, "do_sample": False},
                _visual,
                i,
                TASK,
                SPLIT,
            ),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


# llava_hf's loglikelihood prepends "<image>\n" itself even when the context has
# one (and then fails: two placeholders, one image), so these contexts have none
LL_TARGETS = (" yes", " no", "red", " a dot")


def _ll_requests(docs):
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(d["question"].replace("<image>\n", ""), LL_TARGETS[i], _visual, i, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


@pytest.fixture(scope="module")
def reference(base):
    from lmms_eval.models.simple.llava_hf import LlavaHf

    return LlavaHf(pretrained=base, device="cpu", device_map="cpu", dtype="float32")


@pytest.fixture(scope="module")
def merged(base):
    from harness_merge.harness.lmms_model import MergedLMM

    return MergedLMM.create_from_arg_string(f"pretrained={base},method=none,backend=hf", {"batch_size": 1})


def _run(model, docs, what):
    model.task_dict = {TASK: {SPLIT: docs}}
    return getattr(model, what)(_gen_requests(docs) if what == "generate_until" else _ll_requests(docs))


def test_merged_hf_equals_lmms_llava_hf_generate_until(merged, reference, docs):
    ref = _run(reference, docs, "generate_until")
    assert len(ref) == len(docs) and len(set(ref)) == len(docs), ref  # answers depend on the request
    assert merged.profile.name == "llava_hf"  # chosen from the base's model_type
    assert _run(merged, docs, "generate_until") == ref
    assert merged.merge_record[
        "first_prompt"
    ] == "<|im_start|>user\n<image>\nIs the square red?<|im_end|>\n" + ("<|im_start|>assistant\n")


def test_plain_profile_is_not_the_llava_hf_class(base, reference, docs):
    """What merged renders without the profile (images as items, context
    stripped, stop strings applied) is another prompt: the parity above can fail."""
    from harness_merge.harness.lmms_model import MergedLMM

    m = MergedLMM.create_from_arg_string(f"pretrained={base},method=none,prompt_profile=plain", {})
    assert _run(m, docs, "generate_until") != _run(reference, docs, "generate_until")


def _oracle(base, docs):
    """Per request: (lmms-eval llava_hf's number, sum of log p(continuation | context)),
    computed here from the model's logits with the class's own prompt rendering."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(base)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    out = []
    for req in _ll_requests(docs):
        ctx, cont, _, i, _, _ = req.args
        user = [{"role": "user", "content": f"<image>\n{ctx}"}]
        prompt = proc.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = proc.tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": cont}], tokenize=False
        )
        images = [docs[i]["image"]]
        with torch.no_grad():
            # lmms-eval: mean loss after len(prompt ids without the image expansion)
            enc = proc(text=[full], images=images, return_tensors="pt")
            n_masked = proc(text=[prompt], return_tensors="pt")["input_ids"].shape[1]
            ids = enc["input_ids"][0]
            logp = torch.log_softmax(model(**enc).logits[0].float(), -1)
            nll = -logp[:-1].gather(-1, ids[1:, None])[:, 0]
            lmms = float(nll[n_masked - 1 :].mean())
            # merged: the prompt with the image expanded, then the continuation's tokens
            penc = proc(text=[prompt], images=images, return_tensors="pt")
            cids = proc.tokenizer(cont, add_special_tokens=False)["input_ids"]
            seq = torch.cat([penc["input_ids"][0], torch.tensor(cids)])
            lp = torch.log_softmax(
                model(input_ids=seq[None], pixel_values=penc["pixel_values"]).logits[0].float(), -1
            )
            n = len(cids)
            summed = float(lp[-n - 1 : -1].gather(-1, seq[-n:, None]).sum())
        out.append((lmms, summed))
    return out


def test_loglikelihood_same_context_documented_scoring_difference(merged, reference, base, docs):
    ref = _run(reference, docs, "loglikelihood")
    ours = [getattr(r, "text", r) for r in _run(merged, docs, "loglikelihood")]
    oracle = _oracle(base, docs)
    for (lmms_ll, _), (mine, _), (o_lmms, o_sum) in zip(ref, ours, oracle):
        assert lmms_ll == pytest.approx(o_lmms, rel=1e-5, abs=1e-5)  # the class: mean loss, as written above
        assert mine == pytest.approx(o_sum, rel=1e-5, abs=1e-5)  # merged: the class's context, summed log p
        assert lmms_ll > 0 > mine


# -- loglikelihood=llava_hf: the class's own number ----------------------------


@pytest.fixture(scope="module")
def merged_llava_ll(base):
    from harness_merge.harness.lmms_model import MergedLMM

    return MergedLMM.create_from_arg_string(
        f"pretrained={base},method=none,backend=hf,loglikelihood=llava_hf", {"batch_size": 1}
    )


def _ll(ctx, cont, visual, i):
    return Instance(
        request_type="loglikelihood",
        arguments=(ctx, cont, visual, i, TASK, SPLIT),
        idx=0,
        metadata={"task": TASK, "doc_id": i, "repeats": 1},
    )


def _values(model, docs, reqs):
    model.task_dict = {TASK: {SPLIT: docs}}
    return [getattr(r, "text", r) for r in model.loglikelihood(reqs)]


def test_loglikelihood_llava_hf_mode_equals_the_class(merged_llava_ll, reference, base, docs):
    """loglikelihood=llava_hf: per sample the class's (value, greedy flag),
    exactly (same ops on the same inputs), on every request shape the class
    handles: images with the context lacking ``<image>`` (the class prepends
    it), an empty continuation (the class still scores the end-of-turn tokens)."""
    reqs = _ll_requests(docs) + [_ll("What colour is it?", "", _visual, 1)]
    ref = _values(reference, docs, reqs)
    ours = _values(merged_llava_ll, docs, reqs)
    assert ours == ref  # float and bool, bit for bit
    assert all(isinstance(v, float) and isinstance(g, bool) for v, g in ours)
    oracle = _oracle(base, docs)
    for (v, _), (o_lmms, _) in zip(ours, oracle):
        assert v == pytest.approx(o_lmms, rel=1e-5, abs=1e-5)  # the formula written in _oracle
    assert len({v for v, _ in ours}) == len(ours)


def test_loglikelihood_llava_hf_mode_shapes_the_class_cannot_score(merged_llava_ll, reference, base, docs):
    """The class fails on two request shapes: a context already holding
    ``<image>`` (it prepends another: two placeholders, one image; StopIteration
    in 0.7.3) and a request without images (its processor gets ``images=[]``
    and the vision tower empty pixel values). ``merged`` scores both with the
    class's formula: the placeholder is not doubled, text-only requests are
    encoded without images (checked against the formula here)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with_image = _ll("<image>\nIs the square red?", " yes", _visual, 0)
    text_only = _ll("What is two plus two?", " four", lambda d: [], 0)
    for r in (with_image, text_only):
        with pytest.raises((StopIteration, ValueError, RuntimeError)):
            _values(reference, docs, [r])
    # the same request without the <image> the class would have prepended: one value
    (v_img, _), (v_plain, _) = _values(
        merged_llava_ll, docs, [with_image, _ll("Is the square red?", " yes", _visual, 0)]
    )
    assert v_img == v_plain
    ((v_text, g_text),) = _values(merged_llava_ll, docs, [text_only])
    proc = AutoProcessor.from_pretrained(base)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    user = [{"role": "user", "content": "\nWhat is two plus two?"}]  # the class: f"{''}\n{context}"
    prompt = proc.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = proc.tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": " four"}], tokenize=False
    )
    ids = proc.tokenizer(full, return_tensors="pt")["input_ids"][0]
    n = proc.tokenizer(prompt, return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
    nll = -logp[:-1].gather(-1, ids[1:, None])[:, 0]
    assert v_text == pytest.approx(float(nll[n - 1 :].mean()), rel=1e-5, abs=1e-5)
    assert isinstance(g_text, bool)


def test_loglikelihood_llava_hf_mode_refused_where_it_cannot_run(base):
    from harness_merge.harness.model_args import ModelArgsError, parse_model_args

    with pytest.raises(ModelArgsError, match=r"loglikelihood=llava_hf .*backend=hf only.*backend=vllm"):
        parse_model_args(f"pretrained={base},method=none,backend=vllm,loglikelihood=llava_hf")
    with pytest.raises(ModelArgsError, match=r"loglikelihood must be sum or llava_hf, got 'mean'"):
        parse_model_args(f"pretrained={base},method=none,loglikelihood=mean")
    # sum is every backend's own scoring: nothing to pass to vLLM
    h = parse_model_args(f"pretrained={base},method=none,backend=vllm,loglikelihood=sum")
    assert "loglikelihood" not in h.backend_opts
    h = parse_model_args(f"pretrained={base},method=none,loglikelihood=llava_hf")
    assert h.backend_opts["loglikelihood"] == "llava_hf"


def test_loglikelihood_llava_hf_mode_refuses_raw_text_requests(merged_llava_ll):
    from harness_merge.backends.base import BackendError, LLRequest

    with pytest.raises(BackendError, match=r"loglikelihood=llava_hf .*raw-text context.*loglikelihood=sum"):
        merged_llava_ll.backend.loglikelihood([LLRequest(continuation=" yes", context="Is it? ")])


# -- no chat template in the tokenizer: the class's Vicuna fallback -------------


@pytest.fixture(scope="module", params=["no_template", "processor_template_only"])
def base_vicuna(base, tmp_path_factory, request):
    """The tiny LLaVA whose tokenizer has no chat template (llava-hf/llava-1.5
    checkpoints): none at all, or the processor's alone (``chat_template.json``),
    which the class does not read."""
    import json
    import shutil

    out = tmp_path_factory.mktemp(f"llava_{request.param}") / "llava"
    shutil.copytree(base, out)
    template = (out / "chat_template.jinja").read_text()
    (out / "chat_template.jinja").unlink()
    if request.param == "processor_template_only":
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return str(out), request.param


def test_vicuna_fallback_without_tokenizer_template(base_vicuna, docs):
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE, LlavaHf
    from transformers import AutoProcessor

    from harness_merge.backends.hf import VICUNA_CHAT_TEMPLATE as OURS
    from harness_merge.harness.lmms_model import MergedLMM

    assert OURS == VICUNA_CHAT_TEMPLATE  # the class's template, written here
    path, variant = base_vicuna
    proc = AutoProcessor.from_pretrained(path)
    assert not proc.tokenizer.chat_template and bool(proc.chat_template) == (variant != "no_template")
    ref = LlavaHf(pretrained=path, device="cpu", device_map="cpu", dtype="float32")
    merged = MergedLMM.create_from_arg_string(f"pretrained={path},method=none,backend=hf", {"batch_size": 1})
    ref_gen = _run(ref, docs, "generate_until")
    assert _run(merged, docs, "generate_until") == ref_gen
    first = merged.merge_record["first_prompt"]
    assert first == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nIs the square red? "
        "ASSISTANT:"
    )
    if proc.chat_template:  # what rendering with the processor's template (before) gives: another prompt
        msgs = [{"role": "user", "content": "<image>\nIs the square red?"}]
        assert proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) != first
    ll = MergedLMM.create_from_arg_string(
        f"pretrained={path},method=none,backend=hf,loglikelihood=llava_hf", {"batch_size": 1}
    )
    reqs = _ll_requests(docs)
    assert _values(ll, docs, reqs) == _values(ref, docs, reqs)


def test_loglikelihood_llava_hf_mode_needs_the_llava_hf_rendering(base, docs):
    """With another profile (content items, images beside the text) there is no
    llava_hf number to reproduce: a clear error instead of a wrong value."""
    from harness_merge.backends.base import BackendError
    from harness_merge.harness.lmms_model import MergedLMM

    m = MergedLMM.create_from_arg_string(
        f"pretrained={base},method=none,prompt_profile=plain,loglikelihood=llava_hf", {}
    )
    with pytest.raises(BackendError, match=r"loglikelihood=llava_hf .*prompt_profile=llava_hf"):
        _values(m, docs, _ll_requests(docs)[:1])
