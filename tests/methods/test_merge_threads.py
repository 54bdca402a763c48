"""Modules merged on a thread pool give the results of the sequential loop,
in the same order, for every thread count; a bad HARNESS_MERGE_THREADS is a
clear error; an error in one module surfaces as in the sequential loop."""

from __future__ import annotations

import pytest
import torch

from harness_merge import methods
from harness_merge.errors import MethodParamError
from harness_merge.merge_loop import _ordered_map, iter_merged, merge_threads
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

    def read(self, name):
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
    monkeypatch.delenv("HARNESS_MERGE_THREADS", raising=False)
    assert merge_threads() == 1
    monkeypatch.setenv("HARNESS_MERGE_THREADS", "3")
    assert merge_threads() == 3
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
