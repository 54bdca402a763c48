"""End to end through ``harness_merge.api.merge``: the written artifact reloads
(PEFT / transformers) and equals the dense formula; full checkpoints; errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness_merge.api import MergeSpec, merge
from harness_merge.errors import ArtifactError, InputError, MethodParamError
from harness_merge.inputs import open_inputs


def dense_ta(adapter_dirs, scaling=1.0):
    inputs = open_inputs([str(a) for a in adapter_dirs])
    return {m: scaling * sum(d for d in inputs.read(m).deltas()) for m in inputs.module_names}


def logits(model, seed=0):
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_plus(base, deltas):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    named = dict(model.named_modules())
    with torch.no_grad():
        for m, d in deltas.items():
            named[m].weight += d
    return model


def test_lora_artifact_reloads_in_peft_with_dense_outputs(tiny_base, adapters, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ta", params={"scaling": "0.5"}),
        cache_dir=cache_dir,
        progress=False,
    )
    assert art.kind == "lora" and not art.cache_hit
    cfg = json.loads((art.path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 12  # 3 adapters x rank 4, scale folded into B
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), art.path)
    expected = base_plus(tiny_base, dense_ta(adapters, 0.5))
    torch.testing.assert_close(logits(model), logits(expected), rtol=1e-4, atol=1e-4)
    assert art.manifest["method"] == "ta" and len(art.manifest["adapters"]) == 3
    assert art.manifest["content_hash"] == "xxh3_128"
    assert all(len(a["xxh3_128"]) == 32 for a in art.manifest["adapters"])


def test_copa_artifact_reloads_and_changes_outputs(tiny_base, adapters, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness_merge import methods

    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="copa"), cache_dir=cache_dir, progress=False
    )
    inputs = open_inputs([str(a) for a in adapters])
    spec = methods.get("copa")
    deltas = {
        m: spec.fn(inputs.read(m), spec.make_params({}), generator=None).delta() for m in inputs.module_names
    }
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), art.path)
    torch.testing.assert_close(logits(model), logits(base_plus(tiny_base, deltas)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(model), logits(AutoModelForCausalLM.from_pretrained(tiny_base)))


def test_dense_method_with_base_writes_full_weights(tiny_base, adapters, cache_dir):
    from transformers import AutoModelForCausalLM

    from harness_merge import methods

    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ties", base=str(tiny_base)),
        cache_dir=cache_dir,
        progress=False,
    )
    assert art.kind == "full" and (art.path / "config.json").is_file()
    inputs = open_inputs([str(a) for a in adapters])
    spec = methods.get("ties")
    deltas = {
        m: spec.fn(inputs.read(m), spec.make_params({}), generator=None).delta for m in inputs.module_names
    }
    merged = AutoModelForCausalLM.from_pretrained(art.path)
    torch.testing.assert_close(logits(merged), logits(base_plus(tiny_base, deltas)), rtol=1e-4, atol=1e-4)


def test_dense_method_without_base_is_exact_svd_lora(tiny_base, adapters, cache_dir, caplog):
    from harness_merge import methods

    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ties"), cache_dir=cache_dir, progress=False
    )
    assert art.kind == "lora"
    assert art.manifest["result"]["svd_rel_error"]["max"] < 1e-5
    sd = load_file(art.path / "adapter_model.safetensors")
    inputs = open_inputs([str(a) for a in adapters])
    spec = methods.get("ties")
    m = inputs.module_names[0]
    expected = spec.fn(inputs.read(m), spec.make_params({}), generator=None).delta
    got = sd[f"base_model.model.{m}.lora_B.weight"] @ sd[f"base_model.model.{m}.lora_A.weight"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    trunc = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ties", rank=2),
        cache_dir=cache_dir,
        progress=False,
    )
    err = trunc.manifest["result"]["svd_rel_error"]
    assert json.loads((trunc.path / "adapter_config.json").read_text())["r"] == 2
    assert 0 < err["mean"] <= err["max"] < 1


def test_lowrank_truncation_matches_dense_svd(tiny_base, adapters, cache_dir):
    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ta", rank=3),
        cache_dir=cache_dir,
        progress=False,
    )
    sd = load_file(art.path / "adapter_model.safetensors")
    dense = dense_ta(adapters)
    for m, d in list(dense.items())[:3]:
        U, S, Vh = torch.linalg.svd(d.double())
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        got = (
            sd[f"base_model.model.{m}.lora_B.weight"].double()
            @ sd[f"base_model.model.{m}.lora_A.weight"].double()
        )
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)


def _fake_checkpoints(tiny_base, adapters, root):
    """Full fine-tuned checkpoints whose task vectors are the adapters' deltas."""
    import shutil

    inputs = open_inputs([str(a) for a in adapters])
    sd0 = load_file(tiny_base / "model.safetensors")
    out = []
    for i, _ad in enumerate(adapters):
        d = root / f"ck{i}"
        shutil.copytree(tiny_base, d)
        sd = dict(sd0)
        for m in inputs.module_names:
            sd[f"{m}.weight"] = sd0[f"{m}.weight"] + inputs.read(m).deltas()[i]
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        out.append(d)
    return out


