"""The changed defaults through the whole pipeline (inputs -> driver -> artifact)
on the tiny model: they run, move the model, and pcb's model scope equals the
released PCB_merge on the flattened checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from harness_merge.api import MergeSpec, merge
from harness_merge.inputs import open_inputs

from .test_pcb import _released_pcb


def _state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _checkpoints(tiny_base, adapters, root):
    import shutil

    from safetensors.torch import save_file

    inputs = open_inputs([str(a) for a in adapters])
    sd0 = load_file(tiny_base / "model.safetensors")
    out = []
    for i in range(len(adapters)):
        d = root / f"ck{i}"
        shutil.copytree(tiny_base, d)
        sd = dict(sd0)
        for m in inputs.module_names:
            sd[f"{m}.weight"] = sd0[f"{m}.weight"] + inputs.read(m).deltas()[i]
        save_file(sd, d / "model.safetensors")
        out.append(d)
    return out


@pytest.mark.parametrize("method", ["copa", "dare_ties", "pcb", "tsv", "iso_c", "iso_cts", "wudi", "wudi2"])
def test_changed_defaults_merge_lora_adapters(method, tiny_base, adapters, tmp_path):
    params = {"iterations": "5"} if method.startswith("wudi") else {}
    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method=method, params=params, base=str(tiny_base)),
        use_cache=False,
        out=tmp_path / "o",
        progress=False,
    )
    assert art.manifest["params"]["nonlinear"] == "average"
    merged = _state(art.path) if art.kind == "full" else None
    if merged is not None:
        base = _state(tiny_base)
        moved = [k for k in merged if not torch.equal(merged[k], base[k])]
        assert moved and all(torch.isfinite(merged[k]).all() for k in moved)


def test_pcb_default_on_checkpoints_is_released_code_on_the_flattened_model(tiny_base, adapters, tmp_path):
    cks = _checkpoints(tiny_base, adapters, tmp_path)
    art = merge(
        MergeSpec(adapters=tuple(map(str, cks)), method="pcb", base=str(tiny_base)),
        use_cache=False,
        out=tmp_path / "o",
        progress=False,
    )
    inputs = open_inputs([str(c) for c in cks], base=str(tiny_base))
    names = [n for n in inputs.module_names if inputs.is_matrix(n)]  # what the method runs on
    tvs = {n: inputs.read(n).task_vectors for n in names}
    flat = torch.cat([torch.stack([t.reshape(-1) for t in tvs[n]]) for n in names], dim=1)
    ref = _released_pcb(flat, pcb_ratio=0.1)
    base, merged = _state(tiny_base), _state(art.path)
    off = 0
    for n in names:
        size = tvs[n][0].numel()
        expected = base[n] + ref[off : off + size].reshape(base[n].shape)
        off += size
        torch.testing.assert_close(merged[n], expected, rtol=1e-5, atol=1e-6)


def test_nonlinear_method_on_checkpoints_records_and_applies(tiny_base, adapters, tmp_path):
    cks = _checkpoints(tiny_base, adapters, tmp_path)
    art = merge(
        MergeSpec(
            adapters=tuple(map(str, cks)),
            method="ta",
            base=str(tiny_base),
            params={"nonlinear": "method", "scaling": "0.5"},
        ),
        use_cache=False,
        out=tmp_path / "o",
        progress=False,
    )
    assert art.manifest["params"]["nonlinear"] == "method"
    inputs = open_inputs([str(c) for c in cks], base=str(tiny_base))
    base, merged = _state(tiny_base), _state(art.path)
    for n in inputs.module_names:
        tv = inputs.read(n).task_vectors
        if n in merged and any(t.any() for t in tv):
            torch.testing.assert_close(merged[n], base[n] + 0.5 * sum(tv), rtol=1e-5, atol=1e-6)
