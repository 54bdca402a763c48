"""Issue 16's settings served by vLLM, against the hf backend (float32, greedy,
tiny offline models): a DoRA merge (vLLM has no DoRA: served as folded full
weights), an InternVL2.5 full-checkpoint merge, and a LLaVA-repo checkpoint
merge (the merged projector in full weights) rendered with ``vicuna_v1``.
Runs in .venv-vllm (``scripts/test_vllm.sh``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm.sh")

from harness_merge.backends import GenRequest, LLRequest, load_backend

from .test_vllm import QUESTIONS, REPO, _tasks_dir, msg

pytestmark = pytest.mark.vllm

OPTS = {"dtype": "float32"}
VOPTS = dict(OPTS, max_model_len=1024)
MAX_NEW = 8


def _wide_head_inplace(model_dir: Path) -> None:
    """LM head (tied embeddings) redrawn with std 0.5, as conftest's builders do,
    so greedy top-1 margins are far above float32 noise."""
    import torch
    from safetensors.torch import load_file, save_file

    f = Path(model_dir) / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(123)
    for k in [k for k in sd if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]:
        sd[k] = torch.randn(sd[k].shape, generator=g, dtype=torch.float32).to(sd[k].dtype) * 0.5
    save_file(sd, str(f), metadata={"format": "pt"})


def _requests(images, n=4):
    gen = [
        GenRequest(messages=msg(q), images=(im,), max_new_tokens=MAX_NEW)
        for q, im in zip(QUESTIONS[:n], images[:n])
    ]
    ll = [
        LLRequest(continuation="yes", messages=msg(q), images=(im,)) for q, im in zip(QUESTIONS[:n], images)
    ]
    return gen, ll


def _compare(vb, hb, gen, ll):
    out = vb.generate(gen)
    assert out == hb.generate(gen)
    for (a, ga), (b, gb) in zip(vb.loglikelihood(ll), hb.loglikelihood(ll)):
        assert abs(a - b) < 1e-3 * max(1.0, abs(b)) and ga == gb
    return out


def _lmms(work: Path, model_args: str, out: Path) -> dict:
    tasks_dir, tasks = _tasks_dir(work)
    exe = Path(sys.executable).parent / "lmms_eval"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness_merge.harness.lmms_cli"]
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=str(work / "hf_datasets"),
        PYTHONUNBUFFERED="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    p = subprocess.run(
        cmd
        + ["--model", "merged", "--model_args", model_args, "--tasks", ",".join(tasks)]
        + ["--include_path", str(tasks_dir), "--limit", "3", "--output_path", str(out), "--log_samples"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    explain = f"rc={p.returncode}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-6000:]}"
    assert p.returncode == 0, explain
    assert "harness-merge ERROR" not in p.stderr, explain
    files = sorted(out.rglob("*results*.json"))
    assert files, explain
    res = json.loads(files[-1].read_text())
    assert set(res["results"]) >= set(tasks)
    return res


# --------------------------------------------------------------------------- DoRA
@pytest.fixture(scope="module")
def dora(vl, work):
    from harness_merge.api import MergeSpec, merge
    from harness_merge.demo.tiny import random_dora

    base = vl["base"]
    ads = [
        random_dora(base, work / f"dora{i}", rank=4, alpha=8, seed=30 + i, std=2.0, magnitude_std=0.5)
        for i in (1, 2)
    ]
    art = merge(
        MergeSpec(adapters=tuple(str(a) for a in ads), method="copa", base=base, format="lora"),
        cache_dir=vl["cache"],
        progress=False,
    )
    assert art.kind == "lora" and art.manifest["dora"]["peft_variant"] == "dora"
    return base, [Path(a) for a in ads], art


def test_dora_merge_served_as_full_weights_equals_hf(dora, images):
    """vLLM refuses DoRA adapters; the backend serves the DoRA artifact's folded
    weights (written through the merge cache) and answers as PEFT's DoRA model."""
    from harness_merge.artifact.cache import MANIFEST

    base, _, art = dora
    gen, ll = _requests(images)
    vb = load_backend("vllm", art, base, **VOPTS)
    hb = load_backend("hf", art, base, **OPTS)  # PEFT's own DoRA model
    b0 = load_backend("hf", None, base, **OPTS)
    try:
        served = vb.info.extra["served"]
        assert vb.kind == "full" and vb.info.artifact_kind == "full" and vb.lora_request is None
        assert served["as"] == "full" and served["dora_artifact"] == str(art.path)
        full = Path(served["full_artifact"])
        m = json.loads((full / MANIFEST).read_text())
        assert m["format"] == "full" and m["dora"]["peft_variant"] == "dora"
        assert Path(vb.engine.model) == full
        out = _compare(vb, hb, gen, ll)
        # the merge is what is served: the base alone scores differently
        lv, l0 = [a for a, _ in vb.loglikelihood(ll)], [a for a, _ in b0.loglikelihood(ll)]
        assert max(abs(a - b) for a, b in zip(lv, l0)) > 1e-3, (out, lv, l0)
    finally:
        for b in (vb, hb, b0):
            b.close()


