"""PCB-Merging against a direct re-derivation (plain sort, loops) of the
released code's formulas on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from harness_merge.errors import MethodParamError
from harness_merge.methods import get, module_generator
from harness_merge.types import Dense, LoRAFactors, ModuleInputs


def _run(inp, **params):
    """One module on its own: the per-module variant (scope=model is tested
    at the end of the file through the driver's passes)."""
    params.setdefault("scope", "module")
    spec = get("pcb")
    return spec.fn(inp, spec.make_params(params), generator=module_generator(0, inp.name))


def _dense(n=3, shape=(4, 5), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ModuleInputs(
        "w",
        task_vectors=tuple(scale * torch.randn(*shape, generator=g) for _ in range(n)),
    )


def _oracle(taus, prune_rate, clamp_ratio, weights=None):
    """Element by element, in float64, from the formulas:
    clamp |tau| to sorted[int(d c)] .. sorted[int(d (1-c)) - 1];
    intra = exp(N * minmax(|tau|)^2); inter = tanh(tau_i * sum_j tau_j);
    beta = intra * inter; q = sorted(beta)[int(d p)]; s = minmax(max(beta, q));
    merged = sum_i w_i s_i clamp(tau_i) / max(sum_i s_i, 1e-12)."""
    n = len(taus)
    flat = [[float(v) for v in t.reshape(-1)] for t in taus]
    d = len(flat[0])
    weights = weights or [1.0] * n
    total = [sum(f[j] for f in flat) for j in range(d)]

    def minmax(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]

    clamped, scores = [], []
    for f in flat:
        mag = [abs(x) for x in f]
        if clamp_ratio > 0:
            srt = sorted(mag)
            lo, hi = srt[int(d * clamp_ratio)], srt[int(d * (1 - clamp_ratio)) - 1]
            mag = [min(max(x, lo), hi) for x in mag]
        clamped.append([math.copysign(m, x) if x != 0 else 0.0 for m, x in zip(mag, f)])
        intra = [math.exp(n * v * v) for v in minmax(mag)]
        inter = [math.tanh(x * tot) for x, tot in zip(f, total)]
        beta = [a * b for a, b in zip(intra, inter)]
        if prune_rate > 0:
            q = sorted(beta)[int(d * prune_rate)]
            beta = [max(b, q) for b in beta]
        scores.append(minmax(beta))
    out = []
    for j in range(d):
        num = sum(w * s[j] * c[j] for w, s, c in zip(weights, scores, clamped))
        den = max(sum(s[j] for s in scores), 1e-12)
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(taus[0].shape)


@pytest.mark.parametrize("prune_rate", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("clamp_ratio", [0.0, 1e-4, 0.1])
def test_pcb_matches_direct_rederivation(prune_rate, clamp_ratio):
    inp = _dense(n=3, shape=(4, 5), seed=1, scale=0.5)
    res = _run(inp, prune_rate=prune_rate, clamp_ratio=clamp_ratio)
    expect = _oracle(inp.task_vectors, prune_rate, clamp_ratio)
    assert isinstance(res, Dense) and res.delta.dtype == torch.float32
    assert torch.allclose(res.delta.double(), expect, rtol=1e-5, atol=1e-6)


def test_pcb_weights_and_scaling():
    inp = _dense(n=2, shape=(3, 6), seed=2)
    res = _run(inp, prune_rate=0.5, weights=[1.2, 0.8], scaling=0.5)
    expect = 0.5 * _oracle(inp.task_vectors, 0.5, 1e-4, [1.2, 0.8])
    assert torch.allclose(res.delta.double(), expect, rtol=1e-5, atol=1e-6)


def test_pcb_hand_case_two_tasks_no_drop():
    # 2 tasks, 2 entries, no clamp, no drop. Entry 0: both +1 -> agree; entry 1:
    # task 0 = +2, task 1 = -1 (task 1 disagrees with the sum +1).
    t0 = torch.tensor([[1.0, 2.0]])
    t1 = torch.tensor([[1.0, -1.0]])
    res = _run(ModuleInputs("w", task_vectors=(t0, t1)), prune_rate=0.0, clamp_ratio=0.0)
    # task 0: |.| = [1, 2] -> Norm [0, 1] -> intra [e^0, e^2]; inter [tanh(2), tanh(4)]
    b0 = [math.tanh(2.0), math.exp(2.0) * math.tanh(4.0)]
    # task 1: |.| = [1, 1] -> Norm = 0 (constant) -> intra [1, 1]; inter [tanh(2), tanh(-1)]
    b1 = [math.tanh(2.0), math.tanh(-1.0)]
    s0 = [(b - min(b0)) / (max(b0) - min(b0)) for b in b0]  # [0, 1]
    s1 = [(b - min(b1)) / (max(b1) - min(b1)) for b in b1]  # [1, 0]
    e0 = (s0[0] * 1.0 + s1[0] * 1.0) / max(s0[0] + s1[0], 1e-12)
    e1 = (s0[1] * 2.0 + s1[1] * -1.0) / max(s0[1] + s1[1], 1e-12)
    assert (s0, s1) == ([0.0, 1.0], [1.0, 0.0])
    assert torch.allclose(res.delta, torch.tensor([[e0, e1]]), atol=1e-6)
    assert torch.allclose(res.delta, torch.tensor([[1.0, 2.0]]))  # the dissenting -1 is out-balanced


def test_pcb_drop_keeps_the_top_fraction_of_scores():
    inp = _dense(n=3, shape=(10, 20), seed=3)
    from harness_merge.methods.pcb import pcb_balance

    tv = torch.stack([t.reshape(-1) for t in inp.task_vectors])
    _, score = pcb_balance(tv, prune_rate=0.9, clamp_ratio=1e-4)
    kept = (score > 0).sum(dim=1)
    assert torch.all(kept <= 20) and torch.all(kept >= 15)  # ~10% of 200, ties at the threshold drop
    assert float(score.max()) == 1.0 and float(score.min()) == 0.0


def test_pcb_lora_materialises_and_equals_dense_input():
    g = torch.Generator().manual_seed(4)
    lora = tuple(
        LoRAFactors(torch.randn(2, 7, generator=g), torch.randn(6, 2, generator=g), 0.5) for _ in range(3)
    )
    inp = ModuleInputs("q", lora=lora)
    dense = ModuleInputs("q", task_vectors=tuple(f.delta() for f in lora))
    a, b = _run(inp), _run(dense)
    assert isinstance(a, Dense) and torch.equal(a.delta, b.delta)


def test_pcb_deterministic_and_defaults():
    inp = _dense(n=3, shape=(8, 8), seed=5)
    assert torch.equal(_run(inp).delta, _run(inp).delta)
    p = get("pcb").params_cls()
    assert (p.prune_rate, p.clamp_ratio, p.scaling) == (0.9, 1e-4, 1.0)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"prune_rate": "1.0"}, r"pcb: prune_rate must be in \[0, 1\), got 1.0"),
        ({"prune_rate": "-0.1"}, r"pcb: prune_rate must be in \[0, 1\), got -0.1"),
        ({"clamp_ratio": "0.5"}, r"pcb: clamp_ratio must be in \[0, 0.5\), got 0.5"),
        ({"scaling": "-1"}, r"pcb: scaling must be >= 0, got -1.0"),
        (
            {"temperature": "2"},
            r"pcb: unknown parameter 'temperature'; known parameters: ",
        ),
    ],
)
def test_pcb_rejects_bad_params(params, match):
    with pytest.raises(MethodParamError, match=match):
        get("pcb").make_params(params)


