"""TIES / DARE / DARE-TIES against peft.utils.merge_utils and the formulas."""

import pytest
import torch
from peft.utils import merge_utils

from harness_merge import methods
from harness_merge.errors import MethodParamError

from .helpers import as_dense, dense_inputs, lora_inputs, result_delta


def run(name, mi, seed_name=None, **params):
    spec = methods.get(name)
    p = spec.make_params(params)
    return spec.fn(mi, p, generator=methods.module_generator(getattr(p, "seed", 0), mi.name))


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_equals_peft(sign):
    mi = dense_inputs(n=4, shape=(20, 16), seed=3)
    weights = [0.5, 1.0, 1.5, 2.0]
    ours = result_delta(run("ties", mi, prune_rate=0.75, weights=weights, majority_sign=sign, scaling=1.3))
    ref = merge_utils.ties(
        list(mi.task_vectors), torch.tensor(weights), density=0.25, majority_sign_method=sign
    )
    torch.testing.assert_close(ours, 1.3 * ref)


def test_ties_on_lora_works_on_dense_deltas():
    mi = lora_inputs(seed=5)
    ours = result_delta(run("ties", mi, prune_rate=0.5))
    ref = merge_utils.ties(mi.deltas(), torch.ones(3), density=0.5)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, result_delta(run("ties", as_dense(mi), prune_rate=0.5)))


def test_ties_handwritten_case():
    # Two 1x4 tasks; keep the top half of each by magnitude.
    t1 = torch.tensor([[3.0, -1.0, 2.0, 0.5]])
    t2 = torch.tensor([[-0.9, -4.0, 1.0, 0.1]])
    from harness_merge.types import ModuleInputs

    mi = ModuleInputs(name="x", task_vectors=(t1, t2))
    # trimmed: t1 -> [3, 0, 2, 0], t2 -> [0, -4, 1, 0]; signs: [+, -, +, +(0 vote)]
    # disjoint mean: [3, -4, (2+1)/2, 0]
    out = result_delta(run("ties", mi, prune_rate=0.5))
    torch.testing.assert_close(out, torch.tensor([[3.0, -4.0, 1.5, 0.0]]))


def test_dare_no_drop_is_task_arithmetic():
    mi = dense_inputs()
    ours = result_delta(run("dare", mi, drop_rate=0.0, weights=[1, 2, 3]))
    ref = merge_utils.task_arithmetic(list(mi.task_vectors), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(ours, ref)


def test_dare_formula_and_statistics():
    mi = dense_inputs(n=2, shape=(200, 100))
    p = 0.9
    ours = result_delta(run("dare", mi, drop_rate=p, seed=7))
    g = methods.module_generator(7, mi.name)
    expected = torch.zeros(200, 100)
    for tau in mi.task_vectors:
        keep = torch.rand(tau.shape, generator=g) >= p
        expected += tau * keep / (1 - p)
    torch.testing.assert_close(ours, expected)
    single = result_delta(run("dare", dense_inputs(n=1, shape=(200, 100)), drop_rate=p, seed=7))
    assert abs((single != 0).float().mean().item() - (1 - p)) < 0.02


def test_dare_ties_no_drop_equals_peft_ties_full_density():
    mi = dense_inputs(n=3, seed=11)
    ours = result_delta(run("dare_ties", mi, drop_rate=0.0, prune_rate=0.0, zero_sign="positive"))
    ref = merge_utils.ties(list(mi.task_vectors), torch.ones(3), density=1.0)
    torch.testing.assert_close(ours, ref)


def test_dare_ties_matches_peft_with_same_masks(monkeypatch):
    """The peft variant (prune_rate=0, zero_sign=positive): feed peft's
    dare_ties the masks our generator draws: equal outputs."""
    mi = dense_inputs(n=3, shape=(30, 20), seed=2)
    p = 0.5
    ours = result_delta(run("dare_ties", mi, drop_rate=p, seed=4, prune_rate=0, zero_sign="positive"))
    g = methods.module_generator(4, mi.name)
    masks = [(torch.rand(t.shape, generator=g) >= p).float() for t in mi.task_vectors]
    it = iter(masks)
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda x: next(it))
    ref = merge_utils.dare_ties(list(mi.task_vectors), torch.ones(3), density=1 - p)
    torch.testing.assert_close(ours, ref)


def test_dare_deterministic_per_seed():
    mi = dense_inputs()
    a = result_delta(run("dare", mi, drop_rate=0.5, seed=1))
    b = result_delta(run("dare", mi, drop_rate=0.5, seed=1))
    c = result_delta(run("dare", mi, drop_rate=0.5, seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("ties", {"prune_rate": "1.0"}, r"ties: prune_rate must be in \[0, 1\), got 1.0"),
        ("ties", {"prune_rate": "-0.1"}, r"prune_rate must be in \[0, 1\)"),
        ("dare", {"drop_rate": "1"}, r"dare: drop_rate must be in \[0, 1\)"),
        ("ties", {"majority_sign": "most"}, "majority_sign must be one of total, frequency"),
        ("dare", {"seed": "1.5"}, "seed must be int"),
    ],
)
def test_bad_params(name, bad, match):
    with pytest.raises(MethodParamError, match=match):
        methods.get(name).make_params(bad)


def test_magnitude_mask_keeps_exactly_k_even_with_ties():
    from harness_merge.methods._ops import magnitude_mask

    x = torch.tensor([[1.0, -1.0, 1.0, 0.5], [2.0, 1.0, -1.0, 0.0]])
    m = magnitude_mask(x, 0.5)  # k = 4: the 2.0 and three of the five tied 1.0s
    assert int(m.sum()) == 4 and bool(m[1, 0]) and not bool(m[0, 3]) and not bool(m[1, 3])
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 40, generator=g)
    top = torch.zeros(2000, dtype=torch.bool)
    top[torch.topk(y.abs().flatten(), 600).indices] = True
    assert torch.equal(magnitude_mask(y, 0.3).flatten(), top)


