"""Small seeded inputs for pure method tests."""

from __future__ import annotations

import torch

from harness_merge.types import LoRAFactors, ModuleInputs


def lora_inputs(n=3, d_out=12, d_in=10, ranks=(4, 4, 4), scales=None, seed=0, name="m") -> ModuleInputs:
    g = torch.Generator().manual_seed(seed)
    scales = scales or [2.0] * n
    factors = tuple(
        LoRAFactors(
            A=torch.randn(ranks[i], d_in, generator=g),
            B=torch.randn(d_out, ranks[i], generator=g),
            scale=scales[i],
        )
        for i in range(n)
    )
    return ModuleInputs(name=name, lora=factors)


def dense_inputs(n=3, shape=(12, 10), seed=0, name="m") -> ModuleInputs:
    g = torch.Generator().manual_seed(seed)
    return ModuleInputs(name=name, task_vectors=tuple(torch.randn(*shape, generator=g) for _ in range(n)))


def as_dense(mi: ModuleInputs) -> ModuleInputs:
    """The same updates as full-checkpoint task vectors."""
    return ModuleInputs(name=mi.name, task_vectors=tuple(mi.deltas()))


def result_delta(res) -> torch.Tensor:
    return res.delta() if hasattr(res, "A") else res.delta


def run_method(name: str, mi: ModuleInputs, **params):
    """Run registered method ``name`` on one module with string/typed params."""
    from harness_merge.methods import get, module_generator

    spec = get(name)
    return spec.fn(mi, spec.make_params(params), generator=module_generator(0, mi.name))
