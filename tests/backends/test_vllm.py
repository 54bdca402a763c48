"""backend=vllm against backend=hf on tiny offline models (float32, CPU).

Runs in .venv-vllm (``scripts/test_vllm.sh``); skips with the reason where
vllm is not installed. Engine starts are kept few: ONE engine serves the
Qwen2-VL base, the merged LoRA, two adapters and a vision-tower adapter
(declared up front with ``prepare_engine``); the full-weights artifact, the
LLaVA and the text LM get one engine each; the lmms_eval CLI run is one
subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm.sh")

from harness_merge.backends import BackendError, GenRequest, LLRequest, load_backend
from harness_merge.backends import vllm as hv

from .conftest import build_llava, build_text_lm

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
OPTS = {"dtype": "float32"}
MAX_NEW = 8
QUESTIONS = ["What colour is it?", "Describe the image.", "Count the shapes.", "Which is larger?"]


def lora_art(path) -> SimpleNamespace:
    """An adapter folder as a "lora" artifact (what the backend reads: kind, path)."""
    return SimpleNamespace(kind="lora", path=Path(path))


def msg(text: str, n_images: int = 1) -> tuple[dict, ...]:
    return ({"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]},)


@pytest.fixture(scope="module")
def reqs(images):
    out = [
        GenRequest(messages=msg(q), images=(im,), max_new_tokens=MAX_NEW) for q, im in zip(QUESTIONS, images)
    ]
    out.append(
        GenRequest(messages=msg("Compare them.", 2), images=(images[0], images[2]), max_new_tokens=MAX_NEW)
    )
    return out


@pytest.fixture(scope="module")
def ll_reqs(images):
    out = []
    for q, im in zip(QUESTIONS, images):
        for cont in ("red", "a cat sat"):
            out.append(LLRequest(continuation=cont, messages=msg(q), images=(im,)))
    return out


@pytest.fixture(scope="module")
def shared(vl):
    """One engine for the whole Qwen2-VL set, declared up front."""
    arts = {
        "merged": vl["lora"],
        "ad1": lora_art(vl["adapters"][0]),
        "ad2": lora_art(vl["adapters"][1]),
        "tower": lora_art(vl["tower"]),
    }
    engine = hv.prepare_engine(vl["base"], list(arts.values()), max_images=2, **OPTS)
    backs = {k: load_backend("vllm", a, vl["base"], **OPTS) for k, a in arts.items()}
    backs["base"] = load_backend("vllm", None, vl["base"], **OPTS)
    yield engine, backs
    for b in backs.values():
        b.close()
    engine.close()


@pytest.fixture(scope="module")
def hf(vl):
    out = {
        "merged": load_backend("hf", vl["lora"], vl["base"], **OPTS),
        "base": load_backend("hf", None, vl["base"], **OPTS),
        "tower": load_backend("hf", lora_art(vl["tower"]), vl["base"], **OPTS),
    }
    yield out
    for b in out.values():
        b.close()


@pytest.fixture(scope="module")
def gen(shared, hf, reqs):
    """Answers of every backend to ``reqs`` (each one generate call)."""
    _, backs = shared
    return {("vllm", k): b.generate(reqs) for k, b in backs.items()} | {
        ("hf", k): b.generate(reqs) for k, b in hf.items()
    }


def hf_tokens(b, reqs) -> list[list[int]]:
    import torch

    out = []
    for r in reqs:
        enc = b._encode([b.render(r)], list(r.images), "left")
        with torch.inference_mode():
            seq = b.model.generate(
                **enc,
                max_new_tokens=r.max_new_tokens,
                do_sample=False,
                eos_token_id=b.eos_ids,
                pad_token_id=b.tokenizer.pad_token_id,
            )
        out.append(seq[0, enc["input_ids"].shape[1] :].tolist())
    return out


def vllm_tokens(b, reqs) -> list[list[int]]:
    from vllm import SamplingParams

    inputs = [{"prompt": b.render(r), "multi_modal_data": b._mm(r.images)} for r in reqs]
    outs = b.llm.generate(
        inputs,
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
        lora_request=b.lora_request,
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs]


# --------------------------------------------------------------------------- parity with hf
@pytest.mark.parametrize("tag", ["merged", "base", "tower"])
def test_generate_matches_hf(gen, tag):
    assert gen[("vllm", tag)] == gen[("hf", tag)]


def test_greedy_tokens_match_hf_token_for_token(shared, hf, reqs):
    _, backs = shared
    for tag in ("merged", "tower"):
        v, h = vllm_tokens(backs[tag], reqs), hf_tokens(hf[tag], reqs)
        assert v == h, tag
        assert all(len(t) == MAX_NEW for t in v)  # 8 real tokens: a meaningful comparison


def test_adapters_change_outputs(gen, shared, ll_reqs):
    base = gen[("vllm", "base")]
    for tag in ("merged", "ad1", "ad2"):
        assert gen[("vllm", tag)] != base, tag
    assert gen[("vllm", "ad1")] != gen[("vllm", "ad2")]
    # the tiny base barely looks at the image, so the vision-tower LoRA shows in the
    # log-likelihoods (vLLM ignores tower LoRA silently unless enable_tower_connector_lora)
    _, backs = shared
    lt, lb = backs["tower"].loglikelihood(ll_reqs), backs["base"].loglikelihood(ll_reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(lt, lb)) > 1e-2


@pytest.mark.parametrize("tag", ["merged", "base", "tower"])
def test_loglikelihood_matches_hf(shared, hf, ll_reqs, tag):
    _, backs = shared
    v, h = backs[tag].loglikelihood(ll_reqs), hf[tag].loglikelihood(ll_reqs)
    assert len(v) == len(h) == len(ll_reqs)
    for (lv, gv), (lh, gh) in zip(v, h):
        assert lv < 0 and abs(lv - lh) < 1e-3 * max(1.0, abs(lh)), (lv, lh)
        assert gv == gh


def test_loglikelihood_greedy_flag(shared, reqs):
    """A continuation equal to the greedy answer is greedy; the empty one scores 0."""
    _, backs = shared
    b = backs["base"]  # its greedy answers are ASCII, so the text re-tokenises to the same tokens
    r = reqs[0]
    ans = b.generate([GenRequest(messages=r.messages, images=r.images, max_new_tokens=3)])[0]
    assert ans and ans.isascii()
    res = b.loglikelihood(
        [
            LLRequest(continuation=ans, messages=r.messages, images=r.images),
            LLRequest(continuation="", messages=r.messages, images=r.images),
        ]
    )
    assert res[0][1] is True and res[0][0] <= 0
    assert res[1] == (0.0, True)


# --------------------------------------------------------------------------- generation options
def _printable_stop(text: str) -> tuple[str, int] | None:
    for j, ch in enumerate(text):
        if j > 0 and ch.isascii() and ch.isprintable() and ch.strip():
            return ch, j
    return None


def test_until_max_new_tokens_temperature(shared, hf, gen, reqs):
    _, backs = shared
    full = gen[("vllm", "merged")]
    picked = [(i, _printable_stop(t)) for i, t in enumerate(full) if _printable_stop(t)]
    assert picked, f"no printable ASCII character in {full!r}"
    i, (stop, _) = picked[0]
    r = reqs[i]
    batch = [
        GenRequest(messages=r.messages, images=r.images, max_new_tokens=MAX_NEW, until=(stop,)),
        GenRequest(messages=r.messages, images=r.images, max_new_tokens=MAX_NEW, until=("not-in-it", stop)),
        GenRequest(messages=r.messages, images=r.images, max_new_tokens=MAX_NEW, until=("never-there",)),
        GenRequest(messages=r.messages, images=r.images, max_new_tokens=2),
        GenRequest(
            messages=r.messages, images=r.images, max_new_tokens=MAX_NEW, temperature=1.0, do_sample=True
        ),
    ]
    v = backs["merged"].generate(batch)  # one generate call, one SamplingParams per request
    assert v[0] == v[1] == full[i][: full[i].index(stop)]
    assert v[2] == full[i]
    assert full[i].startswith(v[3]) and len(v[3]) < len(full[i])
    assert isinstance(v[4], str)
    assert v[:4] == hf["merged"].generate(batch[:4])


# --------------------------------------------------------------------------- LoRA vs full weights
def test_lora_served_equals_full_artifact(vl, shared, gen, reqs, ll_reqs):
    _, backs = shared
    full = load_backend("vllm", vl["full"], vl["base"], **OPTS)
    try:
        assert full.engine is not backs["merged"].engine  # a different model folder, its own engine
        assert full.lora_request is None and full.info.artifact_kind == "full"
        assert full.generate(reqs) == gen[("vllm", "merged")]
        for (a, ga), (b, gb) in zip(full.loglikelihood(ll_reqs), backs["merged"].loglikelihood(ll_reqs)):
            assert abs(a - b) < 1e-3 * max(1.0, abs(b)) and ga == gb
    finally:
        full.close()
    assert full.engine.llm is None  # its last user closed it


# --------------------------------------------------------------------------- engine sharing
def test_one_engine_serves_the_set(shared):
    engine, backs = shared
    assert all(b.engine is engine for b in backs.values())
    assert engine.starts == 1  # declared up front: no restart for the tower adapter or two images
    assert engine.enable_lora and engine.lora_rank == 8 and engine.tower and engine.max_images == 2
    ids = [b.lora_request.lora_int_id for k, b in backs.items() if k != "base"]
    assert len(set(ids)) == len(ids) and all(i > 0 for i in ids)
    assert backs["base"].lora_request is None
    assert engine in hv.engines()


def test_engine_lifecycle(vl, images):
    """Without a declaration: a LoRA needing more than the running engine has
    restarts it (warning); close() of the last user shuts it down; a backend
    dropped without close() leaves the engine idle for the next backend on the
    same base, until an engine for another model starts."""
    opts = dict(OPTS, max_model_len=1024)  # other engine options -> another cached engine
    b0 = load_backend("vllm", None, vl["base"], **opts)
    eng = b0.engine
    assert eng.starts == 1 and not eng.enable_lora
    b1 = load_backend("vllm", lora_art(vl["adapters"][0]), vl["base"], **opts)
    assert b1.engine is eng and eng.starts == 2 and eng.enable_lora and eng.lora_rank == 8
    r = GenRequest(messages=msg("Hi", 1), images=(images[0],), max_new_tokens=4)
    assert b0.generate([r]) and b1.generate([r])
    b0.close()
    assert eng.llm is not None and eng.users == 1
    del b1  # dropped without close(): idle, still running, still cached
    assert eng.users == 0 and eng.llm is not None and eng in hv.engines()
    b2 = load_backend("vllm", lora_art(vl["adapters"][1]), vl["base"], **opts)
    assert b2.engine is eng and eng.starts == 2  # reused as is
    assert b2.generate([r])
    del b2
    full = load_backend("vllm", vl["full"], vl["base"], **opts)  # another model: the idle engine goes
    assert eng.llm is None and eng not in hv.engines()
    assert full.generate([r])
    full.close()
    assert full.engine.llm is None and full.engine not in hv.engines()


def test_engine_pools_own_their_engines(vl, images):
    """Two pools never share an engine; closing a pool shuts its engines down
    and leaves none behind; its backends then refuse to restart one."""
    r = GenRequest(messages=msg("Hi", 1), images=(images[0],), max_new_tokens=4)
    opts = dict(OPTS, max_model_len=768)
    default_before = list(hv.engines())
    with hv.EnginePool() as p1:
        with hv.EnginePool() as p2:
            b1 = load_backend("vllm", None, vl["base"], pool=p1, **opts)
            b2 = load_backend("vllm", None, vl["base"], pool=p2, **opts)
            e1, e2 = b1.engine, b2.engine
            assert e1 is not e2 and p1.engines() == [e1] and p2.engines() == [e2]
            assert e1.llm is not None and e2.llm is not None
            assert b1.generate([r]) == b2.generate([r])
        assert e2.llm is None and p2.engines() == [] and e1.llm is not None  # p1's engine untouched
        with pytest.raises(BackendError, match="EnginePool that was closed"):
            b2.generate([r])
        b1.close()  # close releases: the last user of an unprepared engine shuts it down
        assert e1.llm is None and p1.engines() == []
        b3 = load_backend("vllm", None, vl["base"], pool=p1, **opts)
        assert b3.engine is not e1 and b3.engine.llm is not None
    assert b3.engine.llm is None and p1.engines() == [] and p1.closed
    assert hv.engines() == default_before  # the default pool was never involved


# --------------------------------------------------------------------------- refusals
def test_rank_above_max_refused_before_engine_start(vl, work):
    from harness_merge.demo.tiny import random_lora

    r16 = lora_art(random_lora(vl["base"], work / "lora_r16", rank=16, alpha=16, seed=5))
    r600 = lora_art(random_lora(vl["base"], work / "lora_r600", rank=600, alpha=600, seed=6))
    before = list(hv.engines())
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"rank 16, above max_lora_rank=8"):
        load_backend("vllm", r16, vl["base"], max_lora_rank=8, **OPTS)
    with pytest.raises(BackendError, match=r"LoRA rank 600 is above 512"):
        load_backend("vllm", r600, vl["base"], **OPTS)
    with pytest.raises(BackendError, match=r"rank 16, above max_lora_rank=8"):
        hv.prepare_engine(vl["base"], [r16], max_lora_rank=8, **OPTS)
    assert time.perf_counter() - t0 < 10
    assert hv.engines() == before  # no engine was created, let alone started
    with pytest.raises(BackendError, match="unknown option"):
        load_backend("vllm", None, vl["base"], fold=True)


def test_helpers():
    assert [hv.engine_lora_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512)] == [
        1,
        8,
        8,
        16,
        320,
        320,
        512,
        512,
    ]
    with pytest.raises(BackendError):
        hv.engine_lora_rank(513)


def test_inspect_lora(vl):
    m = hv.inspect_lora(vl["lora"].path)
    assert m.rank == 4 and not m.tower and m.engine_rank == 8
    t = hv.inspect_lora(vl["tower"])
    assert t.rank == 8 and t.tower


# --------------------------------------------------------------------------- LLaVA and text-only
def test_llava(work, images):
    """LLaVA saved by transformers 5 (vision keys renamed into a compat copy):
    the base and a full-weights merge serve and match hf+PEFT; a LoRA artifact is
    refused with a clear error before any engine starts (vLLM's LoRA layers break
    the CLIP tower on image requests)."""
    from harness_merge.api import MergeSpec, merge
    from harness_merge.demo.tiny import random_lora

    base = str(build_llava(work / "llava"))
    ad = lora_art(
        random_lora(
            base, work / "llava_lora", rank=8, alpha=16, seed=7, std=2.0, targets=("q_proj", "v_proj")
        )
    )
    full = merge(
        MergeSpec(adapters=(str(ad.path),), method="ta", base=base, format="full"),
        cache_dir=work / "merge_cache",
        progress=False,
    )
    rq = [
        GenRequest(messages=msg(q), images=(im,), max_new_tokens=MAX_NEW) for q, im in zip(QUESTIONS, images)
    ]
    llr = [LLRequest(continuation="yes", messages=msg(q), images=(im,)) for q, im in zip(QUESTIONS, images)]
    before = list(hv.engines())
    with pytest.raises(BackendError, match="cannot serve a LoRA artifact on a LLaVA base.*format=full"):
        load_backend("vllm", ad, base, **OPTS)
    assert hv.engines() == before
    vb = load_backend("vllm", None, base, **OPTS)
    vf = load_backend("vllm", full, base, **OPTS)
    hb = load_backend("hf", None, base, **OPTS)
    hl = load_backend("hf", ad, base, **OPTS)
    try:
        assert Path(vb.engine.served_model) != Path(base)  # the renamed copy
        out = vf.generate(rq)
        assert out == hl.generate(rq)
        assert vb.generate(rq) == hb.generate(rq)
        assert out != vb.generate(rq)
        for (a, ga), (b, gb) in zip(vf.loglikelihood(llr), hl.loglikelihood(llr)):
            assert abs(a - b) < 1e-3 * max(1.0, abs(b)) and ga == gb
    finally:
        for b in (vb, vf, hb, hl):
            b.close()


def test_text_lm_generate_loglikelihood_rolling(work):
    from harness_merge.demo.tiny import random_lora

    base = build_text_lm(work / "text_lm")
    ad = lora_art(
        random_lora(base, work / "text_lora", rank=4, alpha=8, seed=8, std=2.0, targets=("q_proj", "v_proj"))
    )
    v = load_backend("vllm", ad, str(base), **OPTS)
    h = load_backend("hf", ad, str(base), **OPTS)
    try:
        assert v.supports_images is False
        g = [
            GenRequest(prompt="Q: is the sky blue?\nA:", max_new_tokens=MAX_NEW),
            GenRequest(messages=({"role": "user", "content": "hello there"},), max_new_tokens=MAX_NEW),
            GenRequest(prompt="abc", max_new_tokens=4, until=("zz",)),
        ]
        assert v.generate(g) == h.generate(g)
        ll = [
            LLRequest(context="Q: is fire cold?\nA:", continuation=" no"),
            LLRequest(context="", continuation="hello"),
            LLRequest(messages=({"role": "user", "content": "2+2?"},), continuation="4"),
        ]
        for (a, ga), (b, gb) in zip(v.loglikelihood(ll), h.loglikelihood(ll)):
            assert abs(a - b) < 1e-3 * max(1.0, abs(b)) and ga == gb
        texts = ["the quick brown fox jumps over the lazy dog", "x"]
        for a, b in zip(v.loglikelihood_rolling(texts), h.loglikelihood_rolling(texts)):
            assert a < 0 and abs(a - b) < 1e-3 * max(1.0, abs(b))
        with pytest.raises(BackendError, match="text-only"):
            from PIL import Image

            v.generate([GenRequest(messages=msg("x"), images=(Image.new("RGB", (28, 28)),))])
    finally:
        v.close()
        h.close()


# --------------------------------------------------------------------------- the real lmms_eval CLI
_MC_YAML = """
task: hm_vllm_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: mc.parquet
test_split: test
output_type: multiple_choice
doc_to_visual: !function mc_utils.doc_to_visual
doc_to_text: !function mc_utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: !function mc_utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
_MC_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return 0 if doc["answer"] == "yes" else 1
"""


def _tasks_dir(work: Path) -> tuple[Path, list[str]]:
    """task_configs/local/demo (demo_colour, generate_until) copied next to a
    tiny multiple_choice image task (loglikelihood)."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    d = work / "lmms_tasks"
    d.mkdir(exist_ok=True)
    tasks = ["hm_vllm_mc"]
    demo = REPO / "task_configs" / "local" / "demo"
    if (demo / "demo_colour.yaml").is_file():
        shutil.copytree(demo, d / "demo", dirs_exist_ok=True)
        tasks.insert(0, "demo_colour")
    rows = {"question": [], "answer": [], "image": []}
    for i, c in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240), (20, 20, 20)]):
        rows["question"].append(f"Is the square {'red' if i % 2 == 0 else 'blue'}?")
        rows["answer"].append("yes" if i % 2 == 0 else "no")
        rows["image"].append(PILImage.new("RGB", (56, 56), c))
    feats = Features({"question": Value("string"), "answer": Value("string"), "image": Image()})
    Dataset.from_dict(rows, features=feats).to_parquet(str(d / "mc.parquet"))
    (d / "mc_utils.py").write_text(_MC_UTILS)
    (d / "hm_vllm_mc.yaml").write_text(_MC_YAML)
    return d, tasks


