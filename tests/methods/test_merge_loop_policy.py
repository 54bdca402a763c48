"""The driver's policy for tensors that are not linear maps (nonlinear=average|method)
and its cost note, on a duck-typed in-memory checkpoint set."""

from __future__ import annotations

import logging

import pytest
import torch

from harness_merge import methods
from harness_merge.errors import MethodParamError
from harness_merge.merge_loop import iter_merged, validate_plan
from harness_merge.types import ModuleInputs


class FakeCheckpoints:
    """Task vectors of 3 checkpoints: a q_proj, an embedding, an lm_head, a norm."""

    kind = "dense"

    def __init__(self, shapes=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.shapes = shapes or {
            "model.embed_tokens.weight": (16, 8),
            "model.layers.0.q_proj.weight": (8, 8),
            "model.norm.weight": (8,),
            "lm_head.weight": (16, 8),
        }
        self.refs = ["a", "b", "c"]
        self.tv = {k: [torch.randn(*s, generator=g) for _ in self.refs] for k, s in self.shapes.items()}

    @property
    def module_names(self):
        return list(self.shapes)

    def shape(self, name):
        return self.shapes[name]

    def is_matrix(self, name):
        return len(self.shapes[name]) == 2 and not any(w in name for w in ("embed_tokens", "lm_head"))

    def read(self, name):
        return ModuleInputs(name=name, task_vectors=tuple(self.tv[name]))


def merged(method, inputs, **params):
    spec = methods.get(method)
    p = spec.make_params(params)
    validate_plan(inputs, spec, p)
    return {
        k: (r.delta if hasattr(r, "delta") and not callable(r.delta) else r.delta())
        for k, r in iter_merged(inputs, spec, p, progress=False)
    }


@pytest.mark.parametrize("method", ["ta", "ties", "tsv"])
def test_default_averages_non_linear_tensors_whatever_the_method(method):
    ck = FakeCheckpoints()
    out = merged(method, ck, scaling=0.5)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(out[name], torch.stack(ck.tv[name]).mean(0))  # no lambda


def test_nonlinear_method_is_mergekits_treatment_for_task_arithmetic():
    """mergekit's task_arithmetic on every tensor: lambda * sum_i w_i tau_i
    (normalize off), embeddings, lm_head and norms included."""
    ck = FakeCheckpoints(seed=1)
    w = [0.2, 0.3, 0.5]
    out = merged("ta", ck, scaling=0.7, weights=w, nonlinear="method")
    for name in ck.module_names:
        expected = 0.7 * sum(wi * t for wi, t in zip(w, ck.tv[name]))
        torch.testing.assert_close(out[name], expected)


def test_nonlinear_method_runs_ties_on_norms_and_embeddings():
    ck = FakeCheckpoints(seed=2)
    out = merged("ties", ck, nonlinear="method", prune_rate=0.5)
    from peft.utils import merge_utils

    for name in ("model.norm.weight", "lm_head.weight"):
        ref = merge_utils.ties(ck.tv[name], torch.ones(3), density=0.5)
        torch.testing.assert_close(out[name], ref)


def test_nonlinear_method_refuses_matrix_methods_on_1d_tensors():
    spec = methods.get("tsv")
    with pytest.raises(
        MethodParamError,
        match=r"tsv: nonlinear=method .* model.norm.weight has shape \(8,\).*nonlinear=average",
    ):
        validate_plan(FakeCheckpoints(), spec, spec.make_params({"nonlinear": "method"}))
    ck = FakeCheckpoints(shapes={"model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8)})
    out = merged("tsv", ck, nonlinear="method")  # 2-D embeddings: fine
    assert not torch.allclose(out["lm_head.weight"], torch.stack(ck.tv["lm_head.weight"]).mean(0))


def test_nonlinear_is_recorded_in_the_params_record():
    p = methods.get("ta").make_params({"nonlinear": "method"})
    assert p.as_dict()["nonlinear"] == "method"
    assert methods.get("copa").make_params({}).as_dict()["nonlinear"] == "average"
    with pytest.raises(MethodParamError, match="nonlinear must be one of average, method"):
        methods.get("ta").make_params({"nonlinear": "all"})


def test_dense_wudi_cost_is_said_before_the_merge(caplog):
    ck = FakeCheckpoints(shapes={f"model.layers.{i}.q_proj.weight": (1024, 1024) for i in range(2)})
    spec = methods.get("wudi")
    with caplog.at_level(logging.WARNING, logger="harness_merge.merge_loop"):
        note = validate_plan(ck, spec, spec.make_params({}))
    assert note and "TFLOP" in note and note in caplog.text
