"""Shared fixtures: a tiny Qwen2 base model and PEFT LoRA adapters made on it.

Everything is built locally (no hub): a 2-layer Qwen2 with hidden size 32, and
adapters created by PEFT itself with seeded random A and B. Below them, the
tiny served models of the harness and backend tests (Qwen2-VL and a text LM
from ``harness_merge.demo.tiny``, two adapters each, a shared merge cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny tensors: threads only wait on each other, and pytest runs 2 workers.
torch.set_num_threads(1)

TARGETS = ("q_proj", "v_proj", "down_proj")


def build_tiny_qwen2(out: Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(out)
    return out


def make_lora_adapter(
    base: Path,
    out: Path,
    *,
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    targets=TARGETS,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A PEFT LoRA adapter with seeded random A and B (B nonzero, unlike PEFT's init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def failures():
    """``harness.FAILURES`` (the errors a harness model reported in this
    process) as a test sees it: emptied before each test and restored after, so a
    test that provokes a refusal leaves nothing behind for one that asserts it empty."""
    from harness_merge import harness

    saved = list(harness.FAILURES)
    harness.FAILURES.clear()
    yield harness.FAILURES
    harness.FAILURES[:] = saved


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture(scope="session")
def adapters(tiny_base, tmp_path_factory) -> list[Path]:
    """Three rank-4 adapters, alpha 8, different seeds."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(tiny_base, root / f"ad{i}", seed=i) for i in range(3)]


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def make_adapter():
    """Factory fixture: ``make_adapter(base, out, **kw)`` (see make_lora_adapter)."""
    return make_lora_adapter


# ---------------------------------------------------------------------------
# tiny served models (harness and backend tests): built by harness_merge.demo.tiny
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hw(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("harness")


@pytest.fixture(scope="session")
def qwen2vl(hw):
    """(base, [adapter1, adapter2]) on a tiny Qwen2-VL."""
    from harness_merge.demo.tiny import build_tiny_qwen2vl, random_lora

    base = build_tiny_qwen2vl(hw / "qwen2vl", seed=0)
    ads = [random_lora(base, hw / f"qvl_lora{i}", rank=4, alpha=8, seed=i, std=2.0) for i in (1, 2)]
    return Path(base), [Path(a) for a in ads]


@pytest.fixture(scope="session")
def text_lm(hw):
    """(base, [adapter1, adapter2]) on a tiny text-only Qwen2."""
    from harness_merge.demo.tiny import build_tiny_text_lm, random_lora

    base = build_tiny_text_lm(hw / "textlm", seed=0)
    ads = [random_lora(base, hw / f"txt_lora{i}", rank=4, alpha=8, seed=i, std=2.0) for i in (1, 2)]
    return Path(base), [Path(a) for a in ads]


@pytest.fixture(scope="session")
def misfit_adapter(hw, text_lm):
    """A LoRA adapter made for the text LM: it does not fit the Qwen2-VL base
    (the module names differ)."""
    return text_lm[1][0]


@pytest.fixture(scope="session")
def merge_cache(hw) -> Path:
    p = hw / "merge_cache"
    p.mkdir(exist_ok=True)
    return p