def test_lmms_eval_cli_backend_vllm(vl, work):
    """The real ``lmms_eval`` command with backend=vllm: a generate_until task
    (demo_colour from task_configs/local) and a multiple_choice image task."""
    tasks_dir, tasks = _tasks_dir(work)
    out = work / "lmms_out"
    exe = Path(sys.executable).parent / "lmms_eval"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness_merge.harness.lmms_cli"]
    ads = ",".join(str(a) for a in vl["adapters"])
    model_args = (
        f"pretrained={vl['base']},adapters=[{ads}],method=copa,backend=vllm,dtype=float32,"
        f"max_model_len=1024,cache_dir={vl['cache']}"
    )
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf_datasets"), PYTHONUNBUFFERED="1")
    # vLLM's default (multiprocess) engine, as users get it: EngineCore and Worker
    # processes re-import the main module (lmms_eval's, which is guarded)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    p = subprocess.run(
        cmd
        + [
            "--model",
            "merged",
            "--model_args",
            model_args,
            "--tasks",
            ",".join(tasks),
            "--include_path",
            str(tasks_dir),
            "--limit",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
        ],
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
    assert set(res["results"]) >= set(tasks), res["results"].keys()
    assert 0.0 <= res["results"]["hm_vllm_mc"]["acc,none"] <= 1.0
    if "demo_colour" in tasks:
        assert 0.0 <= res["results"]["demo_colour"]["exact_match,none"] <= 1.0
    merge = res["config"]["merge"]
    assert merge["backend"] == "vllm" and merge["artifact"]["kind"] == "lora"
    assert merge["cache_hit"] is True  # the fixture made the same copa merge into this cache
    assert merge["manifest"]["method"] == "copa"
    samples = [
        json.loads(line)
        for f in out.rglob("*samples_hm_vllm_mc*.jsonl")
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    assert len(samples) == 4
    for s in samples:
        lls = [float(x[0]) for x in s["filtered_resps"]]
        assert len(lls) == 2 and all(v < 0 for v in lls)


_TEXT_TASKS = {
    "hm_vt_gen": 'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{answer}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
    "metric_list:\n  - metric: exact_match\n",
    "hm_vt_mc": 'output_type: multiple_choice\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: ["yes", "no"]\n'
    "doc_to_target: \"{{0 if answer == 'yes' else 1}}\"\nmetric_list:\n  - metric: acc\n",
    "hm_vt_ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{question}} {{answer}}"\n'
    "metric_list:\n  - metric: word_perplexity\n",
}


def test_lm_eval_cli_backend_vllm(work):
    """lm-eval (text LM): generate_until, multiple_choice and loglikelihood_rolling
    through ``lm-eval-merged`` with backend=vllm (engine in-process here)."""
    from harness_merge.demo.tiny import random_lora

    base = work / "text_lm_cli"
    build_text_lm(base)
    ad = random_lora(
        base, work / "text_lora_cli", rank=4, alpha=8, seed=9, std=2.0, targets=("q_proj", "v_proj")
    )
    d = work / "lm_tasks"
    d.mkdir(exist_ok=True)
    qa = [("is the sky blue", "yes"), ("is fire cold", "no"), ("is water wet", "yes"), ("can fish fly", "no")]
    (d / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qa))
    for name, body in _TEXT_TASKS.items():
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {d / 'qa.jsonl'}\ntest_split: test\n{body}metadata:\n  version: 0.0\n"
        )
    exe = Path(sys.executable).parent / "lm-eval-merged"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness_merge.harness.lm_eval_cli"]
    out = work / "lm_eval_out"
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf_datasets"), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    p = subprocess.run(
        cmd
        + [
            "--model",
            "merged",
            "--model_args",
            f"pretrained={base},adapters=[{ad}],method=ta,backend=vllm,dtype=float32",
            "--tasks",
            ",".join(_TEXT_TASKS),
            "--include_path",
            str(d),
            "--output_path",
            str(out),
        ],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    explain = f"rc={p.returncode}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-6000:]}"
    assert p.returncode == 0, explain
    files = sorted(out.rglob("results*.json"))
    assert files, explain
    r = json.loads(files[-1].read_text())["results"]
    assert 0.0 <= r["hm_vt_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= r["hm_vt_mc"]["acc,none"] <= 1.0
    assert r["hm_vt_ppl"]["word_perplexity,none"] > 1.0


@pytest.mark.gpu
def test_gpu_engine_bf16(vl, reqs):
    """On a CUDA machine: the default (multiprocess) engine, bfloat16, serves the merged LoRA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    b = load_backend("vllm", vl["lora"], vl["base"], dtype="bfloat16", share=False)
    try:
        assert len(b.generate(reqs)) == len(reqs)
    finally:
        b.close()


def test_leaderboard_grid_on_one_vllm_engine(vl, work):
    """harness-merge leaderboard with backend: vllm: the base and the low-rank
    merges run as LoRAs of one engine (multi-LoRA), the dense merge on its own;
    every cell gets a value, and the results feed the regression gate."""
    import yaml

    from harness_merge.backends import vllm as hm_vllm
    from harness_merge.leaderboard import regress, runner

    grid = {
        "name": "vllm_tiny",
        "base": vl["base"],
        "adapters": {f"a{i}": str(a) for i, a in enumerate(vl["adapters"])},
        "methods": ["copa", "ta", "ties"],
        "tasks": ["demo_colour"],
        "include_path": [str(REPO / "task_configs" / "local")],
        "references": {"base": True, "adapters": False},
        "backend": "vllm",
        "limit": 3,
        "batch_size": 4,
        "model_args": {
            "dtype": "float32",
            "max_model_len": 1024,
            "max_new_tokens": 4,
            "cache_dir": str(vl["cache"]),
        },
    }
    path = work / "vllm_grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    g = runner.load_grid(path)
    before = len(hm_vllm.engines())
    data = runner.run(g, work / "vllm_lb")
    assert data["failed_cells"] == 0
    cells = {c["label"]: c for c in data["cells"]}
    assert set(cells) == {"base (zero-shot)", "copa", "ta", "ties"}
    assert all(0.0 <= c["value"] <= 100.0 for c in cells.values())
    assert (
        cells["copa"]["manifest"]["merge"]["format"] == "lora"
        and cells["ties"]["manifest"]["merge"]["format"] == "full"
    )
    assert len(hm_vllm.engines()) - before <= 2  # the shared LoRA engine (+ the full-weight model's)
    out = work / "vllm_lb" / "results.json"
    assert regress.main(["--baseline", str(out), "--results", str(out)]) == 0
