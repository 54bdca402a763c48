"""CoPA-Merging / RobustMerge against an oracle written out from the formulas
(loops over rows, sorted-order clamp as in the released code)."""

import math

import pytest
import torch

from harness_merge import methods
from harness_merge.errors import MethodParamError
from harness_merge.types import LoRAFactors, LowRank, ModuleInputs

from .helpers import as_dense, lora_inputs


def run(mi, **params):
    spec = methods.get("copa")
    return spec.fn(mi, spec.make_params(params), generator=None)


def topk_keep(x, keep):
    """Oracle mask: the floor(keep*n) largest |x| entries of the whole matrix."""
    flat = x.abs().flatten().tolist()
    k = math.floor(keep * len(flat) + 1e-6)
    order = sorted(range(len(flat)), key=lambda i: -flat[i])[:k]
    m = torch.zeros(len(flat))
    m[order] = 1.0
    return m.reshape(x.shape)


def oracle(mi, k, lam, q, combine):
    A_t, B_t, S = [], [], []
    for f in mi.lora:
        B = f.scale * f.B
        mA, mB = topk_keep(f.A, 1 - k), topk_keep(B, 1 - k)
        A_t.append(f.A * mA)
        B_t.append(B * mB)
        s = []
        for i in range(f.A.shape[0]):
            num = sum(abs(v) for v in f.A[i].tolist())
            den = sum(abs(v) for v in (f.A[i] * mA[i]).tolist())
            s.append(num / den)
        if q is not None:
            floor = sorted(s)[int(len(s) * q)]
            s = [max(v, floor) for v in s]
        S.append(torch.tensor(s))
    tot = sum(S)
    S = [s / tot for s in S]
    if combine == "product_of_sums":
        Bm = sum(lam * B @ torch.diag(s) for B, s in zip(B_t, S))
        Am = sum(lam * A for A in A_t)
        return Bm @ Am
    return sum(lam * B @ torch.diag(s) @ A for B, s, A in zip(B_t, S, A_t))


@pytest.mark.parametrize("combine", ["product_of_sums", "sum_of_products"])
@pytest.mark.parametrize("k,q", [(0.8, 0.8), (0.5, None), (0.0, 0.8)])
def test_copa_exact_keep_rule_matches_oracle(combine, k, q):
    """keep_rule=exact: floor((1-k) n) entries per matrix (fp32 random: no ties)."""
    mi = lora_inputs(n=3, d_out=14, d_in=60, ranks=(5, 5, 5), scales=[2.0, 1.0, 0.5], seed=4)
    res = run(
        mi,
        prune_rate=k,
        clamp_quantile="none" if q is None else q,
        combine=combine,
        scaling=2.0,
        keep_rule="exact",
    )
    assert isinstance(res, LowRank)
    assert res.rank == (5 if combine == "product_of_sums" else 15)
    torch.testing.assert_close(res.delta(), oracle(mi, k, 2.0, q, combine), rtol=1e-4, atol=1e-5)


def test_default_lambda_lands_on_both_factors():
    mi = lora_inputs(seed=1)
    d1 = run(mi, scaling=1.0).delta()
    d2 = run(mi, scaling=2.0).delta()
    torch.testing.assert_close(d2, 4.0 * d1)  # released behaviour: lambda^2


def test_no_prune_no_clamp_sum_of_products_is_weight_average():
    mi = lora_inputs(n=4, ranks=(3, 3, 3, 3), scales=[1.0, 2.0, 3.0, 4.0], seed=2)
    res = run(mi, prune_rate=0, clamp_quantile="none", combine="sum_of_products", scaling=1.0)
    wa = methods.get("wa")
    expected = wa.fn(mi, wa.make_params({}), generator=None).delta()
    torch.testing.assert_close(res.delta(), expected, rtol=1e-5, atol=1e-6)


def test_scaling_is_at_least_one_and_normalised():
    from harness_merge.methods._ops import magnitude_mask
    from harness_merge.methods.copa import complementary_scale, cross_task_normalise

    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 20, generator=g)
    s = complementary_scale(A, magnitude_mask(A, 0.2), None)
    assert (s >= 1).all()
    s2 = complementary_scale(A, magnitude_mask(A, 0.2), 0.5)
    assert (s2 >= torch.sort(s).values[3]).all() and torch.equal(s2.max(), s.max())
    norm = cross_task_normalise([s, 2 * s, s2])
    torch.testing.assert_close(sum(norm), torch.ones(6))


