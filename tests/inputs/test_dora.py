"""DoRA adapters: reading, merging (direction via LoRA, magnitude averaged), and
the artifacts against PEFT's own DoRA model and the formula written out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness_merge.api import MergeSpec, merge
from harness_merge.errors import InputError
from harness_merge.inputs import DoRASet, LoRASet, open_inputs

TARGETS = ("q_proj", "v_proj", "down_proj")


def make_dora(base, out, *, seed, r=4, alpha=8, mag_noise=0.3):
    """A PEFT DoRA adapter: random A, B and magnitudes moved off PEFT's init."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0, use_dora=True),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + mag_noise * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def doras(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    return [make_dora(tiny_base, root / f"d{i}", seed=10 + i) for i in range(2)]


def ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def base_model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def peft_model(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(base), str(adapter)).eval()


def oracle_weights(base, adapter_dirs, *, lam=1.0, average=False):
    """``W = mean_n m_n * (W0 + dV) / ||W0 + dV||_row`` with ``dV`` the (averaged
    or lambda-summed) ``s_n B_n A_n``, from the raw files (not our reader)."""
    model = base_model(base)
    named = dict(model.named_modules())
    sds = [load_file(str(a / "adapter_model.safetensors")) for a in adapter_dirs]
    cfgs = [json.loads((a / "adapter_config.json").read_text()) for a in adapter_dirs]
    out = {}
    for key in sds[0]:
        if not key.endswith("lora_magnitude_vector"):
            continue
        mod = key[len("base_model.model.") : -len(".lora_magnitude_vector")]
        W0 = named[mod].weight.detach().float()
        deltas = [
            c["lora_alpha"]
            / c["r"]
            * sd[f"base_model.model.{mod}.lora_B.weight"]
            @ sd[f"base_model.model.{mod}.lora_A.weight"]
            for sd, c in zip(sds, cfgs)
        ]
        dV = sum(deltas) / len(deltas) if average else lam * sum(deltas)
        m = sum(sd[key] for sd in sds) / len(sds)
        V = W0 + dV
        out[mod] = m[:, None] * V / V.norm(dim=1, keepdim=True)
    return model, out


def test_dora_adapter_is_read_with_magnitudes(doras):
    inputs = open_inputs([str(d) for d in doras])
    assert isinstance(inputs, DoRASet) and inputs.kind == "lora"
    m = inputs.module_names[0]
    mags = inputs.read_magnitudes(m)
    sd = load_file(str(doras[1] / "adapter_model.safetensors"))
    torch.testing.assert_close(mags[1], sd[f"base_model.model.{m}.lora_magnitude_vector"])
    assert len(inputs.module_names) == 2 * len(TARGETS)


def test_plain_lora_still_a_lora_set(adapters):
    assert type(open_inputs([str(adapters[0])])) is LoRASet


def test_mixing_dora_and_lora_refused(doras, adapters):
    with pytest.raises(InputError, match="cannot merge DoRA adapters with plain LoRA"):
        open_inputs([str(doras[0]), str(adapters[0])])


def test_dora_without_magnitudes_refused(doras, tmp_path):
    import shutil

    d = shutil.copytree(doras[0], tmp_path / "d")
    sd = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "magnitude" not in k}, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="DoRA adapter .*without lora_magnitude_vector"):
        open_inputs([str(d)])


def test_dora_magnitude_shape_checked(doras, tmp_path):
    import shutil

    d = shutil.copytree(doras[0], tmp_path / "d")
    sd = load_file(str(d / "adapter_model.safetensors"))
    k = next(k for k in sd if k.endswith("lora_magnitude_vector"))
    sd[k] = sd[k][:-1].clone()
    save_file(sd, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="lora_magnitude_vector has shape"):
        open_inputs([str(d)])


