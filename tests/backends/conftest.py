"""Fixtures for the vLLM backend tests (run in .venv-vllm; see scripts/test_vllm.sh).

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: seconds to start
instead of a minute on CPU) with 1 GiB of KV cache, float32 (tokens then match
transformers exactly). Tiny offline models from ``harness_merge.demo.tiny``;
the LM head is re-initialised with std 0.5 so greedy top-1/top-2 margins are
far above float32 noise (see notes/vllm_cpu.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOWER_TARGETS = ("attn.qkv", "attn.proj", "fc1")  # only in Qwen2-VL's vision blocks


def _wide_head(model) -> None:
    import torch

    with torch.no_grad():
        torch.manual_seed(123)
        model.get_output_embeddings().weight.normal_(0.0, 0.5)


def build_qwen2vl(out: Path) -> Path:
    from harness_merge.demo.tiny import new_tiny_qwen2vl, save_model

    model, proc = new_tiny_qwen2vl(seed=0)
    _wide_head(model)
    return save_model(model, proc, out)


def build_llava(out: Path) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration

    from harness_merge.demo.tiny import (
        _generation_config,
        build_llava_processor,
        build_tokenizer,
        save_model,
        tiny_llava_config,
    )

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(tok)).eval()
    model.generation_config = _generation_config(tok)
    _wide_head(model)
    return save_model(model, build_llava_processor(tok), out)


def build_text_lm(out: Path) -> Path:
    import torch
    from transformers import Qwen2ForCausalLM

    from harness_merge.demo.tiny import (
        _generation_config,
        build_tokenizer,
        save_model,
        tiny_text_config,
    )

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_text_config(tok)).eval()
    model.generation_config = _generation_config(tok)
    _wide_head(model)
    return save_model(model, tok, out)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm_backend")


@pytest.fixture(scope="session", autouse=True)
def _merge_cache_root(work):
    """The package's one cache root (merges, vLLM compat copies) in the test's
    temp folder, for this process and the harness subprocesses it starts."""
    old = os.environ.get("HARNESS_MERGE_CACHE")
    os.environ["HARNESS_MERGE_CACHE"] = str(work / "hm_cache")
    yield
    if old is None:
        os.environ.pop("HARNESS_MERGE_CACHE", None)
    else:
        os.environ["HARNESS_MERGE_CACHE"] = old


@pytest.fixture(scope="session")
def vl(work):
    """Tiny Qwen2-VL: base, two LM adapters (rank 4, all 7 LM linears), one
    vision-tower adapter, and the copa merge of the two LM adapters as a
    "lora" and as a "full" artifact."""
    from harness_merge.api import MergeSpec, merge
    from harness_merge.demo.tiny import random_lora

    base = build_qwen2vl(work / "qwen2vl")
    ads = [
        random_lora(base, work / f"lm_lora{i}", rank=4, alpha=8, seed=i, std=2.0, targets=LM_TARGETS)
        for i in (1, 2)
    ]
    tower = random_lora(base, work / "tower_lora", rank=8, alpha=16, seed=3, std=2.0, targets=TOWER_TARGETS)
    spec = {"adapters": tuple(str(a) for a in ads), "method": "copa", "base": str(base)}
    cache = work / "merge_cache"
    lora = merge(MergeSpec(**spec, format="lora"), cache_dir=cache, progress=False)
    full = merge(MergeSpec(**spec, format="full"), cache_dir=cache, progress=False)
    assert lora.kind == "lora" and full.kind == "full"
    return {
        "base": str(base),
        "adapters": [Path(a) for a in ads],
        "tower": Path(tower),
        "lora": lora,
        "full": full,
        "cache": cache,
    }


@pytest.fixture(scope="session")
def images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ims = [Image.new("RGB", (56, 56), c) for c in [(200, 30, 30), (30, 200, 30)]]
    ims.append(Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)))
    ims.append(Image.fromarray(rng.integers(0, 255, (84, 56, 3), dtype=np.uint8)))
    return ims