def test_dora_copa_through_lmms_eval_backend_vllm(dora, vl, work):
    base, ads, _ = dora
    res = _lmms(
        work,
        f"pretrained={base},adapters=[{','.join(map(str, ads))}],method=copa,backend=vllm,"
        f"dtype=float32,max_model_len=1024,cache_dir={vl['cache']}",
        work / "lmms_dora_vllm",
    )
    merge = res["config"]["merge"]
    assert merge["backend"] == "vllm" and merge["artifact"]["kind"] == "full"
    assert merge["manifest"]["method"] == "copa" and merge["manifest"]["dora"]["peft_variant"] == "dora"
    assert merge["served"]["as"] == "full" and "DoRA" in merge["served"]["why"]


# --------------------------------------------------------------------------- InternVL2.5
@pytest.fixture(scope="module")
def internvl(work):
    from harness_merge.api import MergeSpec, merge
    from harness_merge.demo.tiny import build_tiny_internvl, perturbed_checkpoint

    base = build_tiny_internvl(work / "internvl", seed=0)
    _wide_head_inplace(base)
    # InternVL checkpoints converted for transformers carry a video processor config,
    # which vLLM's InternVL processor loads; the tiny builder leaves it out (its class
    # needs torchvision, which .venv-vllm has)
    from transformers import InternVLVideoProcessor

    InternVLVideoProcessor(size={"height": 28, "width": 28}).save_pretrained(str(base))
    cks = [perturbed_checkpoint(base, work / f"internvl_ft{i}", seed=60 + i, rel_std=0.3) for i in (1, 2)]
    art = merge(
        MergeSpec(adapters=tuple(map(str, cks)), method="ta", params={"scaling": 0.5}, base=str(base)),
        cache_dir=work / "merge_cache_ivl",
        progress=False,
    )
    assert art.kind == "full"
    return str(base), cks, art


def test_internvl_full_merge_vllm_equals_hf(internvl, images):
    base, _, art = internvl
    gen, ll = _requests(images)
    vb = load_backend("vllm", art, base, **VOPTS)
    hb = load_backend("hf", art, base, **OPTS)
    try:
        assert vb.info.model_class == "InternVLForConditionalGeneration"
        _compare(vb, hb, gen, ll)
    finally:
        vb.close()
        hb.close()


# --------------------------------------------------------------------------- LLaVA-repo layout
@pytest.fixture(scope="module")
def llava_repo(work):
    from harness_merge.api import MergeSpec, merge
    from harness_merge.demo.tiny import save_llava_repo_lora

    from .conftest import build_llava

    base = build_llava(work / "llava_for_repo")
    cks = [
        save_llava_repo_lora(
            base, work / f"llava_repo_ck{i}", rank=4, alpha=8, seed=40 + i, std=2.0, projector_std=0.5
        )
        for i in (1, 2)
    ]
    art = merge(
        MergeSpec(adapters=tuple(map(str, cks)), method="copa", base=str(base)),
        cache_dir=work / "merge_cache_llava_repo",
        progress=False,
    )
    assert art.kind == "full" and art.manifest["non_lora"]["layout"] == "llava_repo"
    return str(base), cks, art


