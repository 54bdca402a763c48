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
    ref = merge_utils.ties(list(mi.task_vectors), torch.tensor(weights), density=0.25, majority_sign_method=sign)
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
    ours = result_delta(run("dare_ties", mi, drop_rate=0.0))
    ref = merge_utils.ties(list(mi.task_vectors), torch.ones(3), density=1.0)
    torch.testing.assert_close(ours, ref)


def test_dare_ties_matches_peft_with_same_masks(monkeypatch):
    """Feed peft's dare_ties the masks our generator draws: equal outputs."""
    mi = dense_inputs(n=3, shape=(30, 20), seed=2)
    p = 0.5
    ours = result_delta(run("dare_ties", mi, drop_rate=p, seed=4))
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


@pytest.mark.parametrize("name,bad,match", [
    ("ties", {"prune_rate": "1.0"}, r"ties: prune_rate must be in \[0, 1\), got 1.0"),
    ("ties", {"prune_rate": "-0.1"}, r"prune_rate must be in \[0, 1\)"),
    ("dare", {"drop_rate": "1"}, r"dare: drop_rate must be in \[0, 1\)"),
    ("ties", {"majority_sign": "most"}, "majority_sign must be one of total, frequency"),
    ("dare", {"seed": "1.5"}, "seed must be int"),
])
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
