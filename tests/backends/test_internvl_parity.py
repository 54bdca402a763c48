"""Parity with lmms-eval's class for transformers' native InternVL
(``internvl_hf_chat``, ``lmms_eval/models/chat/internvl_hf.py``): ``merged
method=none`` with its default profile for an InternVL base (``internvl``) gives
the class's answers, request for request, on the tiny InternVL2.5-style model.

The class is a chat model: lmms-eval hands it the messages its task builds
(``ConfigurableMessagesTask._build_user_turn``: the images, then the text),
while ``merged`` (a simple model) gets the context and ``doc_to_visual``; both
are built here from the same docs with lmms-eval's own builder. The class
loads bfloat16 weights, and so does the profile.

lmms-eval's class loads the processor with ``AutoProcessor``, which for
``InternVLProcessor`` needs a video processor (torchvision): the test runs in
``.venv-vllm`` (``scripts/test_vllm.sh``) and is skipped with the reason
elsewhere; the tiny model's folder gets the video processor entry the tiny
builder leaves out (it is image-only so that it loads without torchvision).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip(
    "torchvision", reason="AutoProcessor for InternVL needs its video processor (torchvision; .venv-vllm)"
)
pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

TASK, SPLIT = "hm_internvl_parity", "test"
GEN_KWARGS = {"max_new_tokens": 10, "until": ["\n\n"], "temperature": 0, "do_sample": False}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny InternVL, every matrix re-drawn with std 1.5/sqrt(fan_in) so its
    answers depend on the image and the prompt."""
    import torch
    from transformers import InternVLForConditionalGeneration

    from harness_merge.demo.tiny import build_tiny_internvl

    out = build_tiny_internvl(tmp_path_factory.mktemp("internvl_parity") / "internvl", seed=0)
    model = InternVLForConditionalGeneration.from_pretrained(out)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(out)
    pc = out / "processor_config.json"
    d = json.loads(pc.read_text())
    d["video_processor"] = {"video_processor_type": "InternVLVideoProcessor"}
    pc.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return str(out)


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


def _messages(doc):
    from lmms_eval.api.task import ConfigurableMessagesTask

    return ConfigurableMessagesTask._build_user_turn(_visual(doc), doc["question"])


def _meta(i):
    return {"task": TASK, "doc_id": i, "repeats": 1}


@pytest.fixture(scope="module")
def reference(base, docs):
    from lmms_eval.models.chat.internvl_hf import InternVLHf

    m = InternVLHf(pretrained=base, device="cpu", device_map="cpu")
    m.task_dict = {TASK: {SPLIT: docs}}
    reqs = [
        Instance(
            request_type="generate_until",
            arguments=(d["question"], _messages, dict(GEN_KWARGS), i, TASK, SPLIT),
            idx=0,
            metadata=_meta(i),
        )
        for i, d in enumerate(docs)
    ]
    out = [getattr(r, "text", r) for r in m.generate_until(reqs)]
    del m
    return out


def _merged_answers(base, docs, **kw):
    from harness_merge.harness.lmms_model import MergedLMM

    args = ",".join([f"pretrained={base}", "method=none"] + [f"{k}={v}" for k, v in kw.items()])
    m = MergedLMM.create_from_arg_string(args, {"batch_size": 1})
    m.task_dict = {TASK: {SPLIT: docs}}
    reqs = [
        Instance(
            request_type="generate_until",
            arguments=(d["question"], dict(GEN_KWARGS), _visual, i, TASK, SPLIT),
            idx=0,
            metadata=_meta(i),
        )
        for i, d in enumerate(docs)
    ]
    return m, [getattr(r, "text", r) for r in m.generate_until(reqs)]


def test_merged_hf_equals_lmms_internvl_hf_chat(base, docs, reference):
    assert len(reference) == len(docs) and len(set(reference)) >= 3, reference
    m, ours = _merged_answers(base, docs, backend="hf")
    assert m.profile.name == "internvl"  # chosen from the base's model_type
    assert m.backend.info.dtype == "bfloat16"  # as the class loads it
    assert ours == reference
    assert m.merge_record["first_prompt"].startswith(
        "<|im_start|>user\n<IMG_CONTEXT><image>\nIs the square red?"
    )


def test_plain_profile_is_not_the_internvl_class(base, docs, reference):
    _, ours = _merged_answers(base, docs, backend="hf", prompt_profile="plain")
    assert ours != reference
