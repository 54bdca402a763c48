"""Methods whose formula does not use theta_0 do not read the base: wa (lambda 1)
on full checkpoints is the weighted average of the fine-tuned weights, computed
here from the files (the oracle), with a base whose tensors are all NaN (any
read of them would be refused) and without hashing the base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness_merge.api import MergeSpec, merge
from harness_merge.errors import InputError


@pytest.fixture()
def nan_base_and_fts(tiny_base, tmp_path):
    fts = []
    base_sd = load_file(tiny_base / "model.safetensors")
    for i in (1, 2, 3):
        d = tmp_path / f"ft{i}"
        shutil.copytree(tiny_base, d)
        g = torch.Generator().manual_seed(i)
        sd = {
            # one tensor left as in the base in every fine-tune: written as stored
            k: (v if k.endswith("norm.weight") else v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype))
            for k, v in base_sd.items()
        }
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        fts.append(d)
    nan_base = tmp_path / "nan_base"
    shutil.copytree(tiny_base, nan_base)
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in base_sd.items()},
        nan_base / "model.safetensors",
        metadata={"format": "pt"},
    )
    return nan_base, fts


def test_wa_on_checkpoints_does_not_read_the_base(nan_base_and_fts, tmp_path):
    nan_base, fts = nan_base_and_fts
    w = [1.0, 2.0, 5.0]
    art = merge(
        MergeSpec(adapters=tuple(map(str, fts)), method="wa", base=str(nan_base), params={"weights": w}),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert art.kind == "full" and art.manifest["base"]["xxh3_128"] is None
    assert art.manifest["result"]["base_read"] is False
    got = load_file(art.path / "model.safetensors")
    thetas = [load_file(f / "model.safetensors") for f in fts]
    for k, v in thetas[0].items():
        if k.endswith("norm.weight"):  # no fine-tune changed it: the stored tensor
            assert torch.equal(got[k], v)
            continue
        if v.dim() != 2 or "embed_tokens" in k or "lm_head" in k:  # nonlinear=average: the plain mean
            want = sum(t[k].double() for t in thetas) / 3
        else:
            want = sum(wn * t[k].double() for wn, t in zip(w, thetas)) / sum(w)
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k].double(), want.to(v.dtype).double(), rtol=1e-6, atol=1e-7)


def test_ta_on_checkpoints_still_reads_the_base(nan_base_and_fts, tmp_path):
    nan_base, fts = nan_base_and_fts
    with pytest.raises(InputError, match=r"nan_base \[.*NaN/Inf"):
        merge(
            MergeSpec(adapters=tuple(map(str, fts)), method="ta", base=str(nan_base)),
            use_cache=False,
            progress=False,
        )
    # wa with lambda != 1 needs theta_0 too
    with pytest.raises(InputError, match="NaN/Inf"):
        merge(
            MergeSpec(
                adapters=tuple(map(str, fts)), method="wa", base=str(nan_base), params={"scaling": 0.5}
            ),
            use_cache=False,
            progress=False,
        )


def test_wa_base_free_equals_the_base_path(tiny_base, nan_base_and_fts, tmp_path):
    """The same merge through the base (lambda 1 + 1e-12 reads it) agrees to float rounding."""
    _, fts = nan_base_and_fts
    free = merge(
        MergeSpec(adapters=tuple(map(str, fts)), method="wa", base=str(tiny_base)),
        out=tmp_path / "free",
        use_cache=False,
        progress=False,
    )
    with_base = merge(
        MergeSpec(
            adapters=tuple(map(str, fts)), method="wa", base=str(tiny_base), params={"scaling": 1.0 + 1e-12}
        ),
        out=tmp_path / "with_base",
        use_cache=False,
        progress=False,
    )
    a, b = load_file(free.path / "model.safetensors"), load_file(with_base.path / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert json.loads((free.path / "harness_merge.json").read_text())["result"]["base_read"] is False
