import pytest
import torch

from harness_merge import methods
from harness_merge.errors import MethodParamError
from harness_merge.types import LowRank

from .helpers import as_dense, dense_inputs, lora_inputs, result_delta


def run(name, mi, **params):
    spec = methods.get(name)
    return spec.fn(mi, spec.make_params(params), generator=methods.module_generator(0, mi.name))


def test_ta_lora_is_exact_lowrank_sum():
    mi = lora_inputs(ranks=(2, 3, 4), scales=[1.0, 2.0, 0.5])
    res = run("ta", mi, scaling=0.7, weights="[1, 2, 3]")
    assert isinstance(res, LowRank) and res.rank == 2 + 3 + 4
    expected = 0.7 * sum(w * f.scale * f.B @ f.A for w, f in zip([1, 2, 3], mi.lora))
    torch.testing.assert_close(res.delta(), expected, rtol=1e-5, atol=1e-5)


def test_ta_dense_equals_lora():
    mi = lora_inputs()
    torch.testing.assert_close(
        result_delta(run("ta", mi, scaling=0.3)),
        result_delta(run("ta", as_dense(mi), scaling=0.3)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_ta_single_adapter_gives_its_delta():
    mi = lora_inputs(n=1, ranks=(4,))
    torch.testing.assert_close(result_delta(run("ta", mi)), mi.lora[0].scale * mi.lora[0].B @ mi.lora[0].A)


def test_wa_normalises_weights():
    mi = dense_inputs()
    res = run("wa", mi, weights=[1, 1, 2])
    expected = (mi.task_vectors[0] + mi.task_vectors[1] + 2 * mi.task_vectors[2]) / 4
    torch.testing.assert_close(result_delta(res), expected)


def test_weights_length_checked_against_inputs():
    spec = methods.get("ta")
    p = spec.make_params({"weights": "1,2"})
    with pytest.raises(MethodParamError, match="weights has 2 values but 3 inputs"):
        p.check_inputs(3)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"scaling": "-1"}, "scaling must be >= 0"),
        ({"scaling": "abc"}, "scaling must be float"),
        ({"lambda": "1"}, "unknown parameter 'lambda'; known parameters: scaling, weights"),
    ],
)
def test_bad_params(bad, match):
    with pytest.raises(MethodParamError, match=match):
        methods.get("ta").make_params(bad)


def test_unknown_method_lists_alternatives():
    with pytest.raises(
        MethodParamError, match=r"unknown method 'tiez'. Did you mean: ties.*Available: .*copa"
    ):
        methods.get("tiez")