# ---------------------------------------------------------------- reference semantics
def _released_trim(x, mask_rate):
    """MLLMerging's mask_smallest_magnitude_param_values, written out: keep
    |x| >= the int(n * rate)-th smallest magnitude (computed in float32)."""
    xf = x.float()
    k = int(xf.numel() * mask_rate)
    kth = sorted(xf.abs().flatten().tolist())[k - 1]
    return (xf * (xf.abs() >= kth)).to(x.dtype)


def _reference_ties(tensors, mask_rate):
    """MLLMerging's ties_merging on one parameter: trim, sign of the sum (0 ->
    sign of the sum of signs), disjoint mean over agreeing nonzero entries."""
    trimmed = [_released_trim(t, mask_rate).float() for t in tensors]
    signs = torch.sign(sum(trimmed))
    if (signs == 0).any():
        signs[signs == 0] = torch.sign(signs.sum())
    kept = [t * (((signs > 0) & (t > 0)) | ((signs < 0) & (t < 0))) for t in trimmed]
    count = sum((k != 0).float() for k in kept)
    return sum(kept) / count.clamp(min=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_dare_ties_default_is_mllmerging_dare_then_ties(dtype, kind):
    """Default dare_ties = DARE(0.2, rescale) with our seeded masks, then the
    reference TIES with its 0.8 magnitude trim."""
    mi = (
        dense_inputs(n=3, shape=(24, 20), seed=8)
        if kind == "dense"
        else lora_inputs(seed=8, d_out=24, d_in=20)
    )
    if kind == "dense":
        mi = type(mi)(name=mi.name, task_vectors=tuple(t.to(dtype).float() for t in mi.task_vectors))
    ours = result_delta(run("dare_ties", mi, seed=3))
    g = methods.module_generator(3, mi.name)
    dared = []
    for d in mi.deltas():
        keep = torch.rand(d.shape, generator=g) >= 0.2
        dared.append(d * keep / 0.8)
    ref = _reference_ties(dared, 0.8)
    torch.testing.assert_close(ours, ref)
    peft_variant = result_delta(run("dare_ties", mi, seed=3, prune_rate=0, zero_sign="positive"))
    gap = float((peft_variant - ours).norm() / ours.norm())
    assert gap > 0.1  # the trim matters: the variant is a different merge


def test_ties_released_keep_rule_is_mllmerging_ties():
    mi = dense_inputs(n=3, shape=(16, 16), seed=4)
    tvs = tuple(t.to(torch.bfloat16).float() for t in mi.task_vectors)  # bf16 values: ties at the threshold
    mi = type(mi)(name="m", task_vectors=tvs)
    ours = result_delta(run("ties", mi, keep_rule="released"))
    # MLLMerging's zero-vote rule only differs where all trimmed values cancel; none here
    torch.testing.assert_close(ours, _reference_ties(list(tvs), 0.8))


def test_magnitude_mask_released_rule_keeps_every_tie():
    from harness_merge.methods._ops import magnitude_mask

    x = torch.tensor([[1.0, -1.0, 1.0, 0.5], [2.0, 1.0, -1.0, 0.0]])
    # prune 50%: int(0.5*8) = 4th smallest |x| is 1.0 -> keep every |x| >= 1: six entries
    m = magnitude_mask(x, 0.5, rule="released")
    assert m.tolist() == [[True, True, True, False], [True, True, True, False]]
    assert magnitude_mask(x, 0.95, rule="released").all()  # int(0.05*8) = 0 pruned


def test_magnitude_mask_exact_rule_breaks_bf16_ties_without_positional_bias():
    """bf16 task vectors tie heavily at the k-th magnitude; the exact rule keeps
    exactly k entries and draws the tied ones evenly over the rows."""
    from harness_merge.methods._ops import magnitude_mask

    g = torch.Generator().manual_seed(0)
    # a bf16 task vector theta_ft - theta_0 of 65536 entries: differences of bf16
    # numbers are multiples of their spacing, so many magnitudes tie
    base = (0.5 + 0.4 * torch.rand(128, 512, generator=g)).to(torch.bfloat16)
    ft = (base.float() + 0.02 * torch.randn(128, 512, generator=g)).to(torch.bfloat16)
    x = ft.float() - base.float()
    keep = 0.2
    k = int(keep * x.numel() + 1e-6)
    m = magnitude_mask(x, keep, generator=torch.Generator().manual_seed(1))
    assert int(m.sum()) == k
    flat = x.float().abs().flatten()
    thr = flat.sort(descending=True).values[k - 1]
    assert int((flat > thr).sum()) + int(m.flatten()[flat == thr].sum()) == k
    tied = x.float().abs() == thr
    assert int(tied.sum()) > 1000  # the case of the issue: many ties
    kept_tied_rows = (m & tied).sum(dim=1).float() / tied.sum(dim=1).clamp(min=1).float()
    share = int((m & tied).sum()) / int(tied.sum())
    top, bottom = kept_tied_rows[:32].mean().item(), kept_tied_rows[-32:].mean().item()
    assert abs(top - share) < 0.15 and abs(bottom - share) < 0.15  # first and last rows alike
    assert torch.equal(m, magnitude_mask(x, keep, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(m, magnitude_mask(x, keep, generator=torch.Generator().manual_seed(2)))