def test_checkpoints_and_lora_give_the_same_merge(tiny_base, adapters, cache_dir, tmp_path):
    cks = _fake_checkpoints(tiny_base, adapters, tmp_path)
    full = merge(
        MergeSpec(adapters=tuple(map(str, cks)), method="ta", params={"scaling": "0.7"}, base=str(tiny_base)),
        cache_dir=cache_dir,
        progress=False,
    )
    assert full.kind == "full" and full.manifest["inputs_kind"] == "dense"
    sd = load_file(full.path / "model.safetensors")
    sd0 = load_file(tiny_base / "model.safetensors")
    for m, d in dense_ta(adapters, 0.7).items():
        torch.testing.assert_close(sd[f"{m}.weight"] - sd0[f"{m}.weight"], d, rtol=1e-4, atol=1e-5)
    untouched = "model.norm.weight"
    assert torch.equal(sd[untouched], sd0[untouched])


def test_checkpoints_need_base(tiny_base, adapters, tmp_path):
    cks = _fake_checkpoints(tiny_base, adapters[:2], tmp_path)
    with pytest.raises(InputError, match="pass the base checkpoint"):
        merge(MergeSpec(adapters=tuple(map(str, cks)), method="ta"), use_cache=False)


def test_checkpoint_shape_mismatch_names_tensor(tiny_base, adapters, tmp_path):
    cks = _fake_checkpoints(tiny_base, adapters[:2], tmp_path)
    sd = load_file(cks[1] / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(33)
    save_file(sd, cks[1] / "model.safetensors")
    with pytest.raises(InputError, match=r"tensor model.norm.weight: shape \[33\] in .*ck1 but \[32\]"):
        merge(MergeSpec(adapters=tuple(map(str, cks)), method="ta", base=str(tiny_base)), use_cache=False)


def test_copa_on_checkpoints_refused_before_work(tiny_base, adapters, tmp_path):
    cks = _fake_checkpoints(tiny_base, adapters[:2], tmp_path)
    with pytest.raises(MethodParamError, match="copa: works on lora inputs only, got full checkpoints"):
        merge(MergeSpec(adapters=tuple(map(str, cks)), method="copa", base=str(tiny_base)), use_cache=False)


def test_single_adapter_where_two_needed(adapters):
    with pytest.raises(MethodParamError, match=r"copa: needs at least 2 adapters, got 1"):
        merge(MergeSpec(adapters=(str(adapters[0]),), method="copa"), use_cache=False)


def test_mixed_ranks_product_of_sums_refused(tiny_base, adapters, tmp_path, make_adapter):
    r8 = make_adapter(tiny_base, tmp_path / "r8", r=8, seed=9)
    with pytest.raises(MethodParamError, match=r"adapters have ranks \[4, 8\]"):
        merge(MergeSpec(adapters=(str(adapters[0]), str(r8)), method="copa"), use_cache=False)
    art = merge(
        MergeSpec(adapters=(str(adapters[0]), str(r8)), method="copa", params={"combine": "sum_of_products"}),
        use_cache=False,
        out=tmp_path / "o",
    )
    assert json.loads((art.path / "adapter_config.json").read_text())["r"] == 12


def test_heterogeneous_alpha_rank_rslora_ta(tiny_base, tmp_path, make_adapter, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ads = [
        make_adapter(tiny_base, tmp_path / "a", r=2, alpha=4, seed=1),
        make_adapter(tiny_base, tmp_path / "b", r=6, alpha=3, seed=2, use_rslora=True),
        make_adapter(tiny_base, tmp_path / "c", r=4, alpha=16, seed=3, rank_pattern={"down_proj": 2}),
    ]
    art = merge(MergeSpec(adapters=tuple(map(str, ads)), method="ta"), cache_dir=cache_dir, progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), art.path)
    torch.testing.assert_close(
        logits(model), logits(base_plus(tiny_base, dense_ta(ads))), rtol=1e-4, atol=1e-4
    )


def test_out_dir_not_ours_is_refused_and_untouched(adapters, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(ArtifactError, match="exists and is not a harness-merge artifact"):
        merge(MergeSpec(adapters=tuple(map(str, adapters)), method="ta"), out=out, use_cache=False)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_out_dir_of_ours_is_replaced(adapters, tmp_path, cache_dir):
    out = tmp_path / "o"
    merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ta"),
        out=out,
        cache_dir=cache_dir,
        progress=False,
    )
    a2 = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="wa"),
        out=out,
        cache_dir=cache_dir,
        progress=False,
    )
    assert json.loads((out / "harness_merge.json").read_text())["method"] == "wa" == a2.manifest["method"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


# Settings under which a method's LoRA path and dense path are the same
# computation (the methods' "auto" choices differ by input kind on purpose).
SAME_ON_BOTH = {
    # spectrum=full uses the null-space basis of each delta, which float rounding
    # of the two input forms picks differently; the basis-free variant is equal
    "tsv": {"spectrum": "numerical_rank"},
    "iso_c": {"spectrum": "numerical_rank"},
    "iso_cts": {"spectrum": "numerical_rank"},
    # scope=model takes quantiles over the modules present: checkpoints also hold
    # the matrices no adapter touched (zero task vectors)
    "pcb": {"scope": "module"},
    "wudi": {"solver": "closed_form"},
    "wudi2": {"solver": "closed_form", "init": "mean", "center": "no"},
    "dare": {"drop_rate": "0.5"},
    "dare_ties": {"drop_rate": "0.5"},
}


def _all_methods():
    from harness_merge import methods

    return [m for m in methods.available() if "dense" in methods.get(m).inputs]


@pytest.mark.parametrize("method", _all_methods())
def test_every_method_same_merge_from_lora_and_from_checkpoints(method, tiny_base, adapters, tmp_path):
    """Through the whole pipeline (inputs -> method -> artifact): adapters and the
    equivalent full checkpoints give the same merged weights."""
    from transformers import AutoModelForCausalLM

    params = SAME_ON_BOTH.get(method, {})
    cks = _fake_checkpoints(tiny_base, adapters, tmp_path)
    from_lora = merge(
        MergeSpec(
            adapters=tuple(map(str, adapters)),
            method=method,
            params=params,
            base=str(tiny_base),
            format="full",
        ),
        use_cache=False,
        out=tmp_path / "l",
        progress=False,
    )
    from_ck = merge(
        MergeSpec(adapters=tuple(map(str, cks)), method=method, params=params, base=str(tiny_base)),
        use_cache=False,
        out=tmp_path / "c",
        progress=False,
    )
    a = AutoModelForCausalLM.from_pretrained(from_lora.path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(from_ck.path).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=f"{method}: {k}")
        changed += not torch.equal(a[k], base[k])
    assert changed >= 6  # the merged modules moved


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "wudi", "wudi2"])
def test_factor_space_methods_write_lora_that_peft_loads(method, tiny_base, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from harness_merge import methods

    # the factor-space variants (the defaults run on dense deltas, as the released codes)
    params = {"iterations": "20", "space": "factor"} if "wudi" in method else {"spectrum": "numerical_rank"}
    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method=method, params=params),
        use_cache=False,
        out=tmp_path / "o",
        progress=False,
    )
    assert art.kind == "lora" and "svd_rel_error" not in art.manifest["result"]
    inputs = open_inputs([str(a) for a in adapters])
    spec = methods.get(method)
    p = spec.make_params(params)
    deltas = {
        m: spec.fn(inputs.read(m), p, generator=methods.module_generator(0, m)).delta()
        for m in inputs.module_names
    }
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), art.path)
    torch.testing.assert_close(logits(model), logits(base_plus(tiny_base, deltas)), rtol=1e-4, atol=1e-4)
