"""Modules merged on a thread pool give the results of the sequential loop,
in the same order, for every thread count; a bad HARNESS_MERGE_THREADS is a
clear error; an error in one module surfaces as in the sequential loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness_merge import methods
from harness_merge.errors import MethodParamError
from harness_merge.merge_loop import FACTOR_THREADS, _ordered_map, factor_threads, iter_merged, merge_threads
from harness_merge.types import LoRAFactors, ModuleInputs


class _Set:
    kind = "lora"

    def __init__(self, n_modules=9, n=3):
        g = torch.Generator().manual_seed(0)
        self.mods = {
            f"layers.{i}.q_proj": tuple(
                LoRAFactors(A=torch.randn(4, 32, generator=g), B=torch.randn(24, 4, generator=g), scale=2.0)
                for _ in range(n)
            )
            for i in range(n_modules)
        }
        self.module_names = list(self.mods)

    def read(self, name, *, stored_dtype=False):
        return ModuleInputs(name=name, lora=self.mods[name])

    def is_matrix(self, name):
        return True


@pytest.mark.parametrize("method,params", [("copa", {}), ("dare", {"drop_rate": 0.5}), ("ta", {})])
def test_thread_counts_give_the_sequential_results(method, params):
    spec = methods.get(method)
    p = spec.make_params(params)
    inputs = _Set()
    seq = list(iter_merged(inputs, spec, p, progress=False, threads=1))
    assert [n for n, _ in seq] == inputs.module_names
    for t in (2, 3, 8):
        par = list(iter_merged(inputs, spec, p, progress=False, threads=t))
        assert [n for n, _ in par] == inputs.module_names
        for (_, a), (_, b) in zip(seq, par):
            pairs = [(a.A, b.A), (a.B, b.B)] if hasattr(a, "A") else [(a.delta, b.delta)]
            for x, y in pairs:
                assert torch.equal(x, y)


def test_merge_threads_env(monkeypatch):
    import os

    monkeypatch.delenv("HARNESS_MERGE_THREADS", raising=False)
    assert merge_threads() == 1
    assert merge_threads(5) == 5
    assert factor_threads() == min(len(os.sched_getaffinity(0)), FACTOR_THREADS)
    monkeypatch.setenv("HARNESS_MERGE_THREADS", "3")
    assert merge_threads() == merge_threads(5) == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("HARNESS_MERGE_THREADS", bad)
        with pytest.raises(
            MethodParamError, match=f"HARNESS_MERGE_THREADS must be a whole number >= 1, got '{bad}'"
        ):
            merge_threads()


def test_ordered_map_raises_the_first_error_in_order_and_stops():
    done = []

    def f(x):
        done.append(x)
        if x == 3:
            raise ValueError("module 3 is bad")
        return x * 10

    it = _ordered_map(f, list(range(50)), 2)
    assert [next(it) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(ValueError, match="module 3 is bad"):
        next(it)
    assert max(done) < 10  # at most workers + 1 calls ahead: the rest never ran


def test_factor_space_merges_run_on_one_intra_op_thread_and_restore_it():
    """A LoRA merge that stays factors for a consumer that only casts them
    (``stored_dtype``) runs torch on one intra-op thread (a result then does not
    depend on the thread or core count); the caller's setting comes back, also
    when the loop is left early. Other merges keep torch's threads."""
    seen = []

    def probe(inputs, params, *, generator=None):
        seen.append(torch.get_num_threads())
        return methods.get("ta").fn(inputs, params, generator=generator)

    spec = dataclasses.replace(methods.get("ta"), fn=probe)
    p = spec.make_params({})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = list(iter_merged(_Set(n_modules=4), spec, p, progress=False, threads=2, stored_dtype=True))
        assert len(out) == 4 and seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
        it = iter_merged(_Set(n_modules=4), spec, p, progress=False, threads=2, stored_dtype=True)
        next(it)
        assert torch.get_num_threads() == 1
        it.close()
        assert torch.get_num_threads() == 2
        seen.clear()  # a consumer that does more than cast (e.g. the full-weights writer)
        list(iter_merged(_Set(n_modules=2), spec, p, progress=False, threads=1))
        assert seen == [2, 2]
        seen.clear()  # a dense result (factored by SVD in the writer's thread)
        dense = dataclasses.replace(spec, lowrank_on_lora=False)
        list(iter_merged(_Set(n_modules=2), dense, p, progress=False, threads=1, stored_dtype=True))
        assert seen == [2, 2]
    finally:
        torch.set_num_threads(before)
