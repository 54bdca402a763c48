"""The LoRA reader against PEFT's own ``get_delta_weight`` (scale, rsLoRA, patterns)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness_merge.errors import InputError
from harness_merge.inputs import open_inputs


def peft_deltas(base, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight("default").detach()
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(r=4, alpha=8),
        dict(r=4, alpha=8, use_rslora=True),
        dict(r=4, alpha=16, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
    ],
)
def test_deltas_match_peft(tiny_base, tmp_path, kw, make_adapter):
    ad = make_adapter(tiny_base, tmp_path / "ad", seed=3, **kw)
    inputs = open_inputs([str(ad)])
    ref = peft_deltas(tiny_base, ad)
    assert sorted(ref) == sorted(inputs.module_names)
    for m in inputs.module_names:
        torch.testing.assert_close(inputs.read(m).lora[0].delta(), ref[m], rtol=1e-5, atol=1e-6)
    if "rank_pattern" in kw:
        assert inputs.ranks("model.layers.0.mlp.down_proj") == [2]


def test_bin_weights_are_read(tiny_base, tmp_path, make_adapter):
    ad = make_adapter(tiny_base, tmp_path / "ad", seed=1)
    sd = load_file(ad / "adapter_model.safetensors")
    (ad / "adapter_model.safetensors").unlink()
    torch.save(sd, ad / "adapter_model.bin")
    inputs = open_inputs([str(ad)])
    m = inputs.module_names[0]
    key = f"base_model.model.{m}.lora_A.weight"
    torch.testing.assert_close(inputs.read(m).lora[0].A, sd[key])


def _edit_config(ad, **changes):
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(changes)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def one_adapter(tiny_base, tmp_path, make_adapter):
    return make_adapter(tiny_base, tmp_path / "ad", seed=0)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="nope: no such folder"):
        open_inputs([str(tmp_path / "nope")])


def test_not_an_adapter(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "readme.txt").write_text("hi")
    with pytest.raises(InputError, match="not a PEFT adapter folder"):
        open_inputs([str(tmp_path / "x")])


def test_dora_refused(one_adapter):
    _edit_config(one_adapter, use_dora=True)
    with pytest.raises(InputError, match="DoRA adapter"):
        open_inputs([str(one_adapter)])


def test_other_peft_type_refused(one_adapter):
    _edit_config(one_adapter, peft_type="IA3")
    with pytest.raises(InputError, match="peft_type is 'IA3'; only LoRA"):
        open_inputs([str(one_adapter)])


def test_unreadable_config(one_adapter):
    (one_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(InputError, match="adapter_config.json: unreadable adapter config"):
        open_inputs([str(one_adapter)])


def test_missing_weights(one_adapter):
    (one_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="no adapter_model.safetensors or adapter_model.bin"):
        open_inputs([str(one_adapter)])


def test_nan_named_at_read(one_adapter):
    p = one_adapter / "adapter_model.safetensors"
    sd = load_file(p)
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, p)
    inputs = open_inputs([str(one_adapter)])
    module = key.split(".lora_B")[0].removeprefix("base_model.model.")
    with pytest.raises(InputError, match=rf"\[{module}\] lora_B: 1 NaN/Inf"):
        inputs.read(module)


def test_modules_disagree(tiny_base, tmp_path, make_adapter):
    a = make_adapter(tiny_base, tmp_path / "a", targets=("q_proj", "v_proj"))
    b = make_adapter(tiny_base, tmp_path / "b", targets=("q_proj",))
    with pytest.raises(InputError, match=r"b: target modules disagree: missing 2 module\(s\) of .*v_proj"):
        open_inputs([str(a), str(b)])


def test_shapes_disagree(tiny_base, tmp_path, make_adapter):
    a = make_adapter(tiny_base, tmp_path / "a", targets=("q_proj",))
    b = make_adapter(tiny_base, tmp_path / "b", targets=("q_proj",))
    p = b / "adapter_model.safetensors"
    sd = load_file(p)
    k = next(k for k in sd if "layers.0" in k and "lora_B" in k)
    sd[k] = torch.randn(sd[k].shape[0] + 1, sd[k].shape[1])
    save_file(sd, p)
    with pytest.raises(
        InputError, match=r"module model.layers.0.self_attn.q_proj: shape \(d_out, d_in\) = \(32, 32\)"
    ):
        open_inputs([str(a), str(b)])


def test_checked_float_stored_dtype_overflowing_sum_is_not_an_error():
    """float16 values whose sum overflows are finite: the exact check decides."""
    import torch

    from harness_merge.errors import InputError
    from harness_merge.inputs.files import checked_float

    x = torch.full((8, 8), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(x.sum())  # the fast check alone would refuse it
    out = checked_float(x, "here", stored_dtype=True)
    assert out.dtype == torch.float16 and torch.equal(out, x)
    assert checked_float(x, "here").dtype == torch.float32
    x[3, 3] = float("nan")
    with pytest.raises(InputError, match="here: 1 NaN/Inf"):
        checked_float(x, "here", stored_dtype=True)