@pytest.mark.parametrize("method", ["ta", "wa"])
def test_one_dora_adapter_merge_equals_peft_dora(tiny_base, doras, tmp_path, method):
    """A merge of one DoRA adapter (identity methods) reloads in PEFT as DoRA
    and gives PEFT's own DoRA model outputs; as full weights too."""
    ref = peft_model(tiny_base, doras[0])
    ref_logits = logits(ref)
    # the test means something: the magnitudes change the outputs
    from peft import PeftModel

    cfg = json.loads((doras[0] / "adapter_config.json").read_text())
    assert cfg["use_dora"]
    art = merge(MergeSpec(adapters=(str(doras[0]),), method=method), cache_dir=tmp_path / "c", progress=False)
    assert art.kind == "lora" and art.manifest["dora"]["peft_variant"] == "dora"
    out_cfg = json.loads((art.path / "adapter_config.json").read_text())
    assert out_cfg["use_dora"] is True
    got = PeftModel.from_pretrained(base_model(tiny_base), str(art.path)).eval()
    torch.testing.assert_close(logits(got), ref_logits, rtol=1e-4, atol=1e-4)

    full = merge(
        MergeSpec(adapters=(str(doras[0]),), method=method, base=str(tiny_base), format="full"),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert full.kind == "full"
    merged_by_peft = peft_model(tiny_base, doras[0]).merge_and_unload()
    torch.testing.assert_close(logits(base_model(full.path)), ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(merged_by_peft), ref_logits, rtol=1e-4, atol=1e-4)


def test_magnitude_matters(tiny_base, doras, tmp_path):
    """Dropping the magnitudes (reading the adapter as plain LoRA) changes the
    outputs: the equality above could not hold if they were ignored."""
    import shutil

    d = shutil.copytree(doras[0], tmp_path / "plain")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "magnitude" not in k}, str(d / "adapter_model.safetensors"))
    assert not torch.allclose(
        logits(peft_model(tiny_base, d)), logits(peft_model(tiny_base, doras[0])), atol=1e-3
    )


def test_two_dora_full_weights_match_formula(tiny_base, doras, tmp_path):
    art = merge(
        MergeSpec(adapters=tuple(map(str, doras)), method="wa", base=str(tiny_base), format="full"),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    merged = base_model(art.path)
    model, expected = oracle_weights(tiny_base, doras, average=True)
    named = dict(merged.named_modules())
    for mod, W in expected.items():
        torch.testing.assert_close(named[mod].weight.detach(), W, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for mod, W in expected.items():
            dict(model.named_modules())[mod].weight.copy_(W)
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-4, atol=1e-4)


def test_two_dora_lora_artifact_has_mean_magnitude_and_matches_formula(tiny_base, doras, tmp_path):
    from peft import PeftModel

    art = merge(
        MergeSpec(adapters=tuple(map(str, doras)), method="ta", params={"scaling": "0.7"}),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    sd = load_file(str(art.path / "adapter_model.safetensors"))
    src = [load_file(str(d / "adapter_model.safetensors")) for d in doras]
    mk = [k for k in sd if k.endswith("lora_magnitude_vector")]
    assert len(mk) == 2 * len(TARGETS)
    for k in mk:
        torch.testing.assert_close(sd[k], (src[0][k] + src[1][k]) / 2)
    model, expected = oracle_weights(tiny_base, doras, lam=0.7)
    with torch.no_grad():
        for mod, W in expected.items():
            dict(model.named_modules())[mod].weight.copy_(W)
    got = PeftModel.from_pretrained(base_model(tiny_base), str(art.path)).eval()
    torch.testing.assert_close(logits(got), logits(model), rtol=1e-4, atol=1e-4)


def test_copa_on_dora_runs_and_keeps_magnitudes(tiny_base, doras, tmp_path):
    art = merge(
        MergeSpec(adapters=tuple(map(str, doras)), method="copa"), cache_dir=tmp_path / "c", progress=False
    )
    assert art.kind == "lora" and art.manifest["method"] == "copa" and "dora" in art.manifest
    assert json.loads((art.path / "adapter_config.json").read_text())["use_dora"] is True
    assert any(
        k.endswith("lora_magnitude_vector") for k in load_file(str(art.path / "adapter_model.safetensors"))
    )


def test_vllm_gets_full_weights_for_dora(doras, adapters, tiny_base):
    """vLLM has no DoRA: with backend=vllm and format=auto the harness asks for full weights."""
    from harness_merge.harness import _dora_for_backend

    spec = MergeSpec(adapters=tuple(map(str, doras)), method="ta", base=str(tiny_base))
    assert _dora_for_backend(spec, "vllm").format == "full"
    assert _dora_for_backend(spec, "hf").format == "auto"
    plain = MergeSpec(adapters=(str(adapters[0]),), method="ta", base=str(tiny_base))
    assert _dora_for_backend(plain, "vllm").format == "auto"
    explicit = MergeSpec(adapters=tuple(map(str, doras)), method="ta", base=str(tiny_base), format="lora")
    assert _dora_for_backend(explicit, "vllm").format == "lora"
