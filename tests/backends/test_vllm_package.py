"""The vLLM backend package's parts that run without vLLM (in .venv): the
engine pool's ownership, the LLaVA compatibility copy in the merge cache, LoRA
inspection, and the generation settings both backends derive from one request."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness_merge.backends import BackendError, GenRequest
from harness_merge.backends import vllm as hv
from harness_merge.backends._common import dtype_name, sampling
from harness_merge.backends.vllm.engine_pool import EnginePool, close_default_pool, default_pool


class FakeBackend:
    """What an engine counts as a user: an object with ``closed``."""

    def __init__(self, engine):
        self.closed = False
        self.engine = engine
        engine.attach(self)

    def close(self):
        self.closed = True
        self.engine.release(self)


def test_two_pools_do_not_share_and_close_empties():
    with EnginePool() as p1, EnginePool() as p2:
        a = p1.get("/no/such/model", dtype="float32")
        assert p1.get("/no/such/model", dtype="fp32") is a  # same options, same engine
        assert p1.get("/no/such/model", dtype="float32", max_model_len=64) is not a
        b = p2.get("/no/such/model", dtype="float32")
        assert b is not a and a.pool is p1 and b.pool is p2
        assert a not in p2.engines() and b not in p1.engines()
        assert a.lora_request.__func__ is b.lora_request.__func__  # same class, separate state
        ids1 = [p1.next_lora_id() for _ in range(3)]
        assert ids1 == [1, 2, 3] and p2.next_lora_id() == 1  # LoRA ids are per pool
    assert p1.closed and p2.closed and p1.engines() == [] and p2.engines() == []
    assert a.pool is None and a.llm is None and a.retired
    with pytest.raises(BackendError, match="EnginePool was closed"):
        p1.get("/no/such/model")


def test_users_are_open_backends_held_weakly():
    with EnginePool() as pool:
        eng = pool.get("/no/such/model", keep=True)
        b1, b2 = FakeBackend(eng), FakeBackend(eng)
        assert eng.users == 2
        b1.close()
        assert eng.users == 1 and eng in pool.engines()  # kept: prepared engines survive their users
        del b2  # dropped without close(): no user any more, no __del__ needed
        gc.collect()
        assert eng.users == 0
        eng.keep = False
        b3 = FakeBackend(eng)
        b3.close()  # last open user of an unprepared engine: closed and dropped from the pool
        assert eng not in pool.engines()
    assert not hasattr(hv.VLLMBackend, "__del__")


def test_default_pool_is_explicit_and_closed_by_its_owner():
    close_default_pool()
    p = default_pool()
    assert default_pool() is p and hv.engines() == p.engines()
    eng = hv.get_engine("/no/such/model")
    assert eng.pool is p and eng in hv.engines()
    close_default_pool()
    assert p.closed and p.engines() == []
    assert default_pool() is not p  # a new one on the next use
    close_default_pool()


def test_harness_close_backends_closes_the_default_pool():
    from harness_merge.harness import close_backends

    p = default_pool()
    p.get("/no/such/model")
    close_backends()
    assert p.closed and p.engines() == []


def test_no_atexit_or_module_engine_state():
    import harness_merge.backends.vllm.backend as vb
    import harness_merge.backends.vllm.engine_pool as ve

    src = "".join(Path(m.__file__).read_text() for m in (vb, ve, hv))
    assert "atexit" not in src.replace("``atexit``", "")
    for name in ("_ENGINES", "_LOCK", "_LORA_IDS"):
        assert not hasattr(ve, name) and not hasattr(vb, name)


# --------------------------------------------------------------------------- shared helpers
@pytest.mark.parametrize(
    "req",
    [
        GenRequest(prompt="x", max_new_tokens=5, until=("\n", "")),
        GenRequest(prompt="x", temperature=0.7, do_sample=False),  # do_sample False: greedy
        GenRequest(prompt="x", temperature=0.0, do_sample=True),  # temperature 0: greedy
        GenRequest(prompt="x", temperature=0.7, do_sample=True, top_p=0.9),
        GenRequest(prompt="x", temperature=0.5, do_sample=True),
    ],
)
def test_both_backends_translate_a_request_alike(req):
    from harness_merge.backends.hf import gen_kwargs

    sp = sampling(req, 16)
    hf = gen_kwargs(sp.greedy, sp.temperature, sp.top_p)
    vl = hv.sampling_kwargs(sp)
    greedy = not (req.do_sample and req.temperature > 0)
    assert sp.greedy is greedy
    assert (hf["do_sample"] is False) == greedy == (vl["temperature"] == 0.0)
    if not greedy:
        assert hf["temperature"] == vl["temperature"] == req.temperature
        assert (hf["top_p"] or 1.0) == vl["top_p"] == (req.top_p or 1.0)
    assert vl["max_tokens"] == (req.max_new_tokens or 16)
    assert vl["stop"] == ([s for s in req.until if s] or None)


def test_dtype_names():
    assert [dtype_name(d) for d in ("auto", None, "fp32", "bf16", "half", "float16")] == [
        "auto",
        "auto",
        "float32",
        "bfloat16",
        "float16",
        "float16",
    ]
    import torch

    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(BackendError, match="dtype must be auto, float32"):
        dtype_name("int8")
    assert hv.engines.__module__ == "harness_merge.backends.vllm"
    from harness_merge.backends.vllm.engine_pool import engine_opts

    assert engine_opts({"dtype": "bf16"})["dtype"] == "bfloat16" and "dtype" not in engine_opts(
        {"dtype": "auto"}
    )


# --------------------------------------------------------------------------- LLaVA compat copy
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "llava")


def test_compat_copy_published_through_the_merge_cache(llava, tmp_path):
    from safetensors import safe_open

    from harness_merge.artifact.cache import MANIFEST, MergeCache

    root = tmp_path / "cache"
    out = Path(hv.vllm_model_dir(llava, cache_dir=root))
    assert out.parent == root / "merges" and out != Path(llava)
    cache = MergeCache(root)
    assert cache.check(out.name) == ("ok", None)  # sealed, recorded, verified
    assert json.loads((out / MANIFEST).read_text())["source"] == str(llava)
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert not any(k.startswith("vision_tower.") and ".vision_model." not in k for k in keys)
    with safe_open(str(next(Path(llava).glob("*.safetensors"))), "pt") as f:
        n_src = len(list(f.keys()))
    assert len(keys) == n_src
    assert Path(hv.vllm_model_dir(llava, cache_dir=root)) == out  # a hit
    # a damaged entry is moved aside and rebuilt, never served
    shard = next(out.glob("*.safetensors"))
    os.chmod(shard, 0o644)
    shard.write_bytes(b"\0" * shard.stat().st_size)
    again = Path(hv.vllm_model_dir(llava, cache_dir=root))
    assert again == out and cache.check(out.name) == ("ok", None)
    assert any((root / "damaged").iterdir())
    # the default root is the merge cache's (HARNESS_MERGE_CACHE), the package's one cache root
    os.environ["HARNESS_MERGE_CACHE"] = str(tmp_path / "env_cache")
    try:
        assert Path(hv.vllm_model_dir(llava)).parent == tmp_path / "env_cache" / "merges"
    finally:
        os.environ.pop("HARNESS_MERGE_CACHE")


def test_compat_copy_not_made_for_other_models(tmp_path):
    from harness_merge.demo.tiny import build_tiny_qwen2vl

    q = build_tiny_qwen2vl(tmp_path / "qvl")
    assert hv.vllm_model_dir(q, cache_dir=tmp_path / "c") == str(q)
    assert not (tmp_path / "c").exists()
    assert hv.vllm_model_dir("org/hub-id") == "org/hub-id"


def test_inspect_lora_flags_dora(tmp_path):
    from harness_merge.demo.tiny import build_tiny_qwen2vl, random_dora, random_lora

    base = build_tiny_qwen2vl(tmp_path / "qvl")
    d = hv.inspect_lora(random_dora(base, tmp_path / "dora", rank=4, alpha=8, seed=1))
    lo = hv.inspect_lora(random_lora(base, tmp_path / "lora", rank=4, alpha=8, seed=1))
    assert d.dora and not lo.dora and d.rank == lo.rank == 4
    with pytest.raises(BackendError, match="no adapter_config.json"):
        hv.inspect_lora(tmp_path)


def test_internvl_without_video_processor_refused_before_vllm(tmp_path):
    from harness_merge.backends import load_backend
    from harness_merge.demo.tiny import build_tiny_internvl

    base = build_tiny_internvl(tmp_path / "ivl")
    with pytest.raises(BackendError, match="no video_preprocessor_config.json"):
        load_backend("vllm", None, str(base))
    full = SimpleNamespace(kind="full", path=base)
    with pytest.raises(BackendError, match=r"cannot serve .*ivl.*InternVLVideoProcessor"):
        load_backend("vllm", full, str(base))