def test_llava_repo_merge_vicuna_v1_vllm_equals_hf(llava_repo, images):
    """The merged projector is in the full weights vLLM serves (through the
    compat copy); prompts rendered with vicuna_v1 as the harness does."""
    from harness_merge.harness.conv_templates import gen_request, get_template, image_token_of, ll_request

    base, _, art = llava_repo
    conv = get_template("vicuna_v1")
    hb = load_backend("hf", art, base, **OPTS)
    tok = image_token_of(hb.processor)
    gen = [
        gen_request(conv, q, {"max_new_tokens": MAX_NEW, "until": ("</s>",)}, [im], tok)
        for q, im in zip(QUESTIONS, images)
    ]
    ll = [ll_request(conv, q, "yes", [im], tok) for q, im in zip(QUESTIONS, images)]
    assert gen[0].prompt.startswith("A chat between") and tok in gen[0].prompt
    vb = load_backend("vllm", art, base, **VOPTS)
    v0 = load_backend("vllm", SimpleNamespace(kind="full", path=Path(base)), base, **VOPTS)
    try:
        out = _compare(vb, hb, gen, ll)
        assert out != v0.generate(gen) or [a for a, _ in vb.loglikelihood(ll)] != [
            a for a, _ in v0.loglikelihood(ll)
        ]
    finally:
        for b in (vb, hb, v0):
            b.close()


# --------------------------------------------------------------------------- through lmms-eval, vllm vs hf
def _answers(res: dict, out: Path) -> dict:
    """Per task, doc_id -> the filtered responses lmms-eval logged."""
    got = {}
    for f in out.rglob("*samples_*.jsonl"):
        for line in f.read_text().splitlines():
            if line.strip():
                s = json.loads(line)
                task = f.name.split("samples_", 1)[1].rsplit(".jsonl", 1)[0]
                got.setdefault(task, {})[s["doc_id"]] = s["filtered_resps"]
    return got


def _same_answers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for task in a:
        assert a[task].keys() == b[task].keys() and a[task], task
        for doc in a[task]:
            ra, rb = a[task][doc], b[task][doc]
            if ra and isinstance(ra[0], list):  # loglikelihood: [[ll, is_greedy], ...]
                for (x, gx), (y, gy) in zip(ra, rb):
                    assert abs(float(x) - float(y)) < 1e-3 * max(1.0, abs(float(y))) and gx == gy, (task, doc)
            else:
                assert ra == rb, (task, doc)


def _vllm_vs_hf(work: Path, model_args: str, name: str) -> tuple[dict, dict]:
    rv = _lmms(work, f"{model_args},backend=vllm,max_model_len=1024", work / f"lmms_{name}_vllm")
    rh = _lmms(work, f"{model_args},backend=hf", work / f"lmms_{name}_hf")
    _same_answers(_answers(rv, work / f"lmms_{name}_vllm"), _answers(rh, work / f"lmms_{name}_hf"))
    return rv["config"]["merge"], rh["config"]["merge"]


def test_internvl_through_lmms_eval_vllm_equals_hf(internvl, work):
    base, cks, _ = internvl
    mv, mh = _vllm_vs_hf(
        work,
        f"pretrained={base},adapters=[{','.join(map(str, cks))}],method=ta,scaling=0.5,dtype=float32,"
        f"cache_dir={work / 'merge_cache_ivl'}",
        "internvl",
    )
    assert mv["backend"] == "vllm" and mv["artifact"]["kind"] == "full"
    assert mv["artifact"]["path"] == mh["artifact"]["path"]  # one merge, served by both
    assert mv["prompt_profile"] == mh["prompt_profile"]


def test_llava_repo_through_lmms_eval_vllm_equals_hf(llava_repo, work):
    base, cks, _ = llava_repo
    mv, mh = _vllm_vs_hf(
        work,
        f"pretrained={base},adapters=[{','.join(map(str, cks))}],method=copa,conv_template=vicuna_v1,"
        f"dtype=float32,cache_dir={work / 'merge_cache_llava_repo'}",
        "llava_repo",
    )
    assert mv["conv_template"] == mh["conv_template"] == "vicuna_v1"
    assert mv["artifact"]["kind"] == "full" and mv["manifest"]["non_lora"]["layout"] == "llava_repo"
    assert mv["artifact"]["path"] == mh["artifact"]["path"]
