"""Tiny offline builders: they load back with transformers and run on an image."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from harness_merge.demo import tiny


def test_tokenizer_encodes_any_text_and_has_the_specials():
    tok = tiny.build_tokenizer()
    assert len(tok) == 263
    text = "héllo, wörld ✓ 42"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS)) == list(range(256, 263))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2vl_loads_and_answers_an_image(qwen2vl_dir):
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    cfg = AutoConfig.from_pretrained(qwen2vl_dir)
    tc = cfg.text_config
    assert tc.hidden_size // tc.num_attention_heads == 32  # vLLM CPU attention head sizes
    assert sum(tc.rope_parameters["mrope_section"]) == 16
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen2vl_dir).eval()
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 5e5
    proc = tiny.load_processor(qwen2vl_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[Image.new("RGB", (56, 56), (200, 10, 10))], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == 4  # 16 patches merged 2x2
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_qwen2vl_folder_names_the_standard_processor(qwen2vl_dir):
    pc = json.loads((qwen2vl_dir / "processor_config.json").read_text())
    assert pc["processor_class"] == "Qwen2VLProcessor"  # AutoProcessor / vLLM where torchvision imports
    assert pc["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"


def test_llava_loads_and_answers_an_image(llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    proc = AutoProcessor.from_pretrained(llava_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[Image.new("RGB", (56, 56), (0, 0, 200))], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_text_lm_loads(text_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(text_lm_dir)
    tok = AutoTokenizer.from_pretrained(text_lm_dir)
    logits = model(**tok(["The cat sat"], return_tensors="pt")).logits
    assert logits.shape[-1] >= len(tok)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_random_lora_loads_in_peft_and_changes_logits(qwen2vl_dir, tmp_path, use_rslora):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    ad = tiny.random_lora(qwen2vl_dir, tmp_path / "ad", rank=4, alpha=8, use_rslora=use_rslora, seed=1)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, use_rslora)
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    base = Qwen2VLForConditionalGeneration.from_pretrained(qwen2vl_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        pm = PeftModel.from_pretrained(base, ad).eval()
        after = pm(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    b_weights = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert b_weights and all(float(p.abs().sum()) > 0 for p in b_weights)


def test_random_lora_on_text_lm(text_lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = tiny.random_lora(text_lm_dir, tmp_path / "ad", rank=2, alpha=4)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(text_lm_dir), ad)
    assert any("lora_A" in n for n, _ in model.named_parameters())
