"""The one fit check (``inputs.fit``), run by ``api.merge`` for every caller.

Exact module names, as PEFT loads adapters: the old suffix match of
``backends.hf.check_lora_fits`` let through adapters whose keys PEFT does not
load (checked here against PEFT itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness_merge.api import MergeSpec, merge
from harness_merge.errors import InputError
from harness_merge.inputs import open_inputs
from harness_merge.inputs.fit import check_lora_fits


@pytest.fixture(scope="module")
def vl_and_text(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_qwen2vl, build_tiny_text_lm, random_lora

    d = tmp_path_factory.mktemp("fit")
    vl = Path(build_tiny_qwen2vl(d / "qwen2vl", seed=0))
    text = Path(build_tiny_text_lm(d / "text", seed=0))
    text_ad = Path(random_lora(text, d / "text_ad", rank=4, alpha=8, seed=1))
    vl_ad = Path(random_lora(vl, d / "vl_ad", rank=4, alpha=8, seed=2))
    return vl, text, text_ad, vl_ad


def test_other_key_layout_is_refused_because_peft_would_not_load_it(vl_and_text):
    """A text LM adapter (``model.layers.*``) on Qwen2-VL (``model.language_model.layers.*``):
    every module has a base module with the same suffix and shape, but PEFT leaves
    the adapter's weights unloaded (lora_B stays zero): the check refuses it and
    points at the base's module."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    vl, _, text_ad, _ = vl_and_text
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vl), text_ad)
    saved = load_file(str(text_ad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert saved[key].abs().sum() > 0
    loaded = dict(peft.named_modules())["base_model.model.model.language_model.layers.0.self_attn.q_proj"]
    assert torch.count_nonzero(loaded.lora_B["default"].weight) == 0  # PEFT did not load it
    with pytest.raises(InputError) as e:
        check_lora_fits(open_inputs([str(text_ad)]), str(vl))
    msg = str(e.value)
    assert msg.startswith(f"{text_ad}: module model.layers.0.self_attn.q_proj does not exist in the base")
    assert "model.language_model.layers.0.self_attn.q_proj" in msg and "does not have" in msg


def test_merge_runs_the_fit_check_for_lora_output_and_writes_nothing(vl_and_text, tmp_path):
    vl, text, text_ad, vl_ad = vl_and_text
    with pytest.raises(
        InputError, match=rf"{vl_ad}: module model\.language_model\..* does not exist in the base"
    ):
        merge(
            MergeSpec(adapters=(str(vl_ad),), method="ta", base=str(text), format="lora"),
            cache_dir=tmp_path / "cache",
            out=tmp_path / "o",
            progress=False,
        )
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "cache" / "merges").glob("*"))
    art = merge(  # the fitting adapter on its own base passes
        MergeSpec(adapters=(str(vl_ad),), method="ta", base=str(vl), format="lora"),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert art.kind == "lora"


def test_shape_mismatch_names_adapter_module_and_both_shapes(vl_and_text, tmp_path):
    from transformers import AutoConfig, Qwen2ForCausalLM

    from harness_merge.demo.tiny import random_lora

    _, text, _, _ = vl_and_text
    cfg = AutoConfig.from_pretrained(text)
    cfg.hidden_size, cfg.intermediate_size = 96, 128
    wide = tmp_path / "wide"
    Qwen2ForCausalLM(cfg).save_pretrained(wide)
    ad = random_lora(wide, tmp_path / "wide_ad", rank=2, alpha=4, seed=0)
    with pytest.raises(InputError) as e:
        merge(MergeSpec(adapters=(str(ad),), method="ta", base=str(text)), use_cache=False, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{ad}: shape mismatch at model.layers.0.self_attn.q_proj")
    assert "[96, 96]" in msg and "[64, 64]" in msg and f"base model {text}" in msg


def test_unreadable_base_config_is_an_error_naming_the_base(vl_and_text, tmp_path):
    _, _, _, vl_ad = vl_and_text
    bad = tmp_path / "bad_base"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=rf"{bad}: cannot read the base model's config"):
        check_lora_fits(open_inputs([str(vl_ad)]), str(bad))
