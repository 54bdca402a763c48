"""LLaVA-repo checkpoints (adapter + non_lora_trainables.bin): names mapped to
llava-hf, LoRA merged by the method, projector averaged as the released code
does; checked against the formula written out on the raw files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness_merge.api import MergeSpec, merge
from harness_merge.errors import ArtifactError, InputError
from harness_merge.inputs import LlavaRepoSet, open_inputs

LLAVA_PROJ = {  # original LLaVA name -> llava-hf name, written out independently of KEY_MAP
    "mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
    "mm_projector.0.bias": "model.multi_modal_projector.linear_1.bias",
    "mm_projector.2.weight": "model.multi_modal_projector.linear_2.weight",
    "mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_llava, save_llava_repo_lora

    root = tmp_path_factory.mktemp("llava_repo")
    base = build_tiny_llava(root / "base", seed=0)
    ads = [
        save_llava_repo_lora(base, root / f"ck{i}", rank=4, alpha=8, seed=30 + i, std=1.0) for i in range(2)
    ]
    return base, ads


def load(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path)).eval()


def raw(ad):
    sd = torch.load(str(ad / "adapter_model.bin"), weights_only=True)
    nl = torch.load(str(ad / "non_lora_trainables.bin"), weights_only=True)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    return sd, nl, cfg["lora_alpha"] / cfg["r"]


def expected_state(base, ads, *, lam, average):
    """base + (mean or lam*sum) s_n B_n A_n on the mapped LM modules; projector = mean_n."""
    model = load(base)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    raws = [raw(a) for a in ads]
    for key in raws[0][0]:
        if not key.endswith("lora_A.weight"):
            continue
        mod = key[len("base_model.model.") : -len(".lora_A.weight")]
        assert mod.startswith("model.layers.")
        hf = "model.language_model." + mod[len("model.") :] + ".weight"
        deltas = [s * r[f"base_model.model.{mod}.lora_B.weight"] @ r[key] for r, _, s in raws]
        sd[hf] = sd[hf] + (sum(deltas) / len(deltas) if average else lam * sum(deltas))
    for orig, hf in LLAVA_PROJ.items():
        sd[hf] = sum(nl[f"base_model.model.model.{orig}"] for _, nl, _ in raws) / len(raws)
    return sd


def test_read_maps_names_to_llava_hf(llava):
    _, ads = llava
    inputs = open_inputs([str(a) for a in ads])
    assert isinstance(inputs, LlavaRepoSet)
    assert inputs.module_names and all(
        m.startswith("model.language_model.layers.") for m in inputs.module_names
    )
    assert inputs.non_lora_names == sorted(LLAVA_PROJ.values())
    w = inputs.read_non_lora("model.multi_modal_projector.linear_1.weight")
    nl = torch.load(str(ads[1] / "non_lora_trainables.bin"), weights_only=True)
    torch.testing.assert_close(w[1], nl["base_model.model.model.mm_projector.0.weight"])


@pytest.mark.parametrize(
    "method,kw", [("wa", {"lam": 1.0, "average": True}), ("ta", {"lam": 1.0, "average": False})]
)
def test_merge_writes_full_weights_with_averaged_projector(llava, tmp_path, method, kw):
    base, ads = llava
    art = merge(
        MergeSpec(adapters=tuple(map(str, ads)), method=method, base=str(base)),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert art.kind == "full"
    assert art.manifest["non_lora"]["layout"] == "llava_repo"
    got = load(art.path).state_dict()
    exp = expected_state(base, ads, lam=kw["lam"], average=kw["average"])
    base_sd = load(base).state_dict()
    for hf in LLAVA_PROJ.values():  # the projector is not the base's: it was merged
        assert not torch.allclose(got[hf], base_sd[hf])
    for k in exp:
        torch.testing.assert_close(got[k], exp[k], rtol=1e-5, atol=1e-5, msg=k)


def test_lora_format_refused(llava, tmp_path):
    base, ads = llava
    with pytest.raises(ArtifactError, match="mm_projector.*LoRA artifact cannot hold"):
        merge(
            MergeSpec(adapters=tuple(map(str, ads)), method="ta", base=str(base), format="lora"),
            cache_dir=tmp_path / "c",
            progress=False,
        )
    with pytest.raises(ArtifactError, match="--base"):
        merge(MergeSpec(adapters=tuple(map(str, ads)), method="ta"), cache_dir=tmp_path / "c", progress=False)


def test_unknown_non_lora_key_refused(llava, tmp_path):
    _, ads = llava
    d = shutil.copytree(ads[0], tmp_path / "ck")
    nl = torch.load(str(d / "non_lora_trainables.bin"), weights_only=True)
    nl["base_model.model.model.vision_resampler.w"] = torch.zeros(2)
    torch.save(nl, d / "non_lora_trainables.bin")
    with pytest.raises(InputError, match="vision_resampler.*no llava-hf counterpart"):
        open_inputs([str(d)])


def test_pickled_code_refused(llava, tmp_path):
    """weights_only=True: a non_lora_trainables.bin holding arbitrary objects is refused."""
    _, ads = llava
    d = shutil.copytree(ads[0], tmp_path / "ck")

    import argparse

    torch.save({"x": argparse.Namespace(a=1)}, d / "non_lora_trainables.bin")  # not on torch's allow-list
    with pytest.raises(InputError, match="weights_only=True"):
        open_inputs([str(d)])


def test_mixing_with_plain_peft_refused(llava, tmp_path):
    from harness_merge.demo.tiny import random_lora

    base, ads = llava
    plain = random_lora(base, tmp_path / "plain", rank=4, alpha=8, seed=1)
    with pytest.raises(InputError, match="LLaVA-repo checkpoints .* with plain PEFT"):
        open_inputs([str(ads[0]), str(plain)])