def test_pcb_weights_length_checked():
    with pytest.raises(MethodParamError, match=r"pcb: weights has 2 values but 3 inputs"):
        _run(_dense(n=3), weights=[1.0, 1.0])


# ------------------------------------------------ scope=model: the released code
def _released_pcb(flat, pcb_ratio, clamp_ratio=1e-4):
    """PCB_merge of duguodong7/pcb-merging on the (N, D) flattened model,
    written out with sorts: clamp |tau| to sorted[int(D c)], sorted[int(D (1 -
    c)) - 1]; exp(N Norm^2) tanh(tau sum tau); clamp to sorted[int(D (1 - r))];
    Norm; sum(tau_c s) / max(sum s, 1e-12)."""
    n, d = flat.shape
    srt = flat.abs().sort(dim=1).values
    lo, hi = srt[:, int(d * clamp_ratio)].unsqueeze(1), srt[:, int(d * (1 - clamp_ratio)) - 1].unsqueeze(1)
    mag = torch.clamp(flat.abs(), lo, hi)
    clamped = torch.sign(flat) * mag
    norm = (mag - mag.min(1, keepdim=True).values) / (
        mag.max(1, keepdim=True).values - mag.min(1, keepdim=True).values
    )
    beta = torch.exp(n * norm**2) * torch.tanh(flat * flat.sum(0))
    bs = beta.sort(dim=1).values
    beta = torch.clamp(beta, bs[:, int(d * (1 - pcb_ratio))].unsqueeze(1), bs[:, d - 1].unsqueeze(1))
    score = (beta - beta.min(1, keepdim=True).values) / (
        beta.max(1, keepdim=True).values - beta.min(1, keepdim=True).values
    )
    return (clamped * score).sum(0) / score.sum(0).clamp(min=1e-12)


