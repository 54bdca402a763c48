"""Exact order statistics of values streamed in chunks, with bounded memory.

A two-pass radix selection over the 32-bit keys of float32 values: pass 1
counts the top 16 bits of every key (65536 bins per row), which locates the
bin holding each wanted rank; pass 2 counts the low 16 bits of the keys in
that bin, which gives the exact value. Memory: two (rows, 65536) int64 count
tables, whatever the number of values. The same values in any chunking give
the same answer as ``torch.sort(all_values)[rank]``.

Pure tensor functions; the merge driver streams the chunks.
"""

from __future__ import annotations

import torch

BINS = 1 << 16
_SIGN = 1 << 31


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """Monotone map float32 -> int64 in [0, 2^32): ``a < b`` iff ``key(a) < key(b)``
    (-0.0 sorts just below +0.0)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + _SIGN, _SIGN - 1 - (bits & 0x7FFFFFFF))


def key_value(key: int) -> float:
    """Inverse of :func:`sort_keys` for one key."""
    if key >= _SIGN:
        bits = key - _SIGN
    else:  # a negative float: the sign bit set over the magnitude bits
        bits = (_SIGN - 1 - key) - _SIGN
    t = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
    return float(t[0])


def count_high(rows: torch.Tensor) -> torch.Tensor:
    """(R, BINS) counts of the top 16 key bits of each row of ``rows`` (R, D)."""
    keys = sort_keys(rows) >> 16
    offs = torch.arange(rows.shape[0], dtype=torch.int64).unsqueeze(1) * BINS
    return torch.bincount((keys + offs).reshape(-1), minlength=rows.shape[0] * BINS).reshape(-1, BINS)


def locate(high: torch.Tensor, ranks: list[list[int]]) -> list[list[tuple[int, int]]]:
    """For each row's wanted 0-based ranks: ``(bin, rank within the bin)``."""
    cum = high.cumsum(dim=1)
    out = []
    for r, wanted in enumerate(ranks):
        row = []
        for k in wanted:
            b = int(torch.searchsorted(cum[r], torch.tensor(k, dtype=cum.dtype), right=True))
            before = int(cum[r, b - 1]) if b > 0 else 0
            row.append((b, k - before))
        out.append(row)
    return out


def count_low(rows: torch.Tensor, bins: list[list[tuple[int, int]]]) -> list[list[torch.Tensor]]:
    """Per row and wanted rank, (BINS,) counts of the low 16 key bits of the
    entries whose top bits fall in that rank's bin."""
    keys = sort_keys(rows)
    out = []
    for r, wanted in enumerate(bins):
        kr = keys[r]
        hi = kr >> 16
        out.append([torch.bincount(kr[hi == b] & (BINS - 1), minlength=BINS) for b, _ in wanted])
    return out


def resolve(bins: list[list[tuple[int, int]]], low: list[list[torch.Tensor]]) -> list[list[float]]:
    """The exact values at the wanted ranks."""
    out = []
    for wanted, counts in zip(bins, low):
        row = []
        for (b, k), c in zip(wanted, counts):
            low_bits = int(torch.searchsorted(c.cumsum(0), torch.tensor(k, dtype=torch.int64), right=True))
            row.append(key_value((b << 16) | low_bits))
        out.append(row)
    return out
