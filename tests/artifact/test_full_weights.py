"""The streaming full-weights writer (LoRA merge + base -> merged checkpoint).

Oracle: ``W_base + sum_n (alpha_n / r_n) B_n A_n`` computed here from the
adapter files, compared with the written checkpoint as transformers loads it.
The bases are tiny Qwen2-VL and LLaVA models, whose checkpoints keep the older
key layout that transformers 5 renames on load (``model.layers.*`` ->
``model.language_model.layers.*``; LLaVA's vision and text layers share the
suffix ``layers.N.self_attn.q_proj``, so suffix matching would be ambiguous).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness_merge.api import MergeSpec, merge
from harness_merge.artifact.full_weights import (
    SafetensorsReader,
    SafetensorsStreamWriter,
)
from harness_merge.errors import InputError


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ta_oracle(adapters: list[Path]) -> dict[str, torch.Tensor]:
    """module -> sum_n alpha_n / r_n * B_n A_n, read straight from the files."""
    total: dict[str, torch.Tensor] = {}
    for ad in adapters:
        cfg = json.loads((ad / "adapter_config.json").read_text())
        sd = load_file(ad / "adapter_model.safetensors")
        for k, A in sd.items():
            if ".lora_A." not in k:
                continue
            m = k.split(".lora_A.")[0].removeprefix("base_model.model.")
            B = sd[k.replace(".lora_A.", ".lora_B.")]
            d = cfg["lora_alpha"] / A.shape[0] * (B.double() @ A.double())
            total[m] = total.get(m, 0) + d
    return total


def _load(folder):
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, AutoConfig.from_pretrained(folder).architectures[0])
    return cls.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def vlm_bases(tmp_path_factory):
    from harness_merge.demo.tiny import (
        build_tiny_llava,
        build_tiny_qwen2vl,
        random_lora,
    )

    root = tmp_path_factory.mktemp("fw")
    out = {}
    for name, build in (("qwen2vl", build_tiny_qwen2vl), ("llava", build_tiny_llava)):
        base = build(root / name)
        ads = [
            random_lora(
                base,
                root / f"{name}_ad{i}",
                rank=4,
                alpha=8,
                targets=("q_proj", "v_proj", "down_proj"),
                seed=i,
            )
            for i in range(2)
        ]
        out[name] = (base, ads)
    return out


@pytest.mark.parametrize("family", ["qwen2vl", "llava"])
def test_full_weights_in_the_checkpoints_own_layout_equal_the_formula(family, vlm_bases, tmp_path):
    base, ads = vlm_bases[family]
    art = merge(
        MergeSpec(adapters=tuple(map(str, ads)), method="ta", base=str(base), format="full"),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert art.kind == "full" and art.manifest["result"]["streamed"]
    stored_base, stored_out = _stored(base), _stored(art.path)
    # Same tensor names as the base's files (not transformers' loaded names), same dtypes.
    assert set(stored_out) == set(stored_base)
    assert {k: v.dtype for k, v in stored_out.items()} == {k: v.dtype for k, v in stored_base.items()}
    oracle = _ta_oracle(ads)
    base_model, merged_model = _load(base), _load(art.path)
    bsd, msd = base_model.state_dict(), merged_model.state_dict()
    assert oracle and all(f"{m}.weight" in bsd for m in oracle)  # the adapters use loaded names
    for m, d in oracle.items():
        want = (bsd[f"{m}.weight"].double() + d).float()
        torch.testing.assert_close(msd[f"{m}.weight"], want, rtol=1e-5, atol=1e-5, msg=m)
    touched = {f"{m}.weight" for m in oracle}
    for k in bsd:
        if k not in touched:
            assert torch.equal(msd[k], bsd[k]), k
    # The number of stored tensors that changed is the number of adapter modules.
    changed = [k for k in stored_base if not torch.equal(stored_base[k], stored_out[k])]
    assert len(changed) == len(oracle) == art.manifest["result"]["modules"]


def test_sharded_base_gives_the_same_shards_and_an_index(vlm_bases, tmp_path):
    base, ads = vlm_bases["qwen2vl"]
    sharded = tmp_path / "sharded"
    model = _load(base)
    model.save_pretrained(sharded, max_shard_size="200KB")
    for p in base.iterdir():
        if p.suffix != ".safetensors" and not (sharded / p.name).exists():
            (sharded / p.name).write_bytes(p.read_bytes())
    base_index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(base_index.values())) > 2
    art = merge(
        MergeSpec(adapters=tuple(map(str, ads)), method="ties", base=str(sharded)),
        use_cache=False,
        out=tmp_path / "out",
        progress=False,
    )
    index = json.loads((art.path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _stored(art.path).values()
    )
    for fn in set(base_index.values()):
        with safe_open(str(sharded / fn), "pt") as a, safe_open(str(art.path / fn), "pt") as b:
            assert set(a.keys()) == set(b.keys())
    # Same weights as the unsharded base gives (the layout does not change the numbers).
    art1 = merge(
        MergeSpec(adapters=tuple(map(str, ads)), method="ties", base=str(base)),
        use_cache=False,
        out=tmp_path / "out1",
        progress=False,
    )
    one, many = _stored(art1.path), _stored(art.path)
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_dtype_converts_floats_and_is_recorded_in_config(vlm_bases, tmp_path):
    base, ads = vlm_bases["qwen2vl"]
    art = merge(
        MergeSpec(
            adapters=tuple(map(str, ads)), method="ta", base=str(base), format="full", dtype="bfloat16"
        ),
        use_cache=False,
        out=tmp_path / "o",
        progress=False,
    )
    sd = _stored(art.path)
    assert {t.dtype for t in sd.values() if t.is_floating_point()} == {torch.bfloat16}
    ref = _stored(base)
    oracle = _ta_oracle(ads)
    # A tensor no adapter touches is the base's value rounded to bf16.
    untouched = next(k for k in ref if ref[k].is_floating_point() and "q_proj" not in k and "v_proj" not in k)
    assert torch.equal(sd[untouched], ref[untouched].to(torch.bfloat16))
    assert json.loads((art.path / "config.json").read_text()).get("dtype") in (None, "bfloat16")
    merged = _load(art.path).state_dict()
    m = next(iter(oracle))
    want = _load(base).state_dict()[f"{m}.weight"].double() + oracle[m]
    torch.testing.assert_close(
        merged[f"{m}.weight"].double(), want.to(torch.bfloat16).double(), rtol=0, atol=0
    )


def test_base_without_the_modules_is_refused_before_writing(vlm_bases, tmp_path):
    from harness_merge.demo.tiny import build_tiny_text_lm

    _, ads = vlm_bases["qwen2vl"]
    other = build_tiny_text_lm(tmp_path / "text")
    with pytest.raises(
        InputError, match=r"module model\.language_model\.layers\.0\..* does not exist in the base"
    ):
        merge(
            MergeSpec(adapters=tuple(map(str, ads)), method="ties", base=str(other)),
            cache_dir=tmp_path / "cache",
            out=tmp_path / "o",
            progress=False,
        )
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "cache" / "merges").glob("*"))


def test_stream_writer_reads_back_in_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.empty": torch.zeros(0, 4, dtype=torch.float16),
        "e.scalar": torch.tensor(2.5),
        "f.bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    w = SafetensorsStreamWriter(
        path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], metadata={"format": "pt"}
    )
    for k, t in tensors.items():
        w.write(k, t)
    w.close()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]), k
    # And our reader reads what safetensors writes.
    save_file(tensors, tmp_path / "y.safetensors")
    rd = SafetensorsReader(tmp_path / "y.safetensors")
    for k in tensors:
        assert torch.equal(rd.read(k), tensors[k]), k


def test_stream_writer_refuses_out_of_order_and_missing_tensors(tmp_path):
    w = SafetensorsStreamWriter(
        tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    )
    with pytest.raises(RuntimeError, match="tensor b written out of order"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="1 tensor"):
        w.close()
