"""The cache key and the manifest of a fixed tiny spec, pinned.

The adapters are written byte for byte here (fixed tensors, fixed JSON), the
code version is fixed, so the key depends only on how the record is built.
The expected values were computed with the code as it was *before* the
provenance object existed: existing caches and the mini-benchmark baselines
stay valid only while they do not change.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import xxhash
from safetensors.torch import save_file

from harness_merge.api import MergeSpec, merge

CODE_VERSION = "0.0.0+pinned"
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (32, 48)}  # tiny_base


def _adapter(path, seed: int, *, dora: bool = False):
    path.mkdir(parents=True)
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "down_proj"],
        "base_model_name_or_path": "tiny/base",
        "use_dora": dora,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg, sort_keys=True))
    tensors = {}
    for i, m in enumerate(MODULES):
        d_out, d_in = SHAPES[m]
        n = 2 * d_in
        a = (torch.arange(n, dtype=torch.float32).reshape(2, d_in) + seed + i) / 10.0
        b = (torch.arange(d_out * 2, dtype=torch.float32).reshape(d_out, 2) - seed - i) / 20.0
        tensors[f"base_model.model.{m}.lora_A.weight"] = a
        tensors[f"base_model.model.{m}.lora_B.weight"] = b
        if dora:
            tensors[f"base_model.model.{m}.lora_magnitude_vector"] = torch.linspace(0.5, 1.5, d_out) + seed
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@pytest.fixture
def pinned_code_version(monkeypatch):
    import harness_merge.api as api
    import harness_merge.artifact.cache as cache

    monkeypatch.setattr(cache, "code_version", lambda: CODE_VERSION)
    monkeypatch.setattr(api, "code_version", lambda: CODE_VERSION, raising=False)


def _stable(manifest: dict) -> dict:
    return {
        k: v for k, v in manifest.items() if k not in ("result", "merge_seconds", "harness_merge_version")
    }


# computed at commit be01966, before harness_merge.artifact.provenance existed
EXPECTED = {
    "lora_ta": {
        "key": "89a9798935772acaa15c234b0f177f0a5109e68d45277d1950f1929eec7a8e68",
        "manifest": {
            "adapters": [
                {"ref": None, "sha256": "59be384b5c9a611dad0473d0f0a2965917411bc211b790b00ce102a299def863"},
                {"ref": None, "sha256": "72b13089c11d37a52acf8c78b8ffd8e4ce3b8c693b57c03f6f38f1c4607d7eb3"},
            ],
            "base": None,
            "code_version": "0.0.0+pinned",
            "dtype": "float32",
            "format": "lora",
            "inputs_kind": "lora",
            "method": "ta",
            "params": {"nonlinear": "average", "scaling": 0.5, "weights": None},
            "rank_requested": None,
            "reference_url": "https://arxiv.org/abs/2212.04089",
        },
    },
    "lora_ties_rank": {
        "key": "2144fc3081c6390548dfe84f4ad7b4815fbb219a5f3c942b1a5ebc8bcf31e5e7",
        "manifest": {
            "adapters": [
                {"ref": None, "sha256": "59be384b5c9a611dad0473d0f0a2965917411bc211b790b00ce102a299def863"},
                {"ref": None, "sha256": "72b13089c11d37a52acf8c78b8ffd8e4ce3b8c693b57c03f6f38f1c4607d7eb3"},
            ],
            "base": {"ref": None, "sha256": None},
            "code_version": "0.0.0+pinned",
            "dtype": "float32",
            "format": "lora",
            "inputs_kind": "lora",
            "method": "ties",
            "params": {
                "keep_rule": "exact",
                "majority_sign": "total",
                "nonlinear": "average",
                "prune_rate": 0.5,
                "scaling": 1.0,
                "seed": 0,
                "weights": None,
            },
            "rank_requested": 2,
            "reference_url": "https://arxiv.org/abs/2306.01708",
        },
    },
}


# computed at commit be01966 (the package exported by git archive, same spec and code version)
EXPECTED["dora_ta"] = {
    "key": "7466820af627f947f8cf5f787c40c45164bb087eb987a56d5dde3cf2d83505f6",
    "manifest": {
        "adapters": [
            {"ref": None, "sha256": "2b9dbadfc57b86e1636c6d8e71f5dbc1d94cf0e92d2f07ecbb53573e746d98b8"},
            {"ref": None, "sha256": "dd99f27feabed42ca37bc6e606774d5d24443b2560ddc5b757944cd93654a637"},
        ],
        "base": {"ref": None, "sha256": None},
        "code_version": "0.0.0+pinned",
        "dora": {
            "direction": "the method on the LoRA factors (s_n B_n A_n)",
            "magnitude": "mean_n m_n (the 1-D tensor policy)",
            "peft_variant": "dora",
            "weight": "m * (W0 + dV) / ||W0 + dV||_row",
        },
        "dtype": "float32",
        "format": "lora",
        "inputs_kind": "lora",
        "method": "ta",
        "params": {"nonlinear": "average", "scaling": 1.0, "weights": None},
        "rank_requested": None,
        "reference_url": "https://arxiv.org/abs/2212.04089",
    },
}


def _case_spec(case, ads, tiny_base):
    if case == "dora_ta":
        spec = MergeSpec(adapters=tuple(ads), method="ta", base=str(tiny_base), format="lora")
    elif case == "lora_ta":
        spec = MergeSpec(adapters=tuple(ads), method="ta", params={"scaling": "0.5"})
    else:
        spec = MergeSpec(
            adapters=tuple(ads),
            method="ties",
            params={"prune_rate": "0.5"},
            base=str(tiny_base),
            format="lora",
            rank=2,
        )
    return spec


@pytest.mark.parametrize("case", ["lora_ta", "lora_ties_rank", "dora_ta"])
def test_cache_key_and_manifest_are_pinned(tmp_path, tiny_base, pinned_code_version, case):
    """With ``content_hash=sha256`` the keys and manifests of before the choice existed."""
    ads = [str(_adapter(tmp_path / f"ad{i}", i, dora=case.startswith("dora"))) for i in range(2)]
    spec = _case_spec(case, ads, tiny_base)
    art = merge(spec, cache_dir=tmp_path / "cache", progress=False, content_hash="sha256")
    adapters = [dict(a, ref=None) for a in art.manifest["adapters"]]
    base = art.manifest["base"] and dict(art.manifest["base"], ref=None)  # a tmp path
    got = {"key": art.path.name, "manifest": {**_stable(art.manifest), "adapters": adapters, "base": base}}
    print(case, json.dumps(got, sort_keys=True))
    assert got == EXPECTED[case]


def _xxh3_of_adapter(path) -> str:
    """The documented input digest: xxh3-128 over, for each file of the adapter
    in name order, its name followed by the hex xxh3-128 of its bytes."""
    h = xxhash.xxh3_128()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(xxhash.xxh3_128(f.read_bytes()).hexdigest().encode())
    return h.hexdigest()


@pytest.mark.parametrize("case", ["lora_ta", "lora_ties_rank", "dora_ta"])
def test_default_content_hash_key_and_manifest(tmp_path, tiny_base, pinned_code_version, case):
    """The default (xxh3_128): the same record with xxh3 digests and the
    algorithm named, key = sha256 of that record, both computed here."""
    ads = [_adapter(tmp_path / f"ad{i}", i, dora=case.startswith("dora")) for i in range(2)]
    art = merge(_case_spec(case, ads, tiny_base), cache_dir=tmp_path / "cache", progress=False)
    want_hashes = [_xxh3_of_adapter(a) for a in ads]
    exp = EXPECTED[case]["manifest"]
    record = {
        "code_version": CODE_VERSION,
        "method": exp["method"],
        "params": exp["params"],
        "inputs_kind": exp["inputs_kind"],
        "adapters": want_hashes,
        "base": None,  # the base's weights are not in a LoRA output: not hashed
        "format": exp["format"],
        "rank": exp["rank_requested"],
        "dtype": exp["dtype"],
        "content_hash": "xxh3_128",
    }
    if "dora" in exp:
        record["dora"] = exp["dora"]
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    assert art.path.name == key
    man = art.manifest
    assert man["content_hash"] == "xxh3_128"
    assert [a["xxh3_128"] for a in man["adapters"]] == want_hashes
    assert all("sha256" not in a for a in man["adapters"])
    if exp["base"] is not None:
        assert man["base"] == {"ref": str(tiny_base), "xxh3_128": None}
