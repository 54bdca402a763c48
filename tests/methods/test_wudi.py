"""WUDI and WUDI v2: the loss is evaluated here from the papers' formulas on
dense tensors (float64), independently of the method's own code."""

from __future__ import annotations

import time

import pytest
import torch

from harness_merge.errors import MergeError, MethodParamError
from harness_merge.methods import get
from harness_merge.types import Dense, LoRAFactors, LowRank, ModuleInputs

from .helpers import as_dense as _dense_of
from .helpers import run_method as _run


def _lora(n=3, r=3, d_out=20, d_in=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ModuleInputs(
        "layers.1.v_proj",
        lora=tuple(
            LoRAFactors(
                torch.randn(r, d_in, generator=g),
                0.3 * torch.randn(d_out, r, generator=g),
                2.0 / r,
            )
            for _ in range(n)
        ),
    )


def _dense(n=3, m=8, k=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ModuleInputs("w", task_vectors=tuple(torch.randn(m, k, generator=g) for _ in range(n)))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------- oracles
def wudi_loss(x, taus, weights=None):
    """sum_i w_i ||(x - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 (the WUDI paper's eq.)."""
    weights = weights or [1.0] * len(taus)
    x = x.double()
    return sum(
        w * float(((x - t.double()) @ t.double().T).norm() ** 2) / float(t.double().norm() ** 2)
        for w, t in zip(weights, taus)
    )


def wudi2_loss(x, taus, k):
    """Paper 004 (LoRA recipe): sum_i ||(x - U_k S_k V_k^T)(S_k V_k^T)^T||^2 / ||tau_i||^2."""
    x, total = x.double(), 0.0
    for t in taus:
        t = t.double()
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        tk = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        xi = torch.diag(s[:k]) @ vh[:k]
        total += float(((x - tk) @ xi.T).norm() ** 2) / float(t.norm() ** 2)
    return total


def wudi_normal_equations(taus):
    """G = sum_i tau_i^T tau_i / ||tau_i||^2, H = sum_i tau_i tau_i^T tau_i / ||tau_i||^2."""
    G = sum(t.double().T @ t.double() / float(t.double().norm() ** 2) for t in taus)
    H = sum(t.double() @ t.double().T @ t.double() / float(t.double().norm() ** 2) for t in taus)
    return G, H


# ----------------------------------------------------------------- WUDI
def test_wudi_adam_lowers_the_loss_towards_the_closed_form():
    inp = _dense(n=3, m=8, k=6)
    taus = list(inp.task_vectors)
    init = sum(taus)
    it = _run("wudi", inp, lr=1e-2, iterations=400)
    cf = _run("wudi", inp, solver="closed_form")
    l0, lit, lcf = (
        wudi_loss(init, taus),
        wudi_loss(it.delta, taus),
        wudi_loss(cf.delta, taus),
    )
    assert lcf <= lit + 1e-6 * l0  # the closed form is the minimum
    assert lit < l0
    assert (lit - lcf) < 0.05 * (l0 - lcf)  # Adam got 95% of the way


def test_wudi_closed_form_satisfies_the_normal_equations():
    inp = _dense(n=3, m=8, k=6, seed=2)  # G is 6x6 of full rank: unique minimiser
    x = _run("wudi", inp, solver="closed_form").delta.double()
    G, H = wudi_normal_equations(inp.task_vectors)
    assert float((x @ G - H).norm() / H.norm()) < 1e-5


def test_wudi_paper_defaults():
    p = get("wudi").params_cls()
    assert (p.iterations, p.scaling, p.solver, p.space) == (
        300,
        1.0,
        "iterative",
        "dense",
    )
    assert p.resolved("dense") == {
        "optimizer": "adam",
        "lr": 1e-5,
        "init": "sum",
        "center": False,
    }


def test_wudi_lora_space_dense_equals_checkpoint_input_exactly():
    inp = _lora()
    a = _run("wudi", inp, space="dense", lr=1e-3, iterations=50)
    b = _run("wudi", _dense_of(inp), lr=1e-3, iterations=50)
    assert isinstance(a, Dense) and torch.equal(a.delta, b.delta)


def test_wudi_lora_factor_adam_lowers_loss_and_stays_low_rank():
    inp = _lora(n=3, r=3)
    taus = [f.delta() for f in inp.lora]
    res = _run("wudi", inp, lr=1e-2, iterations=300, space="factor")
    assert isinstance(res, LowRank) and res.rank <= 9
    assert wudi_loss(res.delta(), taus) < wudi_loss(sum(taus), taus)


@pytest.mark.parametrize("solver", ["closed_form", "iterative"])
def test_wudi_sgd_and_closed_form_factor_path_equal_dense_path(solver):
    inp = _lora(n=3, r=3, seed=3)
    kw = {"optimizer": "sgd", "lr": 0.05, "iterations": 100, "solver": solver}
    fac, den = _run("wudi", inp, space="factor", **kw), _run("wudi", _dense_of(inp), **kw)
    assert isinstance(fac, LowRank) and isinstance(den, Dense)
    assert _rel(fac.delta(), den.delta) < 1e-4


def test_wudi_weights_scale_loss_terms():
    inp = _dense(n=2, m=6, k=5, seed=4)
    taus = list(inp.task_vectors)
    x = _run("wudi", inp, solver="closed_form", weights=[3.0, 0.0]).delta
    # only task 0 counts: its own minimiser in its row space, init elsewhere
    assert wudi_loss(x, taus, [3.0, 0.0]) < 1e-8 * wudi_loss(sum(taus), taus, [3.0, 0.0])


# ----------------------------------------------------------------- WUDI v2
def test_wudi2_recipes():
    """Default recipe qwen2vl (the released Qwen2-VL script) for every input
    kind; internvl; by_input (the former default) picks by input kind."""
    sgd = {"optimizer": "sgd", "lr": 1e-4, "init": "mean", "center": False}
    adam = {"optimizer": "adam", "lr": 1e-5, "init": "sum", "center": True}
    p = get("wudi2").params_cls()
    assert p.resolved("lora") == sgd and p.resolved("dense") == sgd
    internvl = get("wudi2").make_params({"recipe": "internvl"})
    assert internvl.resolved("lora") == adam and internvl.resolved("dense") == adam
    by_input = get("wudi2").make_params({"recipe": "by_input"})
    assert by_input.resolved("lora") == sgd and by_input.resolved("dense") == adam
    over = get("wudi2").make_params({"recipe": "internvl", "init": "mean", "optimizer": "sgd"})
    assert over.resolved("dense") == {"optimizer": "sgd", "lr": 1e-4, "init": "mean", "center": True}
    assert (p.iterations, p.momentum, p.rank) == (300, 0.9, None)


def test_wudi2_lora_factor_equals_dense_with_same_recipe():
    inp = _lora(n=3, r=3, d_out=24, d_in=18, seed=5)
    kw = {
        "optimizer": "sgd",
        "init": "mean",
        "center": "no",
        "lr": 0.05,
        "iterations": 200,
    }
    fac, den = _run("wudi2", inp, **kw), _run("wudi2", _dense_of(inp), **kw)
    assert isinstance(fac, LowRank)
    assert _rel(fac.delta(), den.delta) < 1e-4


def test_wudi2_iterative_vs_closed_form_loss_and_time(capsys):
    """SGD (momentum 0.9) from the mean converges to the closed form (the
    minimiser nearest the init); records both losses and wall times."""
    inp = _lora(n=4, r=3, d_out=24, d_in=20, seed=6)
    taus = [f.delta() for f in inp.lora]
    k = min(24, 20) // 4  # 5 > r = 3: targets are the tau_i themselves
    t0 = time.perf_counter()
    it = _run("wudi2", inp, lr=0.05, iterations=600)
    t1 = time.perf_counter()
    cf = _run("wudi2", inp, solver="closed_form")
    t2 = time.perf_counter()
    l0 = wudi2_loss(sum(taus) / 4, taus, k)
    lit, lcf = wudi2_loss(it.delta(), taus, k), wudi2_loss(cf.delta(), taus, k)
    with capsys.disabled():
        print(
            f"\nwudi2 loss init {l0:.4g} iterative {lit:.4g} ({(t1 - t0) * 1e3:.1f} ms) "
            f"closed form {lcf:.4g} ({(t2 - t1) * 1e3:.1f} ms)"
        )
    assert lcf <= lit + 1e-6 * l0 and lit < l0
    assert (lit - lcf) < 1e-3 * (l0 - lcf)
    assert _rel(it.delta(), cf.delta()) < 1e-3


def test_wudi2_closed_form_satisfies_its_normal_equations():
    inp = _dense(n=2, m=10, k=8, seed=7)  # k = 8 // 2 = 4 < rank: real truncation
    taus = [t.double() for t in inp.task_vectors]
    x = _run("wudi2", inp, solver="closed_form", center="no").delta.double()
    G = torch.zeros(8, 8, dtype=torch.float64)
    H = torch.zeros(10, 8, dtype=torch.float64)
    for t in taus:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        xi = torch.diag(s[:4]) @ vh[:4]  # S_k V_k^T
        Gi = xi.T @ xi
        tk = u[:, :4] @ xi
        G += Gi / float(t.norm() ** 2)
        H += tk @ Gi / float(t.norm() ** 2)
    # G has rank 8 here (two 4-dim row spaces): the solution is unique
    assert float((x @ G - H).norm() / H.norm()) < 1e-5


def test_wudi2_centred_targets_for_checkpoints():
    inp = _dense(n=3, m=9, k=9, seed=8)
    taus = [t.double() for t in inp.task_vectors]
    x = _run("wudi2", inp, solver="closed_form", recipe="internvl").delta.double()  # centred
    mean = sum(taus) / 3
    G = torch.zeros(9, 9, dtype=torch.float64)
    H = torch.zeros(9, 9, dtype=torch.float64)
    for t in taus:
        _, s, vh = torch.linalg.svd(t, full_matrices=False)
        xi = torch.diag(s[:3]) @ vh[:3]
        uc, sc, vch = torch.linalg.svd(t - mean, full_matrices=False)
        target = uc[:, :3] @ torch.diag(sc[:3]) @ vch[:3] + mean
        G += xi.T @ xi / float(t.norm() ** 2)
        H += target @ xi.T @ xi / float(t.norm() ** 2)
    # dense-path targets come from float32 SVDs; G's conditioning amplifies that
    assert float((x @ G - H).norm() / H.norm()) < 5e-4


# ----------------------------------------------------------------- both
@pytest.mark.parametrize("name", ["wudi", "wudi2"])
def test_deterministic_same_bytes(name):
    inp = _lora(seed=9)
    a, b = _run(name, inp, iterations=20, space="factor"), _run(name, inp, iterations=20, space="factor")
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"iterations": "0"}, r"wudi2: iterations must be >= 1, got 0"),
        ({"lr": "-1e-4"}, r"wudi2: lr must be a positive number, got -0.0001"),
        ({"momentum": "1"}, r"wudi2: momentum must be in \[0, 1\), got 1.0"),
        ({"rank": "0"}, r"wudi2: rank must be >= 1, got 0"),
        ({"weights": "[1,-1]"}, r"wudi2: weights must be >= 0"),
        (
            {"optimizer": "lbfgs"},
            r"wudi2: optimizer must be one of auto, adam, sgd, got 'lbfgs'",
        ),
        ({"solver": "exact"}, r"wudi2: solver must be one of iterative, closed_form"),
    ],
)
def test_wudi2_rejects_bad_params(params, match):
    with pytest.raises(MethodParamError, match=match):
        get("wudi2").make_params(params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_wudi_rejects_cuda_without_a_gpu():
    with pytest.raises(
        MethodParamError,
        match=r"wudi: device is not available on this machine; use device=cpu",
    ):
        get("wudi").make_params({"device": "cuda"})


def test_wudi_space_factor_needs_lora():
    with pytest.raises(MethodParamError, match=r"wudi: space=factor needs LoRA inputs"):
        _run("wudi", _dense(), space="factor")


def test_wudi_divergence_is_reported():
    with pytest.raises(
        MergeError,
        match=r"layers.1.v_proj: the WUDI optimisation diverged \(sgd, lr=1000.0\)",
    ):
        _run("wudi", _lora(), optimizer="sgd", lr=1e3, iterations=300)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimiser_arithmetic_matches_torch_optim(optimizer):
    """The in-house steps reproduce torch.optim.Adam / SGD(momentum) (the
    released WUDI code's optimisers) on the same gradients."""
    from harness_merge.methods.wudi import _adam_steps, _sgd_steps

    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(6, 5, generator=g)
    G = torch.randn(5, 5, generator=g)
    G = G @ G.T / 5
    H = torch.randn(6, 5, generator=g)
    ours = x0.clone()
    step = _adam_steps(ours, 1e-2) if optimizer == "adam" else _sgd_steps(ours, 1e-2, 0.9)
    ref = torch.nn.Parameter(x0.clone())
    opt = (
        torch.optim.Adam([ref], lr=1e-2)
        if optimizer == "adam"
        else torch.optim.SGD([ref], lr=1e-2, momentum=0.9)
    )
    for _ in range(40):
        step(2.0 * (ours @ G - H))
        ref.grad = 2.0 * (ref.detach() @ G - H)
        opt.step()
    assert torch.allclose(ours, ref.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------- defaults: the released code, by autograd
def _released_wudi(taus, iters, lr):
    """MLLMerging wudi_merging on one matrix: Adam(lr) from the sum on
    sum_i ||(x - tau_i) tau_i^T||^2 / ||tau_i||^2, gradients by autograd."""
    v = torch.stack(taus).float()
    x = torch.nn.Parameter(v.sum(0).clone())
    opt = torch.optim.Adam([x], lr=lr)
    norms = v.reshape(len(taus), -1).norm(dim=-1) ** 2
    for _ in range(iters):
        opt.zero_grad()
        inner = torch.matmul(x.unsqueeze(0) - v, v.transpose(1, 2))
        (inner.square() / norms[:, None, None]).sum().backward()
        opt.step()
    return x.detach()


def _released_wudi2(taus, iters, *, sgd: bool, lr: float, centred: bool):
    """MLLMerging wudi_merging2 (LLaMA-Factory: SGD momentum 0.9 from the mean,
    uncentred targets; InternVL: Adam from the sum, centred targets)."""
    v = torch.stack(taus).float()
    n = v.shape[0]
    avg = v.mean(0)
    k = int(min(v.shape[1:]) / n)
    lows, tgts = [], []
    for t in v:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        lows.append(torch.diag(s[:k]) @ vh[:k])
        if centred:
            u2, s2, v2 = torch.linalg.svd(t - avg, full_matrices=False)
            tgts.append(u2[:, :k] @ torch.diag(s2[:k]) @ v2[:k] + avg)
        else:
            tgts.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    low, tgt = torch.stack(lows), torch.stack(tgts)
    x = torch.nn.Parameter((avg if sgd else v.sum(0)).clone())
    opt = torch.optim.SGD([x], lr=lr, momentum=0.9) if sgd else torch.optim.Adam([x], lr=lr)
    norms = v.reshape(n, -1).norm(dim=-1) ** 2
    for _ in range(iters):
        inner = torch.matmul(x.unsqueeze(0) - tgt, low.transpose(1, 2))
        loss = (inner.square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def _bf16(mi, dtype):
    if mi.kind == "lora":
        return ModuleInputs(
            mi.name,
            lora=tuple(LoRAFactors(f.A.to(dtype).float(), f.B.to(dtype).float(), f.scale) for f in mi.lora),
        )
    return ModuleInputs(mi.name, task_vectors=tuple(t.to(dtype).float() for t in mi.task_vectors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_wudi_default_is_released_dense_adam(kind, dtype):
    """Default wudi on LoRA runs Adam on the dense delta (Dense result) and
    follows the released code's trajectory (lr raised so 40 steps move)."""
    inp = _bf16(
        _lora(n=3, r=3, d_out=20, d_in=16, seed=11) if kind == "lora" else _dense(m=12, k=10, seed=11), dtype
    )
    res = _run("wudi", inp, iterations=40, lr=1e-2)
    assert isinstance(res, Dense)
    ref = _released_wudi(inp.deltas(), 40, 1e-2)
    torch.testing.assert_close(res.delta, ref, rtol=1e-4, atol=1e-5)


def test_wudi_factor_space_is_a_different_optimisation():
    inp = _lora(n=3, r=3, seed=12)
    dense = _run("wudi", inp, iterations=60, lr=1e-2)
    factor = _run("wudi", inp, iterations=60, lr=1e-2, space="factor")
    assert isinstance(factor, LowRank) and isinstance(dense, Dense)
    assert _rel(factor.delta(), dense.delta) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_wudi2_default_is_released_qwen2vl_script(kind, dtype):
    """Default wudi2 = the released LLaMA-Factory (Qwen2-VL) script for LoRA
    and for checkpoints alike: SGD momentum 0.9 from the mean."""
    inp = _bf16(
        _lora(n=3, r=3, d_out=24, d_in=18, seed=13) if kind == "lora" else _dense(m=12, k=9, seed=13), dtype
    )
    res = _run("wudi2", inp, iterations=50, lr=0.05)
    ref = _released_wudi2(inp.deltas(), 50, sgd=True, lr=0.05, centred=False)
    d = res.delta() if isinstance(res, LowRank) else res.delta
    torch.testing.assert_close(d, ref, rtol=1e-3, atol=1e-4)


def test_wudi2_internvl_recipe_is_released_internvl_script():
    inp = _dense(m=12, k=9, seed=14)
    res = _run("wudi2", inp, recipe="internvl", iterations=50, lr=1e-2)
    ref = _released_wudi2(inp.deltas(), 50, sgd=False, lr=1e-2, centred=True)
    torch.testing.assert_close(res.delta, ref, rtol=1e-3, atol=1e-4)


def test_wudi_dense_plan_note_states_cost_before_start():
    p = get("wudi").params_cls()
    note = p.plan_note("lora", [(4096, 4096)] * 8, 3)
    assert note and "TFLOP" in note and "on this CPU" in note and "space=factor" in note
    assert get("wudi").make_params({"space": "factor"}).plan_note("lora", [(4096, 4096)] * 8, 3) is None
    assert p.plan_note("lora", [(16, 16)], 3) is None  # tiny: nothing to say
    assert get("wudi").make_params({"solver": "closed_form"}).plan_note("dense", [(4096, 4096)], 3) is None


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; CPU twin: test_wudi_default_is_released_dense_adam",
)
def test_wudi_dense_on_gpu_equals_cpu():
    inp = _lora(n=3, r=3, d_out=64, d_in=48, seed=15)
    cpu = _run("wudi", inp, iterations=40, lr=1e-2)
    gpu = _run("wudi", inp, iterations=40, lr=1e-2, device="cuda")
    torch.testing.assert_close(gpu.delta, cpu.delta, rtol=1e-4, atol=1e-5)


def test_wudi2_space_auto_is_factor_only_where_exact():
    """auto: SGD (default recipe) in factor space, LowRank; Adam (internvl
    recipe) on the dense delta, the released trajectory."""
    inp = _lora(n=3, r=3, d_out=24, d_in=18, seed=16)
    assert isinstance(_run("wudi2", inp, iterations=5), LowRank)
    res = _run("wudi2", inp, recipe="internvl", iterations=30, lr=1e-2)
    assert isinstance(res, Dense)
    ref = _released_wudi2(inp.deltas(), 30, sgd=False, lr=1e-2, centred=True)
    torch.testing.assert_close(res.delta, ref, rtol=1e-3, atol=1e-4)
    assert get("wudi2").returns_lowrank(get("wudi2").make_params({}))
    assert not get("wudi2").returns_lowrank(get("wudi2").make_params({"recipe": "internvl"}))
    assert not get("wudi").returns_lowrank(get("wudi").make_params({}))
