"""The radix selection behind copa's released-rule masks, against a sort (the
oracle) and against magnitude_mask(rule="released") (the same masks)."""

import pytest
import torch

from harness_merge.methods._ops import (
    kth_largest_magnitude,
    magnitude_mask,
    magnitude_mask_released,
)


def _cases():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (5,), (16, 64), (257, 3)]:
        yield torch.randn(*shape, generator=g)
        yield torch.randint(-3, 4, shape, generator=g) * 0.5  # ties and zeros
        yield torch.randn(*shape, generator=g) * 1e-40  # subnormals
        yield torch.randn(*shape, generator=g) * 1e30
        yield torch.randn(*shape, generator=g).to(torch.bfloat16).float()  # bf16 values: many ties
        yield torch.zeros(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_kth_largest_magnitude_equals_a_sort(dtype):
    for x in _cases():
        x = x.to(dtype)
        n = x.numel()
        ordered = x.abs().double().reshape(-1).sort(descending=True).values
        for k in sorted({1, 2, n // 2 + 1, n - int(0.8 * n) + 1, n} & set(range(1, n + 1))):
            got = kth_largest_magnitude(x, k)
            assert got.dtype == dtype and float(got) == float(ordered[k - 1]), (tuple(x.shape), k)


def test_kth_largest_magnitude_non_contiguous_and_bad_k():
    x = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))[:, ::2]
    assert float(kth_largest_magnitude(x, 7)) == float(x.abs().reshape(-1).sort(descending=True).values[6])
    with pytest.raises(ValueError, match=r"k must be in \[1, 300\], got 0"):
        kth_largest_magnitude(x, 0)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.999, 1e-4, 1.0])
def test_released_masks_are_magnitude_mask_released(keep):
    for x in _cases():
        assert torch.equal(magnitude_mask_released(x, keep), magnitude_mask(x, keep, rule="released"))
        assert torch.equal(
            magnitude_mask_released(x, keep, magnitude=x.abs()), magnitude_mask(x, keep, rule="released")
        )


@pytest.mark.parametrize("prune", [0.8, 0.5, 0.0, 0.9999])
def test_prune_magnitude_released_keeps_what_a_sort_keeps(prune):
    """The hardshrink path of prune_magnitude against a sort's threshold (the oracle)."""
    from harness_merge.methods._ops import prune_magnitude

    for x in _cases():
        n = x.numel()
        j = int(prune * n + 1e-6)
        if j <= 0:
            want = x
        else:
            t = x.abs().reshape(-1).sort().values[j - 1]  # the j-th smallest magnitude
            want = torch.where(x.abs() >= t, x, 0.0)
        assert torch.equal(prune_magnitude(x, prune, rule="released"), want)


def _large_keys():
    """Keys above the small-array cutoff, as the selection sees them: magnitude bit
    patterns of float16/bfloat16 (int16) and float32 (int32) factors, with ties,
    zeros, a sparse array, and arrays built so the strided sample misses."""

    from harness_merge.methods._ops import _sample_step

    g = torch.Generator().manual_seed(3)
    n = 70001
    base = {
        "randn": torch.randn(n, generator=g) * 0.02,
        "columns of unequal scale": (
            torch.randn(n // 16 + 1, 16, generator=g) * torch.logspace(-3, 0, 16)
        ).reshape(-1)[:n],
        "ties": torch.randint(-3, 4, (n,), generator=g) * 0.5,
        "zeros": torch.zeros(n),
        "sparse": torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1),
    }
    for name, x in base.items():
        for dtype, int_dtype, mask in (
            (torch.float16, torch.int16, 0x7FFF),
            (torch.bfloat16, torch.int16, 0x7FFF),
            (torch.float32, torch.int32, 0x7FFFFFFF),
        ):
            keys = x.to(dtype).contiguous().view(int_dtype).numpy() & mask
            yield f"{name} {dtype}", keys
            for fill in (0, int(keys.max())):  # every sampled key at one end: the bracket misses
                bad = keys.copy()
                bad[:: _sample_step(n)] = fill
                yield f"{name} {dtype}, sample at {fill}", bad


def test_kth_smallest_key_is_the_sorted_value():
    """Exact on every path (bracket hit, bracket missed either way, counting and
    partitioning): the oracle is numpy's sort."""
    from harness_merge.methods._ops import kth_smallest_key

    for name, keys in _large_keys():
        ordered = sorted(keys.tolist())
        n = len(ordered)
        for j in (1, 2, n // 2, int(0.8 * n), n - 1, n):
            assert kth_smallest_key(keys, j) == ordered[j - 1], (name, j)


def test_counting_selection_without_guesses_is_exact():
    """The counting passes alone (interpolation and bisection from the whole range)."""
    import numpy as np

    from harness_merge.methods._ops import _smallest_reaching

    rng = np.random.default_rng(0)
    for keys in (
        rng.integers(0, 2**15, 9000).astype(np.int16),
        rng.integers(0, 40, 9000).astype(np.int16),
        np.sort(rng.integers(0, 2**15, 9000)).astype(np.int16),
    ):
        ordered = np.sort(keys)
        for j in (1, 17, 4500, 8999, 9000):
            assert _smallest_reaching(keys, j, ()) == ordered[j - 1]
            assert _smallest_reaching(keys, j, (0, 2**15 - 1, 5)) == ordered[j - 1]