def test_zero_rows_do_not_divide_by_zero():
    from harness_merge.methods.copa import complementary_scale

    A = torch.zeros(3, 8)
    A[0] = torch.arange(1.0, 9.0)  # keeps its top entries
    A[1, 0] = 1e-3  # nonzero, pruned to all zeros
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, -2:] = True
    s = complementary_scale(A, mask, None)
    assert torch.isfinite(s).all()
    assert s[2] == 1.0  # a zero row is neutral
    assert s[1] == s[0]  # fully pruned row: largest finite scale of the adapter
    mi = ModuleInputs(
        name="z", lora=(LoRAFactors(A, torch.ones(4, 3), 1.0), LoRAFactors(A.clone(), torch.ones(4, 3), 1.0))
    )
    assert torch.isfinite(run(mi).delta()).all()


def test_product_of_sums_refuses_mixed_ranks():
    p = methods.get("copa").make_params({})
    with pytest.raises(
        MethodParamError, match=r"copa: module q: adapters have ranks \[4, 8\].*sum_of_products"
    ):
        p.check_ranks("q", [4, 8])
    methods.get("copa").make_params({"combine": "sum_of_products"}).check_ranks("q", [4, 8])


def test_sum_of_products_mixed_ranks_normalises_over_present_rows():
    mi = lora_inputs(n=2, ranks=(2, 4), seed=6)
    res = run(mi, prune_rate=0, clamp_quantile="none", combine="sum_of_products", scaling=1.0)
    # without pruning s = 1: rows 0-1 shared by both (1/2 each), rows 2-3 only in the second (1)
    f0, f1 = mi.lora
    w1 = torch.tensor([0.5, 0.5, 1.0, 1.0])
    expected = 0.5 * f0.scale * f0.B @ f0.A + f1.scale * f1.B @ torch.diag(w1) @ f1.A
    torch.testing.assert_close(res.delta(), expected, rtol=1e-5, atol=1e-6)


def test_copa_refuses_dense_inputs():
    with pytest.raises(MethodParamError, match="copa works on LoRA factors"):
        run(as_dense(lora_inputs()))


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"prune_rate": "1.2"}, r"copa: prune_rate must be in \[0, 1\), got 1.2"),
        ({"clamp_quantile": "2"}, r"clamp_quantile must be in \[0, 1\] or none"),
        ({"combine": "sum"}, "combine must be one of product_of_sums, sum_of_products"),
        ({"scaling": "-2"}, "scaling must be >= 0"),
    ],
)
def test_bad_params(bad, match):
    with pytest.raises(MethodParamError, match=match):
        methods.get("copa").make_params(bad)


# ------------------------------------------------- the released RobustMerge code's semantics
def released_robustmerge(mi, mask_ratio=0.2, fuse=2.0):
    """``load_and_merge_pretrained_model`` of AuroraZengfh/RobustMerge, written out
    per adapter matrix: stack the T adapters, keep ``|x| >= kthvalue(int(n (1 -
    mask_ratio)))`` per task, s = sum|A| / sum|mask A| per rank row, clamp the
    lowest to the sorted value at int(r (1 - 0.2)), merged A = sum fuse * A~,
    merged B = sum(fuse * s * B~) / sum(s); the adapter's alpha/r applies on top."""

    def trim(stack):
        t, d1, d2 = stack.shape
        flat = stack.reshape(t, -1)
        k = int(d1 * d2 * (1 - mask_ratio))
        kth = torch.stack([row.abs().sort().values[k - 1] for row in flat]).unsqueeze(1)
        masks = (flat.abs() >= kth).reshape(t, d1, d2)
        return masks, masks * stack

    A = torch.stack([f.A for f in mi.lora])
    B = torch.stack([f.B for f in mi.lora])
    mA, At = trim(A)
    _, Bt = trim(B)
    s = A.abs().sum(-1) / (mA * A).abs().sum(-1)  # (T, r)
    r = s.shape[1]
    lo = s.sort(dim=1).values[:, int(r * (1 - 0.2))].unsqueeze(1)
    s = torch.clamp(s, lo, s.max(dim=1, keepdim=True).values)
    A_m = (fuse * At).sum(0)
    B_m = (fuse * s.unsqueeze(1) * Bt).sum(0) / s.unsqueeze(1).sum(0)
    return mi.lora[0].scale * B_m.float() @ A_m.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copa_default_is_the_released_code(dtype):
    """Defaults (keep_rule=released, product_of_sums, clamp 0.8, lambda 2) equal
    the released code, also in bf16 where many magnitudes tie at the threshold."""
    mi = lora_inputs(n=3, d_out=40, d_in=64, ranks=(8, 8, 8), scales=[2.0] * 3, seed=9)
    # the inputs layer hands methods float32 copies of the stored (bf16) values
    lora = tuple(
        LoRAFactors(A=f.A.to(dtype).float(), B=f.B.to(dtype).float(), scale=f.scale) for f in mi.lora
    )
    mi = ModuleInputs(name="m", lora=lora)
    ours = run(mi).delta()
    ref = released_robustmerge(mi)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("combine", ["product_of_sums", "sum_of_products"])
