"""TSV, Iso-C, Iso-CTS and the factor-space helpers, against oracles written
here from the papers' formulas (float64 SVDs of the dense deltas)."""

from __future__ import annotations

import pytest
import torch

from harness_merge.errors import MethodParamError
from harness_merge.methods import get
from harness_merge.methods._lowrank import factor_cores, numerical_rank
from harness_merge.methods.tsv_iso import iso_cts_dims
from harness_merge.types import Dense, LoRAFactors, LowRank, ModuleInputs

from .helpers import as_dense as _dense_of
from .helpers import run_method

# Most tests below check the basis-free variant spectrum=numerical_rank against
# its own formulas; the defaults (spectrum=full, the released codes) are tested
# at the end of the file against the released semantics.


def _run(name, mi, **params):
    params.setdefault("spectrum", "numerical_rank")
    return run_method(name, mi, **params)


def _lora(n=3, r=4, d_out=24, d_in=20, seed=0, ranks=None):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [r] * n
    return ModuleInputs(
        "layers.0.q_proj",
        lora=tuple(
            LoRAFactors(
                torch.randn(ri, d_in, generator=g),
                torch.randn(d_out, ri, generator=g),
                0.5 + i,
            )
            for i, ri in enumerate(ranks)
        ),
    )


def _dense(n=3, m=10, k=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ModuleInputs("w", task_vectors=tuple(torch.randn(m, k, generator=g) for _ in range(n)))


def _svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------- oracles (float64)
def _polar(x):
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    k = int((s > s[0] * 1e-10).sum())
    return p[:, :k] @ qh[:k]


def _tsv_oracle(taus, k):
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        rank = int((s > s[0] * 1e-6).sum())
        kk = min(k, rank)
        us.append(u[:, :kk])
        ss.append(s[:kk])
        vs.append(vh[:kk].T)
    return _polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar(torch.cat(vs, 1)).T


# ----------------------------------------------------------------- _lowrank
def test_factor_cores_reconstruct_each_delta_exactly():
    inp = _lora(n=3, ranks=[2, 4, 3])
    frame, cores = factor_cores(inp.lora)
    assert frame.QB.shape == (24, 9) and frame.QA.shape == (20, 9)
    eye = torch.eye(9, dtype=torch.float64)
    assert torch.allclose(frame.QB.T @ frame.QB, eye, atol=1e-12)
    for f, c in zip(inp.lora, cores):
        assert _rel(frame.QB @ c @ frame.QA.T, f.delta()) < 1e-6


def test_numerical_rank_ignores_float32_noise_of_a_lora_delta():
    inp = _lora(n=1, r=3, d_out=64, d_in=48)
    s = _svals(inp.lora[0].delta())  # delta materialised in float32: rank 3 + noise
    assert numerical_rank(s, (64, 48)) == 3
    assert numerical_rank(torch.zeros(5), (5, 5)) == 0


# ----------------------------------------------------------------- TSV
def test_tsv_single_full_rank_task_returns_the_task():
    tau = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    res = _run("tsv", ModuleInputs("w", task_vectors=(tau,)))
    assert isinstance(res, Dense)
    assert _rel(res.delta, tau) < 1e-5


def test_tsv_tasks_with_orthogonal_supports_sum_exactly():
    g = torch.Generator().manual_seed(4)
    qu, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    qv, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    # rank 3 each (<= k = 12 // 2 = 6), disjoint left and right singular vectors
    t1 = qu[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ qv[:, :3].T
    t2 = qu[:, 3:6] @ torch.diag(torch.tensor([5.0, 0.5, 0.25])) @ qv[:, 3:6].T
    res = _run("tsv", ModuleInputs("w", task_vectors=(t1, t2)))
    assert _rel(res.delta, t1 + t2) < 1e-5


def test_tsv_matches_formula_oracle_on_full_rank_checkpoints():
    inp = _dense(n=3, m=10, k=9)
    res = _run("tsv", inp, scaling=0.7)
    expect = 0.7 * _tsv_oracle(inp.task_vectors, k=9 // 3)
    assert _rel(res.delta, expect) < 1e-5


def test_tsv_lora_factor_path_equals_dense_path():
    inp = _lora(n=3, r=4, d_out=40, d_in=36)  # k = 36 // 3 = 12 > r: capped at rank 4
    fac = _run("tsv", inp)
    den = _run("tsv", _dense_of(inp))
    assert isinstance(fac, LowRank) and isinstance(den, Dense)
    assert fac.rank <= 12
    assert _rel(fac.delta(), den.delta) < 1e-5
    assert _rel(fac.delta(), _tsv_oracle([f.delta() for f in inp.lora], k=12)) < 1e-5


def test_tsv_weights_scale_each_task_before_merging():
    inp = _dense(n=2, m=8, k=8)
    res = _run("tsv", inp, weights=[2.0, 0.5])
    taus = [2.0 * inp.task_vectors[0], 0.5 * inp.task_vectors[1]]
    assert _rel(res.delta, _tsv_oracle(taus, k=4)) < 1e-5


def test_tsv_rejects_bad_keep_fraction():
    with pytest.raises(MethodParamError, match=r"tsv: keep_fraction must be in \(0, 1\], got 0.0"):
        get("tsv").make_params({"keep_fraction": "0"})
    with pytest.raises(MethodParamError, match=r"tsv: weights has 1 values but 3 inputs"):
        _run("tsv", _lora(n=3), weights=[1.0])


# ----------------------------------------------------------------- Iso-C
def test_iso_c_flattens_spectrum_to_mean_over_numerical_rank_of_sum():
    inp = _lora(n=3, r=4, d_out=40, d_in=36)
    total = sum(f.delta() for f in inp.lora)
    s = _svals(total)
    r = int((s > s[0] * 1e-5).sum())
    assert r == 12
    res = _run("iso_c", inp, scaling=1.0)
    assert isinstance(res, LowRank) and res.rank == 12
    out = _svals(res.delta())
    assert torch.allclose(out[:r], torch.full((r,), float(s[:r].mean()), dtype=torch.float64), rtol=1e-5)
    assert float(out[r:].max()) < 1e-4 * float(out[0])


def test_iso_c_dense_full_rank_and_default_scaling():
    inp = _dense(n=2, m=9, k=7)
    res = _run("iso_c", inp)  # default scaling 1.5
    s = _svals(sum(inp.task_vectors))
    u, _, vh = torch.linalg.svd(sum(inp.task_vectors).double(), full_matrices=False)
    assert _rel(res.delta, 1.5 * s.mean() * u @ vh) < 1e-5
    assert get("iso_c").params_cls().scaling == 1.5


def test_iso_c_lora_factor_path_equals_dense_path():
    inp = _lora(n=4, r=3, d_out=50, d_in=30, seed=5)
    assert _rel(_run("iso_c", inp).delta(), _run("iso_c", _dense_of(inp)).delta) < 1e-5


# ----------------------------------------------------------------- Iso-CTS
@pytest.mark.parametrize("rank", [1, 2, 3, 7, 12, 16, 50, 97])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("frac", [0.01, 0.5, 0.8, 0.99])
def test_iso_cts_dims_fill_the_rank(rank, n, frac):
    kc, kt = iso_cts_dims(rank, n, frac)
    assert kc >= 0 and kt >= 0 and kc + n * kt == rank


@pytest.mark.parametrize("bad", ["0", "1", "1.2", "-0.1"])
def test_iso_cts_rejects_common_fraction_outside_open_unit_interval(bad):
    with pytest.raises(
        MethodParamError,
        match=rf"iso_cts: common_fraction must be in \(0, 1\), got {bad}",
    ):
        get("iso_cts").make_params({"common_fraction": bad})


def test_iso_cts_structure_flat_spectrum_and_common_subspace_kept():
    inp = _lora(n=3, r=4, d_out=40, d_in=36, seed=7)
    res = _run("iso_cts", inp, scaling=1.0, common_fraction=0.5)
    total = sum(f.delta() for f in inp.lora).double()
    u, _s, _ = torch.linalg.svd(total, full_matrices=False)
    kc, kt = iso_cts_dims(12, 3, 0.5)
    assert (kc, kt) == (6, 2) and res.info["common_dims"] == 6 and res.info["task_dims"] == 6
    d = res.delta().double()
    out = _svals(d)
    assert res.rank == 12
    assert float((out[:12].max() - out[:12].min()) / out[0]) < 1e-5  # isotropic
    # the common subspace lies in the merged column space
    uo = torch.linalg.svd(d, full_matrices=False)[0][:, :12]
    uc = u[:, :kc]
    assert float((uc - uo @ (uo.T @ uc)).norm()) < 1e-4


def test_iso_cts_without_task_dims_equals_iso_c():
    inp = _lora(n=2, r=3, d_out=30, d_in=20, seed=8)  # rank 6: f=0.95 -> kc=5, kt=round(0.5)=0
    assert iso_cts_dims(6, 2, 0.95)[1] == 0
    a = _run("iso_cts", inp, common_fraction=0.95)
    b = _run("iso_c", inp)
    assert _rel(a.delta(), b.delta()) < 1e-5


def test_iso_cts_lora_factor_path_equals_dense_path():
    inp = _lora(n=3, r=4, d_out=48, d_in=40, seed=9)
    fac, den = _run("iso_cts", inp), _run("iso_cts", _dense_of(inp))
    assert isinstance(fac, LowRank) and isinstance(den, Dense)
    assert _rel(fac.delta(), den.delta) < 1e-5


def test_iso_cts_dense_full_rank_matches_formula_oracle():
    inp = _dense(n=2, m=10, k=10, seed=10)
    res = _run("iso_cts", inp, scaling=1.0)  # r = 10, kc = 8, kt = 1
    taus = [t.double() for t in inp.task_vectors]
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vc = u[:, :8], s[:8], vh[:8].T
    us, ss, vs = [], [], []
    for t in taus:
        ut, st, vth = torch.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
        us.append(ut[:, :1])
        ss.append(st[:1])
        vs.append(vth[:1].T)
    U, S, V = torch.cat(us + [uc], 1), torch.cat(ss + [sc]), torch.cat(vs + [vc], 1)
    expect = S.mean() * _polar(U) @ _polar(V).T
    assert _rel(res.delta, expect) < 1e-5


# ----------------------------------------------------------------- all three
@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_deterministic_same_bytes(name):
    inp = _lora(n=3, r=4, seed=11)
    a, b = _run(name, inp), _run(name, inp)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert a.A.dtype == torch.float32 and a.B.dtype == torch.float32


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_mixed_ranks_and_scales_factor_equals_dense(name):
    inp = _lora(n=3, ranks=[2, 5, 3], d_out=33, d_in=27, seed=12)
    # the dense path runs float32 SVDs: singular vectors agree to ~1e-5 relative
    assert _rel(_run(name, inp).delta(), _run(name, _dense_of(inp)).delta) < 1e-4


# ----------------------------------------- defaults: the released codes' semantics
def _ref_tsv(deltas):
    """compute_and_sum_svd_mem_reduction (TSV released code) on one matrix:
    k = int(min(m, n) / N) triplets per task into zero-padded blocks, polar
    factors by SVD, U_u V_u diag(S) U_v V_v."""
    n = len(deltas)
    m = min(deltas[0].shape)
    k = int(m * (1.0 / n))
    sum_u = sum_s = sum_v = None
    for i, d in enumerate(deltas):
        u, s, v = torch.linalg.svd(d, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    return uu @ vu @ torch.diag(sum_s) @ uv @ vv


def _ref_iso_c(deltas):
    total = torch.stack(deltas).sum(0)  # the order of our sum: on LoRA the null basis follows rounding
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    return u @ torch.diag(torch.full_like(s, s.mean())) @ v


def _ref_iso_cts(deltas, frac):
    n, shape = len(deltas), deltas[0].shape
    total = torch.stack(deltas).sum(0)
    kc = int(min(shape) * frac)
    kc = min(shape) - round((min(shape) - kc) / n) * n
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    cu, cs, cv = u[:, :kc], s[:kc], v[:kc, :]
    kt = int((min(shape) - kc) / n)
    U = S = V = None
    for i, w in enumerate(deltas):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            U, S, V = torch.zeros_like(ut), torch.zeros_like(st), torch.zeros_like(vt)
        U[:, i * kt : (i + 1) * kt], S[i * kt : (i + 1) * kt], V[i * kt : (i + 1) * kt] = (
            ut[:, :kt],
            st[:kt],
            vt[:kt],
        )
    U[:, n * kt : n * kt + kc], S[n * kt : n * kt + kc], V[n * kt : n * kt + kc] = cu, cs, cv
    a, _, b = torch.linalg.svd(U, full_matrices=False)
    c, _, d = torch.linalg.svd(V, full_matrices=False)
    return (a @ b) @ torch.diag(torch.full_like(S, S.mean())) @ (c @ d)


def _inputs(kind, dtype):
    """3 tasks, min(m, n) = 12 (divisible by 3: no zero-padded TSV blocks)."""
    if kind == "lora":
        mi = _lora(n=3, r=2, d_out=18, d_in=12, seed=3)
        lora = tuple(LoRAFactors(f.A.to(dtype).float(), f.B.to(dtype).float(), f.scale) for f in mi.lora)
        return ModuleInputs(mi.name, lora=lora)
    g = torch.Generator().manual_seed(4)
    return ModuleInputs(
        "w", task_vectors=tuple(torch.randn(18, 12, generator=g).to(dtype).float() for _ in range(3))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_tsv_default_is_the_released_code(kind, dtype):
    mi = _inputs(kind, dtype)
    res = run_method("tsv", mi)
    assert isinstance(res, Dense)
    torch.testing.assert_close(res.delta, _ref_tsv(mi.deltas()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_iso_c_default_is_the_released_code(kind, dtype):
    mi = _inputs(kind, dtype)
    res = run_method("iso_c", mi, scaling=1.0)
    assert isinstance(res, Dense)
    ref = _ref_iso_c(mi.deltas())
    torch.testing.assert_close(res.delta, ref, rtol=1e-4, atol=1e-5)
    # the basis-free facts: a flat spectrum over all min(m, n) = 12 directions, at
    # the mean singular value of the sum (zeros included on LoRA)
    sv = torch.linalg.svdvals(res.delta.double())
    s_sum = torch.linalg.svdvals(torch.stack(mi.deltas()).sum(0).double())
    torch.testing.assert_close(sv, torch.full_like(sv, float(s_sum.mean())), rtol=1e-4, atol=1e-6)
    if kind == "lora":  # full rank: most of the norm outside the rank-6 LoRA subspace
        QB, _ = torch.linalg.qr(torch.cat([f.B for f in mi.lora], 1).double())
        QA, _ = torch.linalg.qr(torch.cat([f.A.T for f in mi.lora], 1).double())
        inside = QB @ (QB.T @ res.delta.double() @ QA) @ QA.T
        assert float(inside.norm()) < float((res.delta.double() - inside).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "dense"])
def test_iso_cts_default_is_the_released_code(kind, dtype):
    mi = _inputs(kind, dtype)
    res = run_method("iso_cts", mi, scaling=1.0)
    assert isinstance(res, Dense)
    torch.testing.assert_close(res.delta, _ref_iso_cts(mi.deltas(), 0.8), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_full_spectrum_equals_numerical_rank_on_full_rank_checkpoints(name):
    mi = _inputs("dense", torch.float32)
    a, b = run_method(name, mi), _run(name, mi)
    torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=1e-4)
    lora = _inputs("lora", torch.float32)
    assert isinstance(_run(name, lora), LowRank) and isinstance(run_method(name, lora), Dense)


def test_full_spectrum_states_dense_svd_cost_before_a_large_merge():
    p = get("tsv").make_params({})
    note = p.plan_note("lora", [(4096, 4096)] * 4, 3)
    assert note and "5 dense SVDs per module" in note and "spectrum=numerical_rank" in note
    assert get("tsv").make_params({"spectrum": "numerical_rank"}).plan_note("lora", [(4096, 4096)], 3) is None
    assert get("iso_c").make_params({}).plan_note("lora", [(64, 64)], 3) is None  # small: nothing to say
