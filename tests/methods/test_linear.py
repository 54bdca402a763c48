import pytest
import torch

from harness_merge import methods
from harness_merge.errors import MethodParamError
from harness_merge.types import LowRank

from .helpers import as_dense, dense_inputs, lora_inputs, result_delta


def run(name, mi, **params):
    spec = methods.get(name)
    return spec.fn(mi, spec.make_params(params), generator=methods.module_generator(0, mi.name))


def test_ta_lora_is_exact_lowrank_sum():
    mi = lora_inputs(ranks=(2, 3, 4), scales=[1.0, 2.0, 0.5])
    res = run("ta", mi, scaling=0.7, weights="[1, 2, 3]")
    assert isinstance(res, LowRank) and res.rank == 2 + 3 + 4
    expected = 0.7 * sum(w * f.scale * f.B @ f.A for w, f in zip([1, 2, 3], mi.lora))
    torch.testing.assert_close(res.delta(), expected, rtol=1e-5, atol=1e-5)


def test_ta_dense_equals_lora():
    mi = lora_inputs()
    torch.testing.assert_close(
        result_delta(run("ta", mi, scaling=0.3)),
        result_delta(run("ta", as_dense(mi), scaling=0.3)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_ta_single_adapter_gives_its_delta():
    mi = lora_inputs(n=1, ranks=(4,))
    torch.testing.assert_close(result_delta(run("ta", mi)), mi.lora[0].scale * mi.lora[0].B @ mi.lora[0].A)


def test_wa_normalises_weights():
    mi = dense_inputs()
    res = run("wa", mi, weights=[1, 1, 2])
    expected = (mi.task_vectors[0] + mi.task_vectors[1] + 2 * mi.task_vectors[2]) / 4
    torch.testing.assert_close(result_delta(res), expected)


def test_weights_length_checked_against_inputs():
    spec = methods.get("ta")
    p = spec.make_params({"weights": "1,2"})
    with pytest.raises(MethodParamError, match="weights has 2 values but 3 inputs"):
        p.check_inputs(3)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"scaling": "-1"}, "scaling must be >= 0"),
        ({"scaling": "abc"}, "scaling must be float"),
        ({"lambda": "1"}, "unknown parameter 'lambda'; known parameters: scaling, weights"),
    ],
)
def test_bad_params(bad, match):
    with pytest.raises(MethodParamError, match=match):
        methods.get("ta").make_params(bad)


def test_unknown_method_lists_alternatives():
    with pytest.raises(
        MethodParamError, match=r"unknown method 'tiez'. Did you mean: ties.*Available: .*copa"
    ):
        methods.get("tiez")


# -- ta / wa on float16 / bfloat16 adapters: factors read as stored -------------------------
@pytest.mark.parametrize("method", ["ta", "wa"])
@pytest.mark.parametrize(
    "dtypes", [("float16", "float16"), ("bfloat16", "bfloat16"), ("float16", "bfloat16")]
)
def test_concatenation_from_stored_dtype_is_the_float32_formula(
    tiny_base, tmp_path, make_adapter, method, dtypes
):
    """A LoRA artifact of ta/wa reads the factors as stored (no float32 copy);
    what it writes must equal the formula computed here in float32 and cast to
    the artifact's dtype: A = [A_1; ...], B = [c_1 s_1 B_1, ...]."""
    from safetensors.torch import load_file

    from harness_merge.api import MergeSpec, merge

    ads = [
        make_adapter(tiny_base, tmp_path / f"a{i}", r=2 + i, alpha=4 + 3 * i, seed=i, dtype=getattr(torch, d))
        for i, d in enumerate(dtypes)
    ]
    w = [0.7, 2.0]
    art = merge(
        MergeSpec(adapters=tuple(map(str, ads)), method=method, params={"weights": w, "scaling": 0.5}),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    out_dt = getattr(torch, dtypes[0]) if len(set(dtypes)) == 1 else torch.float32  # mixed: float32
    c = [0.5 * x for x in w] if method == "ta" else [0.5 * x / sum(w) for x in w]
    got = load_file(art.path / "adapter_model.safetensors")
    sds = [load_file(a / "adapter_model.safetensors") for a in ads]
    scales = [(4 + 3 * i) / (2 + i) for i in range(2)]
    a_keys = sorted(k for k in sds[0] if k.endswith("lora_A.weight"))
    assert a_keys
    for ka in a_keys:
        kb = ka.replace("lora_A", "lora_B")
        want_A = torch.cat([sd[ka].float() for sd in sds], dim=0).to(out_dt)
        want_B = torch.cat([sd[kb].float() * (ci * si) for sd, ci, si in zip(sds, c, scales)], dim=1).to(
            out_dt
        )
        assert got[ka].dtype == out_dt
        assert torch.equal(got[ka], want_A), ka
        assert torch.equal(got[kb], want_B), kb


def test_stored_dtype_factors_are_checked_finite(tiny_base, tmp_path, make_adapter):
    from safetensors.torch import load_file, save_file

    from harness_merge.api import MergeSpec, merge
    from harness_merge.errors import InputError

    ads = [make_adapter(tiny_base, tmp_path / f"a{i}", seed=i, dtype=torch.float16) for i in range(2)]
    f = ads[1] / "adapter_model.safetensors"
    sd = load_file(f)
    k = sorted(k for k in sd if k.endswith("lora_B.weight"))[0]
    sd[k][0, 0] = float("inf")
    save_file(sd, str(f))
    with pytest.raises(InputError, match=r"a1.*lora_B.*1 NaN/Inf"):
        merge(MergeSpec(adapters=tuple(map(str, ads)), method="ta"), cache_dir=tmp_path / "c", progress=False)
