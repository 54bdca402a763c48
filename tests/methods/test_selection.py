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
