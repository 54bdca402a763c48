"""DARE's primitives in the form dare_ties uses: the released-rule threshold
counting zeros first, against a sort (the oracle), and the in-place random
drop, against its formula ``x * (rand >= p) / (1 - p)`` bit for bit."""

import pytest
import torch

from harness_merge.methods._ops import prune_random, released_threshold_zeros_first


def _sorted_threshold(x, keep):
    """The j-th smallest |x|, j = int((1 - keep) n) (the released rule), by a sort."""
    n = x.numel()
    j = int((1.0 - keep) * n + 1e-6)
    return None if keep >= 1.0 or j <= 0 else float(x.abs().reshape(-1).sort().values[j - 1])


def _with_zeros(n, frac, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(torch.bfloat16).float()  # bf16 values: ties
    x[torch.rand(n, generator=g) < frac] = 0.0
    x[:3] = -0.0  # negative zeros count as zeros
    return x


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.55, 0.79, 0.8, 0.81, 0.95, 1.0])
@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0, 1e-9])
def test_zeros_first_threshold_is_the_sorted_one(frac, keep):
    for seed, n in [(0, 1000), (1, 4097), (2, 7)]:
        x = _with_zeros(n, frac, seed)
        assert released_threshold_zeros_first(x, keep) == _sorted_threshold(x, keep), (frac, keep, n)


def test_zeros_first_threshold_other_dtypes_fall_back():
    x = _with_zeros(500, 0.9, 3).double()
    assert released_threshold_zeros_first(x, 0.2) == _sorted_threshold(x, 0.2)


@pytest.mark.parametrize("rescale", [True, False])
def test_prune_random_is_its_formula_bit_for_bit(rescale):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=g)
    x[0, :5] = 0.0
    p = 0.8
    out = prune_random(x, p, torch.Generator().manual_seed(9), rescale=rescale)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) >= p
    want = x * keep
    want = want / (1.0 - p) if rescale else want
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))  # signs of zeros too
    assert bool((out[x < 0] == 0).any()) and bool((out[x < 0] == 0).logical_and(out[x < 0].signbit()).any())
    assert prune_random(x, 0.0, torch.Generator()) is not x


@pytest.mark.parametrize("bias", [0.5, -0.5, 0.0])
def test_majority_zero_sign_is_the_sign_of_the_elected_sum(bias):
    """elect_sign(zero="majority"): where the vote is 0, the sign of the sum of
    the elected signs (MLLMerging's ties_merging), as a where() would fill it."""
    from harness_merge.methods._ops import elect_sign

    g = torch.Generator().manual_seed(11)
    stacked = torch.randint(-2, 3, (3, 50, 40), generator=g).float() + bias * (
        torch.rand(3, 50, 40, generator=g) > 0.5
    )
    if bias == 0.0:  # a balanced tensor: the fill is 0
        stacked = torch.cat([stacked, -stacked], dim=1)
    vote = torch.sign(stacked.sum(dim=0))
    want = torch.where(vote == 0, torch.sign(vote.sum()), vote)
    got = elect_sign(stacked, "total", "majority")
    assert bool((vote == 0).any())
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_ties_disjoint_mean_over_several_blocks_is_the_whole_tensor_formula():
    """The disjoint mean runs in flat blocks (``_ops.flat_blocks``): on a
    tensor of three blocks and a remainder it equals the formula on whole
    tensors (trim by the sorted threshold, sign of the sum, mean over the
    agreeing entries) exactly."""
    from harness_merge import methods
    from harness_merge.methods._ops import BLOCK
    from harness_merge.types import ModuleInputs

    g = torch.Generator().manual_seed(21)
    shape = (3 * BLOCK // 128 + 1, 128)
    taus = tuple(torch.randn(shape, generator=g).to(torch.bfloat16).float() for _ in range(3))
    spec = methods.get("ties")
    got = spec.fn(
        ModuleInputs(name="m", task_vectors=taus), spec.make_params({"keep_rule": "released"})
    ).delta
    trimmed = []
    for t in taus:
        thr = _sorted_threshold(t, 0.2)
        trimmed.append(torch.where(t.abs() >= thr, t, 0.0))
    st = torch.stack(trimmed)
    sign = torch.where(st.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (st * sign) > 0
    want = torch.where(agree, st, 0.0).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    assert torch.equal(got, want)