def test_copa_on_factors_as_stored(dtype, combine):
    """copa takes LoRA factors in their stored dtype (``stored_dtype``): the
    thresholds come from the 16-bit patterns; the result equals the released
    code's on the same values, and is bit for bit the float32 path's."""
    mi = lora_inputs(n=3, d_out=40, d_in=64, ranks=(8, 8, 8), scales=[2.0] * 3, seed=4)
    stored = ModuleInputs(
        name="m", lora=tuple(LoRAFactors(A=f.A.to(dtype), B=f.B.to(dtype), scale=f.scale) for f in mi.lora)
    )
    as_f32 = ModuleInputs(
        name="m", lora=tuple(LoRAFactors(A=f.A.float(), B=f.B.float(), scale=f.scale) for f in stored.lora)
    )
    ours = run(stored, combine=combine)
    f32 = run(as_f32, combine=combine)
    assert ours.A.dtype == ours.B.dtype == torch.float32
    assert torch.equal(ours.A, f32.A) and torch.equal(ours.B, f32.B)
    if combine == "product_of_sums":
        torch.testing.assert_close(ours.delta(), released_robustmerge(as_f32), rtol=1e-4, atol=1e-5)


def test_released_threshold_of_16bit_is_the_sorted_value():
    """The 16-bit pattern count gives the j-th smallest |x| (j = int(0.8 n)), as a sort does,
    with ties, zeros and negative zeros."""
    from harness_merge.methods._ops import released_threshold_of

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        for x in (
            (torch.randn(37, 11, generator=g) * 0.02).to(dtype),
            torch.randint(-3, 4, (50,), generator=g).to(dtype),
            torch.tensor([-0.0, 0.0, 0.0, 1.0, -1.0], dtype=dtype),
        ):
            for keep in (0.2, 0.5, 0.999):
                j = int((1 - keep) * x.numel() + 1e-6)
                want = x.float().abs().reshape(-1).sort().values[j - 1] if j else None
                got = released_threshold_of(x, keep)
                assert (got is None) if want is None else got == float(want), (dtype, keep, x)
            assert released_threshold_of(x, 1.0) is None


def test_copa_keep_rules_differ_on_bf16_ties():
    """bf16 factors tie at the threshold: the released rule keeps them all
    (more than floor(0.2 n) entries), the exact rule exactly floor(0.2 n)."""
    from harness_merge.methods._ops import magnitude_mask

    g = torch.Generator().manual_seed(0)
    A = (torch.randn(8, 512, generator=g) * 0.01).to(torch.bfloat16).float()
    n = A.numel()
    released = magnitude_mask(A, 0.2, rule="released")
    exact = magnitude_mask(A, 0.2, rule="exact", generator=torch.Generator().manual_seed(0))
    assert int(exact.sum()) == int(0.2 * n)
    assert int(released.sum()) > n - int(0.8 * n) + 1  # ties at the k-th value kept
    assert bool((released | ~exact).all())  # the exact mask is a subset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_released_pruning_is_the_boolean_mask_formula(dtype):
    """The hardshrink pruning from (16-bit) thresholds: each adapter's A~, B~
    and s equal the boolean-mask formula applied to it alone."""
    from harness_merge.methods._ops import magnitude_mask
    from harness_merge.methods.copa import _released_pruned, complementary_scale

    mi = lora_inputs(n=4, d_out=24, d_in=40, ranks=(6, 6, 6, 6), seed=11)
    lora = tuple(LoRAFactors(A=f.A.to(dtype), B=f.B.to(dtype), scale=f.scale) for f in mi.lora)
    # one adapter with a zero row and one pruned to nothing in a row: the fill and the clamp
    lora[1].A[2].zero_()
    A_t, B_t, scales = _released_pruned(lora, 0.2, 0.8)
    for f, At, Bt, s in zip(lora, A_t, B_t, scales):
        A, B = f.A.float(), f.B.float()
        mA = magnitude_mask(A, 0.2, rule="released")
        mB = magnitude_mask(B, 0.2, rule="released")
        assert torch.equal(At, torch.where(mA, A, 0.0))
        assert torch.equal(Bt, torch.where(mB, B, 0.0))
        assert torch.equal(s, complementary_scale(A, mA, 0.8))
