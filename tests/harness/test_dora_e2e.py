"""copa on DoRA adapters end to end through the real ``lmms_eval`` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import find_results
from .test_lmms_e2e import _explain, _lls, _lmms, _model_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen2vl_dora(hw, qwen2vl):
    """Two DoRA adapters on the tiny Qwen2-VL, and the same factors without the
    magnitudes (plain LoRA copies)."""
    from harness_merge.demo.tiny import random_dora

    base, _ = qwen2vl
    doras = [
        random_dora(base, hw / f"qvl_dora{i}", rank=4, alpha=8, seed=20 + i, std=2.0, magnitude_std=0.5)
        for i in (1, 2)
    ]
    plain = []
    for d in doras:
        p = shutil.copytree(d, hw / f"{Path(d).name}_as_lora")
        cfg = json.loads((p / "adapter_config.json").read_text())
        cfg["use_dora"] = False
        (p / "adapter_config.json").write_text(json.dumps(cfg))
        sd = load_file(str(p / "adapter_model.safetensors"))
        save_file({k: v for k, v in sd.items() if "magnitude" not in k}, str(p / "adapter_model.safetensors"))
        plain.append(p)
    return base, [Path(d) for d in doras], plain


def test_copa_on_dora_through_lmms_eval(run_cli, qwen2vl_dora, mm_tasks, merge_cache, hw):
    base, doras, plain = qwen2vl_dora
    out = hw / "lmms_dora_copa"
    p = _lmms(
        run_cli,
        _model_args(base, doras, "copa", cache_dir=merge_cache),
        "hm_pope_mini,hm_pope_mc_mini",
        mm_tasks,
        out,
    )
    assert p.returncode == 0, _explain(p)
    results, samples = find_results(out)
    merge = results["config"]["merge"]
    assert merge["manifest"]["method"] == "copa"
    assert merge["manifest"]["dora"]["peft_variant"] == "dora"
    assert merge["artifact"]["kind"] == "lora"
    art = Path(merge["artifact"]["path"])
    assert json.loads((art / "adapter_config.json").read_text())["use_dora"] is True
    # the served artifact holds the average of the inputs' magnitude vectors
    sd = load_file(str(art / "adapter_model.safetensors"))
    src = [load_file(str(d / "adapter_model.safetensors")) for d in doras]
    mk = [k for k in src[0] if k.endswith("lora_magnitude_vector")]
    assert mk and all(k in sd for k in mk)
    for k in mk:
        torch.testing.assert_close(sd[k].float(), (src[0][k].float() + src[1][k].float()) / 2)
    assert len(samples["hm_pope_mini"]) == 4

    # the same factors without magnitudes answer differently: the magnitudes were served
    out2 = hw / "lmms_dora_stripped"
    p2 = _lmms(
        run_cli, _model_args(base, plain, "copa", cache_dir=merge_cache), "hm_pope_mc_mini", mm_tasks, out2
    )
    assert p2.returncode == 0, _explain(p2)
    _, s2 = find_results(out2)
    ll1 = [v for s in sorted(samples["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    ll2 = [v for s in sorted(s2["hm_pope_mc_mini"], key=lambda s: s["doc_id"]) for v in _lls(s)]
    assert len(ll1) == len(ll2) > 0
    assert max(abs(a - b) for a, b in zip(ll1, ll2)) > 1e-3
