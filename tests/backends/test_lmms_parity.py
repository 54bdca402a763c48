"""Parity with lmms-eval's own model classes: ``merged method=none`` must give the
answers the harness's class gives on the same tiny base, request for request.

- lmms-eval ``qwen2_vl`` (what published Qwen2-VL scores come from) vs ``merged``
  with its default profile for a Qwen2-VL base (``qwen2_vl``), backend=hf and
  backend=vllm.
- the profile matters: ``prompt_profile=plain`` (what ``merged`` did before)
  gives different prompts, and the test says so.
- lmms-eval ``vllm`` (its defaults) vs ``merged backend=vllm prompt_profile=vllm``.

lmms-eval's ``qwen2_vl`` module needs torchvision (transformers' Qwen2-VL
processor) and imports ``decord`` at module level. The test runs where
torchvision imports (``.venv-vllm``, by ``scripts/test_vllm.sh``) and is skipped
with the reason elsewhere. ``decord`` (video decoding) is replaced by an empty
module when it is not installed: image requests never touch it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("torchvision", reason="lmms-eval's qwen2_vl class needs torchvision (run in .venv-vllm)")
pytest.importorskip("lmms_eval")
try:
    import decord  # noqa: F401
except ImportError:  # the smallest honest shim: qwen2_vl.py imports it at module level, images never use it
    sys.modules["decord"] = types.ModuleType("decord")

from lmms_eval.api.instance import Instance  # noqa: E402

TASK, SPLIT = "hm_parity", "test"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Qwen2-VL whose answers depend on the image and the prompt: every
    matrix re-drawn with std 1.5/sqrt(fan_in) (at the default init a random tiny
    model answers "\n" to everything, which would make any two prompts agree)."""
    import torch

    from harness_merge.demo.tiny import new_tiny_qwen2vl, save_model

    model, proc = new_tiny_qwen2vl(seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    # the folder's name says qwen2-vl: lmms-eval's vllm class decides its image resize from the path
    return str(save_model(model, proc, tmp_path_factory.mktemp("parity") / "tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def docs():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    ims = [
        Image.new("RGB", (56, 56), (200, 30, 30)),
        Image.new("RGB", (56, 56), (30, 30, 200)),
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (84, 60, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)),
    ]
    qs = [
        "<image>\nIs the square red?",
        "What colour is it? ",
        "Describe the image.\n",
        "<image> Count the dots.",
        "Is it blue?",
    ]
    return [{"image": im, "question": q} for im, q in zip(ims, qs)]


def _requests(docs):
    def doc_to_visual(doc):
        return [doc["image"]]

    return [
        Instance(
            request_type="generate_until",
            arguments=(
                d["question"],
                {"max_new_tokens": 10, "until": ["\n\n"], "temperature": 0, "do_sample": False},
                doc_to_visual,
                i,
                TASK,
                SPLIT,
            ),
            idx=0,
            metadata={"task": TASK, "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


def _answers(model, docs):
    model.task_dict = {TASK: {SPLIT: docs}}
    return model.generate_until(_requests(docs))


@pytest.fixture(scope="module")
def reference(base, docs):
    from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

    m = Qwen2_VL(pretrained=base, device="cpu", device_map="cpu")
    out = _answers(m, docs)
    del m
    return out


def _merged(base, **kw):
    from harness_merge.harness.lmms_model import MergedLMM

    args = ",".join([f"pretrained={base}", "method=none"] + [f"{k}={v}" for k, v in kw.items()])
    return MergedLMM.create_from_arg_string(args, {"batch_size": 1})


def test_qwen2_vl_reference_answers_are_not_trivial(reference):
    assert len(reference) == 5
    assert sum(bool(a) for a in reference) >= 3, reference


def test_merged_hf_equals_lmms_qwen2_vl_sample_for_sample(base, docs, reference):
    m = _merged(base, backend="hf")
    assert m.profile.name == "qwen2_vl"  # chosen from the base's model_type
    ours = _answers(m, docs)
    assert ours == reference
    rec = m.merge_record
    assert rec["prompt_profile"]["name"] == "qwen2_vl"
    assert rec["first_prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert rec["backend_opts"]["max_pixels"] == 602112 and rec["backend_opts"]["eos_from"] == "tokenizer"


def test_plain_profile_is_not_the_qwen2_vl_class(base, docs, reference):
    """What merged did before profiles: no system prompt, original pixels; the
    answers differ from lmms-eval's qwen2_vl (the parity test above can fail)."""
    m = _merged(base, backend="hf", prompt_profile="plain")
    ours = _answers(m, docs)
    assert "You are a helpful assistant." not in m.merge_record["first_prompt"]
    assert ours != reference


@pytest.mark.vllm
def test_merged_vllm_equals_lmms_qwen2_vl_sample_for_sample(base, docs, reference):
    pytest.importorskip("vllm")
    m = _merged(base, backend="vllm", dtype="float32", max_model_len=2048)
    try:
        assert _answers(m, docs) == reference
    finally:
        m.backend.close()


# --------------------------------------------------------------- lmms-eval's own vllm class
@pytest.mark.vllm
def test_merged_vllm_profile_equals_lmms_vllm_class_sample_for_sample(base, docs):
    """lmms-eval ``vllm`` (its defaults: text first, images after, 1024 new tokens
    at least, no stop strings, small images scaled up for a qwen2-vl path) vs
    ``merged backend=vllm prompt_profile=vllm``, both on vLLM in this process."""
    pytest.importorskip("vllm")
    import gc

    from lmms_eval.models.simple.vllm import VLLM
    from PIL import Image

    docs = docs + [{"image": Image.new("RGB", (40, 20), (10, 200, 10)), "question": "Small?"}]
    ref_model = VLLM(model=base, dtype="float32", max_model_len=2048, disable_log_stats=True)
    try:
        ref = _answers(ref_model, docs)
    finally:
        del ref_model.client
        del ref_model
        gc.collect()
    assert len(ref) == len(docs) and len(set(ref)) >= 3, ref
    m = _merged(base, backend="vllm", prompt_profile="vllm", dtype="float32", max_model_len=2048)
    try:
        assert m.profile.upscale_min_side == 28  # the path names qwen2-vl
        assert _answers(m, docs) == ref
    finally:
        m.backend.close()


# --------------------------------------------------------------------------- the real CLI, --log_samples
_TASK_YAML = """
task: hm_parity_gen
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: parity.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function parity_utils.doc_to_visual
doc_to_text: !function parity_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
_TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


@pytest.mark.slow
def test_cli_log_samples_qwen2_vl_vs_merged(base, docs, tmp_path):
    """``lmms_eval --model qwen2_vl`` and ``--model merged method=none`` on the same
    task: the logged per-sample answers are identical."""
    import json
    import os
    import subprocess

    from datasets import Dataset, Features, Image, Value

    d = tmp_path / "tasks"
    d.mkdir()
    rows = {
        "question": [x["question"] for x in docs],
        "answer": ["x"] * len(docs),
        "image": [x["image"] for x in docs],
    }
    Dataset.from_dict(
        rows, features=Features({"question": Value("string"), "answer": Value("string"), "image": Image()})
    ).to_parquet(str(d / "parity.parquet"))
    (d / "parity_utils.py").write_text(_TASK_UTILS)
    (d / "hm_parity_gen.yaml").write_text(_TASK_YAML)
    shim = tmp_path / "shim"
    (shim / "decord").mkdir(parents=True)
    (shim / "decord" / "__init__.py").write_text(
        '"""test shim: lmms-eval\'s qwen2_vl imports decord; images never use it"""\n'
    )
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=str(tmp_path / "hfd"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(
            [str(shim), str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    answers = {}
    for model, margs in (
        ("qwen2_vl", f"pretrained={base},device=cpu,device_map=cpu"),
        ("merged", f"pretrained={base},method=none,device=cpu"),
    ):
        out = tmp_path / model
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmms_eval",
                "--model",
                model,
                "--model_args",
                margs,
                "--tasks",
                "hm_parity_gen",
                "--include_path",
                str(d),
                "--output_path",
                str(out),
                "--log_samples",
                "--batch_size",
                "1",
            ],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        files = list(out.rglob("*samples_hm_parity_gen*.jsonl"))
        assert p.returncode == 0 and files, p.stderr[-5000:]
        samples = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        answers[model] = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert len(answers["qwen2_vl"]) == len(docs)
    assert answers["merged"] == answers["qwen2_vl"]
