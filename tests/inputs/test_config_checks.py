"""Inputs that used to pass silently: a config rank that disagrees with the
tensors (PEFT refuses such an adapter), differing base models, mixed dtypes."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from harness_merge.api import MergeSpec, merge
from harness_merge.errors import InputError
from harness_merge.inputs import open_inputs


def _set_config(ad, **kv):
    p = ad / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kv)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change,module,cfg_rank,src",
    [
        ({"r": 8}, "model.layers.0.mlp.down_proj", 8, "r"),
        ({"rank_pattern": {"v_proj": 2}}, "model.layers.0.self_attn.v_proj", 2, "rank_pattern"),
    ],
)
def test_config_rank_disagreeing_with_tensors_is_refused(change, module, cfg_rank, src, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = tmp_path / "ad"
    shutil.copytree(adapters[0], ad)
    _set_config(ad, **change)
    with pytest.raises(InputError) as ei:
        open_inputs([str(ad), str(adapters[1])])
    msg = str(ei.value)
    assert str(ad / "adapter_config.json") in msg and f"{src} = {cfg_rank}" in msg and "have rank 4" in msg
    assert "model.layers." in msg and ("v_proj" in msg if src == "rank_pattern" else True)
    # Independent fact: PEFT itself refuses to load this adapter.
    base = json.loads((adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ad)


def test_rank_pattern_that_matches_is_accepted(tiny_base, tmp_path, make_adapter):
    ad = make_adapter(tiny_base, tmp_path / "ad", r=4, rank_pattern={"down_proj": 2})
    inputs = open_inputs([str(ad)])
    assert inputs.ranks("model.layers.1.mlp.down_proj") == [2] and inputs.ranks(
        "model.layers.1.self_attn.q_proj"
    ) == [4]


def test_differing_bases_warn(adapters, tmp_path, caplog):
    ad = tmp_path / "ad"
    shutil.copytree(adapters[1], ad)
    _set_config(ad, base_model_name_or_path="some/other-base")
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        open_inputs([str(adapters[0]), str(ad)])
    msgs = [r.getMessage() for r in caplog.records if "different base models" in r.getMessage()]
    assert len(msgs) == 1 and "some/other-base" in msgs[0] and str(ad) in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        open_inputs([str(a) for a in adapters])
    assert not [r for r in caplog.records if "different base models" in r.getMessage()]


def test_mixed_dtypes_write_float32_with_a_warning(tiny_base, adapters, tmp_path, make_adapter, caplog):
    bf = make_adapter(tiny_base, tmp_path / "bf16", seed=7, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        art = merge(
            MergeSpec(adapters=(str(adapters[0]), str(bf)), method="ta"),
            use_cache=False,
            out=tmp_path / "o",
            progress=False,
        )
    assert any("mix dtypes" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    assert art.manifest["dtype"] == "float32"
    sd = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.float32}
    # Oracle: the float32 sum of both deltas (the bf16 factors exactly upcast).
    a32, b16 = (
        load_file(adapters[0] / "adapter_model.safetensors"),
        load_file(bf / "adapter_model.safetensors"),
    )
    m = "model.layers.0.self_attn.q_proj"
    k = f"base_model.model.{m}"

    def delta(sd_, scale):
        return scale * sd_[f"{k}.lora_B.weight"].float() @ sd_[f"{k}.lora_A.weight"].float()

    want = delta(a32, 8 / 4) + delta(b16, 8 / 4)
    got = sd[f"{k}.lora_B.weight"] @ sd[f"{k}.lora_A.weight"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # One dtype: no warning, that dtype.
    caplog.clear()
    bf2 = make_adapter(tiny_base, tmp_path / "bf16b", seed=8, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        assert open_inputs([str(bf), str(bf2)]).weight_dtype() == "bfloat16"
    assert not [r for r in caplog.records if "mix dtypes" in r.getMessage()]


def test_checkpoint_dtype_differing_from_base_warns(tiny_base, tmp_path, caplog):
    from safetensors.torch import save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_base, ck)
    sd = load_file(tiny_base / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16) for k, v in sd.items()}, ck / "model.safetensors", metadata={"format": "pt"}
    )
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        inputs = open_inputs([str(ck)], base=str(tiny_base))
    msgs = [r.getMessage() for r in caplog.records if "checkpoint dtypes differ" in r.getMessage()]
    assert len(msgs) == 1 and str(ck) in msgs[0] and "bfloat16 vs float32" in msgs[0]
    assert inputs.weight_dtype() == "float32"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        open_inputs([str(tiny_base)], base=str(tiny_base))
    assert not [r for r in caplog.records if "checkpoint dtypes differ" in r.getMessage()]