class _Model:
    """Duck-typed input set: three modules of three tasks."""

    kind = "dense"

    def __init__(self, mods):
        self.mods = mods
        self.refs = ["a", "b", "c"]

    @property
    def module_names(self):
        return list(self.mods)

    def is_matrix(self, name):
        return True

    def shape(self, name):
        return tuple(self.mods[name].shape)

    def read(self, name):
        m = self.mods[name]
        if m.kind == "lora":
            return m
        return ModuleInputs(name, task_vectors=m.task_vectors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "lora"])
def test_pcb_default_scope_model_is_the_released_code_on_the_flattened_model(kind, dtype):
    from harness_merge.merge_loop import iter_merged

    g = torch.Generator().manual_seed(5)
    shapes = {"q": (30, 20), "k": (10, 20), "o": (20, 30)}
    mods = {}
    for name, (a, b) in shapes.items():
        if kind == "lora":
            mods[name] = ModuleInputs(
                name,
                lora=tuple(
                    LoRAFactors(
                        torch.randn(4, b, generator=g).to(dtype).float(),
                        torch.randn(a, 4, generator=g).to(dtype).float(),
                        0.5,
                    )
                    for _ in range(3)
                ),
            )
        else:
            scale = {"q": 1.0, "k": 3.0, "o": 0.2}[name]  # modules of different magnitudes
            mods[name] = ModuleInputs(
                name,
                task_vectors=tuple(
                    (scale * torch.randn(a, b, generator=g)).to(dtype).float() for _ in range(3)
                ),
            )
    model = _Model(mods)
    spec = get("pcb")
    out = dict(iter_merged(model, spec, spec.make_params({}), progress=False))
    flat = torch.cat([torch.stack([d.reshape(-1) for d in mods[n].deltas()]) for n in shapes], dim=1)
    ref = _released_pcb(flat, pcb_ratio=0.1)
    ours = torch.cat([out[n].delta.reshape(-1) for n in shapes])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    per_module = torch.cat([_run(mods[n]).delta.reshape(-1) for n in shapes])
    assert float((per_module - ref).norm() / ref.norm()) > 0.05  # the scope matters


def test_pcb_scope_model_on_one_module_equals_scope_module():
    from harness_merge.merge_loop import iter_merged

    inp = _dense(n=3, shape=(40, 25), seed=3)
    spec = get("pcb")
    out = dict(iter_merged(_Model({"w": inp}), spec, spec.make_params({"prune_rate": 0.8}), progress=False))
    torch.testing.assert_close(out["w"].delta, _run(inp, prune_rate=0.8).delta, rtol=1e-5, atol=1e-6)


def test_pcb_scope_model_called_alone_says_what_it_needs():
    with pytest.raises(MethodParamError, match="scope=model needs the model-wide statistics"):
        _run(_dense(), scope="model")


def test_order_statistics_exact_over_chunks():
    from harness_merge.methods import _orderstat as ost

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=g).to(torch.bfloat16).float()  # many ties
    x[0, :5] = 0.0
    x[1, 3] = -0.0
    chunks = [x[:, :300], x[:, 300:700], x[:, 700:]]
    ranks = [[0, 10, 999], [500, 1, 998], [250, 750, 3]]
    bins = ost.locate(sum(ost.count_high(c) for c in chunks), ranks)
    low = None
    for c in chunks:
        part = ost.count_low(c, bins)
        low = part if low is None else [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(low, part)]
    srt = x.sort(dim=1).values
    assert ost.resolve(bins, low) == [[float(srt[r, k]) for k in ks] for r, ks in enumerate(ranks)]
