"""The torch-free header reader (``harness_merge.inputs.headers``), checked
against safetensors' own reader and the PEFT model the adapter was made from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness_merge.errors import InputError
from harness_merge.inputs.headers import lora_header, read_safetensors_header

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def test_safetensors_header_matches_safe_open(tmp_path):
    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.float16),
        "b.weight": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2, 2, dtype=torch.float32),
        "i": torch.zeros(4, dtype=torch.int64),
    }
    f = tmp_path / "x.safetensors"
    save_file(tensors, str(f), metadata={"format": "pt"})
    head = read_safetensors_header(f)
    assert set(head) == set(tensors)  # __metadata__ left out
    with safe_open(str(f), framework="pt") as sf:
        for k in sf.keys():
            assert head[k].shape == tuple(sf.get_slice(k).get_shape())
            assert head[k].dtype == str(sf.get_tensor(k).dtype).removeprefix("torch.")


def test_truncated_or_garbled_header_names_the_file(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x00")
    with pytest.raises(
        InputError, match=r"short\.safetensors: cannot read weights \(not a readable safetensors file: 2-byte"
    ):
        read_safetensors_header(short)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(
        InputError,
        match=r"bad\.safetensors: cannot read weights \(not a readable safetensors file: header is not JSON",
    ):
        read_safetensors_header(bad)


def test_lora_header_matches_the_peft_model(tiny_base, make_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = make_adapter(
        tiny_base, tmp_path / "ad", r=4, alpha=8, rank_pattern={"down_proj": 2}, dtype=torch.bfloat16
    )
    h = lora_header(ad)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), ad)
    want = {}
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            plain = name.removeprefix("base_model.model.")
            want[plain] = (mod.base_layer.out_features, mod.base_layer.in_features, mod.r["default"])
    assert {m: (s.d_out, s.d_in, s.rank) for m, s in h.modules.items()} == want
    assert h.shapes() == {m: (o, i) for m, (o, i, _) in want.items()}
    assert h.rank == 4 and h.alpha == 8.0 and not h.use_dora and not h.has_magnitudes
    assert set(h.target_modules) == {"q_proj", "v_proj", "down_proj"}
    assert {h.tensors[k].dtype for k in (*h.a_keys.values(), *h.b_keys.values())} == {"bfloat16"}
    assert h.other == ()


def test_lora_header_sees_dora_magnitudes_and_other_keys(tmp_path):
    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True})
    )
    m = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{m}.lora_A.weight": torch.zeros(2, 6),
            f"{m}.lora_B.weight": torch.zeros(5, 2),
            f"{m}.lora_magnitude_vector": torch.ones(5),
            "base_model.model.lm_head.weight": torch.zeros(3, 6),
            "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": torch.zeros(2, 2, 2),
            "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight": torch.zeros(5, 2),
        },
        str(d / "adapter_model.safetensors"),
    )
    h = lora_header(d)
    q = "model.layers.0.self_attn.q_proj"
    assert h.use_dora and h.has_magnitudes and h.magnitude_keys == {q: f"{m}.lora_magnitude_vector"}
    assert h.tensors[h.magnitude_keys[q]].shape == (5,)
    assert h.other == ("base_model.model.lm_head.weight",)
    assert list(h.modules) == [q]  # the 3-D pair is not a Linear LoRA
    assert "only Linear LoRA" in h.bad_factor("model.layers.1.mlp.up_proj")


def test_listing_an_adapter_does_not_import_torch(adapters):
    code = (
        "import sys\n"
        "from harness_merge.inputs.headers import lora_header\n"
        f"h = lora_header({str(adapters[0])!r})\n"
        "assert h.modules and h.rank == 4, h\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "name,want",
    [
        ("fp16", torch.float16),
        ("BF16", torch.bfloat16),
        ("float32", torch.float32),
        ("torch.bfloat16", torch.bfloat16),
        ("fp32", torch.float32),
    ],
)
def test_one_dtype_table_serves_every_layer(name, want):
    from harness_merge import dtypes
    from harness_merge.artifact.writer import torch_dtype
    from harness_merge.backends.hf import _resolve_dtype

    assert dtypes.torch_dtype(name) is want
    assert torch_dtype(name) is want
    assert _resolve_dtype(name) is want


def test_unknown_dtype_errors_name_the_choices():
    from harness_merge.artifact.writer import torch_dtype
    from harness_merge.backends.base import BackendError
    from harness_merge.backends.hf import _resolve_dtype
    from harness_merge.errors import ArtifactError

    with pytest.raises(ArtifactError, match="dtype must be one of float32, float16, bfloat16, got 'int8'"):
        torch_dtype("int8")
    with pytest.raises(BackendError, match="dtype must be auto, float32, bfloat16 or float16"):
        _resolve_dtype("float64")
