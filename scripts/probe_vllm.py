#!/usr/bin/env python
"""Probe the installed vLLM for the facts behind the vLLM backend's refusals and
fallbacks, which the tests do not check (they test our side: that we refuse or
fall back before vLLM is reached). Rerun after a vLLM upgrade; a fact that no
longer holds means a refusal / fallback in ``harness_merge/backends/vllm/`` can go.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python scripts/probe_vllm.py [--json OUT]

Facts (each printed HOLDS / CHANGED; exit status 0 either way, 1 if the probe broke):
  * dora:      vLLM refuses a PEFT DoRA adapter (-> DoRA merges are served as full weights)
  * internvl:  ``InternVLForConditionalGeneration`` is in vLLM's model registry (-> served)
  * rank:      an adapter above ``max_lora_rank`` fails at its request (-> refused up front)
  * llava_lora: a LoRA on a LLaVA base fails on an image request (-> LoRA on LLaVA refused)
Tiny offline models from ``harness_merge.demo.tiny`` (the tests' builders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(k, "1")

FACTS: dict[str, dict] = {}


def fact(name: str, holds: bool, detail: str) -> None:
    FACTS[name] = {"holds": bool(holds), "detail": detail}
    print(f"{'HOLDS  ' if holds else 'CHANGED'} {name}: {detail}", flush=True)


def _llm(model: str, **kw):
    from vllm import LLM

    kw.setdefault("distributed_executor_backend", "uni")
    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, **kw)


def _close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass


def probe_dora(root: Path) -> None:
    from vllm.lora.peft_helper import PEFTHelper

    from harness_merge.demo.tiny import build_tiny_qwen2vl, random_dora

    base = build_tiny_qwen2vl(root / "qvl")
    d = random_dora(base, root / "dora", rank=4, alpha=8, seed=1)
    cfg = json.loads((Path(d) / "adapter_config.json").read_text())
    try:
        PEFTHelper.from_dict(cfg).validate_legal(SimpleLoRAConfig())
        fact("dora", False, "PEFTHelper accepted use_dora=true: try serving DoRA as a LoRA")
    except ValueError as e:
        fact("dora", "DoRA" in str(e), f"refused: {str(e).strip()[:160]}")


class SimpleLoRAConfig:
    """What ``PEFTHelper.validate_legal`` reads of a LoRAConfig."""

    max_lora_rank = 512
    lora_dtype = "auto"


def probe_internvl() -> None:
    from vllm.model_executor.models.registry import ModelRegistry

    archs = set(ModelRegistry.get_supported_archs())
    fact(
        "internvl",
        "InternVLForConditionalGeneration" in archs,
        "InternVLForConditionalGeneration in registry",
    )


def probe_rank(root: Path) -> None:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from harness_merge.demo.tiny import build_tiny_text_lm, random_lora

    base = build_tiny_text_lm(root / "lm")
    ad = random_lora(base, root / "r16", rank=16, alpha=16, seed=2, targets=("q_proj", "v_proj"))
    llm = _llm(str(base), enable_lora=True, max_lora_rank=8)
    try:
        llm.generate(["hello"], SamplingParams(max_tokens=2), lora_request=LoRARequest("r16", 1, str(ad)))
        fact("rank", False, "a rank-16 adapter served with max_lora_rank=8")
    except Exception as e:  # noqa: BLE001
        fact(
            "rank",
            True,
            f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}",
        )
    finally:
        _close(llm)


def probe_llava_lora(root: Path) -> None:
    from PIL import Image
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from harness_merge.backends._common import load_processor
    from harness_merge.backends.vllm import vllm_model_dir
    from harness_merge.demo.tiny import build_tiny_llava, random_lora

    base = build_tiny_llava(root / "llava")
    ad = random_lora(base, root / "llava_lora", rank=8, alpha=16, seed=3, targets=("q_proj", "v_proj"))
    served = vllm_model_dir(base, cache_dir=root / "cache")
    proc, _ = load_processor(str(base))
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = {"prompt": text, "multi_modal_data": {"image": Image.new("RGB", (56, 56), (200, 30, 30))}}
    control = _llm(served, limit_mm_per_prompt={"image": 1})
    try:
        control.generate([prompt], SamplingParams(max_tokens=2))  # no LoRA engine: must serve (else BROKE)
    finally:
        _close(control)
    llm = _llm(served, enable_lora=True, max_lora_rank=8, limit_mm_per_prompt={"image": 1})
    try:
        llm.generate([prompt], SamplingParams(max_tokens=2), lora_request=LoRARequest("l", 1, str(ad)))
        fact("llava_lora", False, "LoRA on LLaVA served an image request: lift LORA_UNSUPPORTED_MODEL_TYPES")
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[-1][:160] if str(e).strip() else ""
        fact("llava_lora", True, f"{type(e).__name__}: {msg}")
    finally:
        _close(llm)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the facts to this file")
    args = ap.parse_args()
    import vllm

    print(f"vllm {vllm.__version__}", flush=True)
    broke = False
    with tempfile.TemporaryDirectory(prefix="probe_vllm_") as tmp:
        root = Path(tmp)
        for name, fn in (
            ("dora", lambda: probe_dora(root)),
            ("internvl", probe_internvl),
            ("rank", lambda: probe_rank(root)),
            ("llava_lora", lambda: probe_llava_lora(root)),
        ):
            try:
                fn()
            except Exception:  # noqa: BLE001
                broke = True
                print(f"BROKE   {name}: {traceback.format_exc().strip().splitlines()[-1]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"vllm": vllm.__version__, "facts": FACTS}, indent=1))
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
