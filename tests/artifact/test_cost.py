"""Cost pre-check: a merge estimated beyond the limit is refused before any
tensor is merged, with the alternatives, unless forced; the estimate counts
flops from the shapes (written out here) and a measured rate."""

from __future__ import annotations

import json

import pytest

from harness_merge import cost, methods
from harness_merge.api import MergeSpec, merge
from harness_merge.cost import CostError, check_cost, estimate
from harness_merge.harness.cli import main
from harness_merge.inputs import open_inputs

# tests/conftest.py's tiny Qwen2: hidden 32, intermediate 48, one 16-wide kv head, 2 layers; adapters on q, v, down.
SHAPES = [(32, 32), (16, 32), (32, 48)] * 2  # (d_out, d_in)


def _flops_svd():
    return sum(m * n * min(m, n) for m, n in SHAPES)


def test_estimate_svd_of_dense_deltas(adapters):
    inputs = open_inputs([str(a) for a in adapters])
    ties = methods.get("ties")
    c = estimate(inputs, ties, ties.make_params({}), "lora")
    assert c is not None and c.kind == "svd" and c.flops == _flops_svd()
    assert "exact SVD of 6 full-rank ties deltas (largest 32x48)" in c.what
    assert any("--base" in a for a in c.alternatives)
    # full weights (--base) and low-rank methods: no SVD
    assert estimate(inputs, ties, ties.make_params({}), "full") is None
    ta = methods.get("ta")
    assert estimate(inputs, ta, ta.make_params({}), "lora") is None


def test_estimate_dense_wudi_on_cpu(adapters):
    inputs = open_inputs([str(a) for a in adapters])
    w = methods.get("wudi")
    p = w.make_params({"space": "dense", "iterations": 10})
    # a LoRA of a dense wudi is an SVD of its result first; full weights: the optimisation
    assert estimate(inputs, w, p, "lora").kind == "svd"
    c = estimate(inputs, w, p, "full")
    n = len(adapters)
    assert c.kind == "matmul" and c.flops == sum(2 * m * k * k * (n + 10) for m, k in SHAPES)
    assert any("device=cuda" in a for a in c.alternatives)
    assert estimate(inputs, w, w.make_params({"space": "factor"}), "lora") is None


def test_refused_unless_forced(adapters, monkeypatch, tmp_path):
    monkeypatch.setattr(cost, "_PESSIMISTIC_FLOPS", 1.0)  # no shortcut: always measure
    monkeypatch.setattr(cost, "_svd_rate", lambda: 1.0)  # 1 flop/s: the tiny merge is "hours"
    spec = MergeSpec(adapters=tuple(map(str, adapters)), method="ties")
    with pytest.raises(
        CostError,
        match=r"ties: refusing to start an exact SVD of 6 .* estimated .* "
        r"Alternatives: --base BASE.*--force",
    ):
        merge(spec, out=tmp_path / "o", cache_dir=tmp_path / "c")
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "c").rglob("harness_merge.json"))  # nothing half-written
    art = merge(spec, out=tmp_path / "o", cache_dir=tmp_path / "c", force=True, progress=False)
    assert art.kind == "lora"
    # a cache hit is never refused
    assert merge(spec, cache_dir=tmp_path / "c", progress=False).cache_hit
    monkeypatch.setenv("HARNESS_MERGE_FORCE", "1")
    assert merge(spec, use_cache=False, out=tmp_path / "o2", progress=False).kind == "lora"


def test_limit_from_the_environment(adapters, monkeypatch):
    inputs = open_inputs([str(a) for a in adapters])
    ties = methods.get("ties")
    monkeypatch.setattr(cost, "_PESSIMISTIC_FLOPS", 1.0)
    monkeypatch.setattr(cost, "_svd_rate", lambda: float(_flops_svd()))  # exactly 1 s
    monkeypatch.setenv("HARNESS_MERGE_MAX_SECONDS", "2")
    assert check_cost(inputs, ties, ties.make_params({}), "lora") is not None
    monkeypatch.setenv("HARNESS_MERGE_MAX_SECONDS", "0.5")
    with pytest.raises(CostError, match="estimated 1 s"):
        check_cost(inputs, ties, ties.make_params({}), "lora")
    monkeypatch.setenv("HARNESS_MERGE_MAX_SECONDS", "soon")
    with pytest.raises(Exception, match="HARNESS_MERGE_MAX_SECONDS must be a number"):
        check_cost(inputs, ties, ties.make_params({}), "lora")


def test_measured_rates_are_positive():
    assert cost._svd_rate() > 1e6 and cost._matmul_rate() > 1e6


def test_cli_refuses_then_forces(adapters, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cost, "_PESSIMISTIC_FLOPS", 1.0)
    monkeypatch.setattr(cost, "_svd_rate", lambda: 1.0)
    args = [
        "merge",
        "--adapters",
        *map(str, adapters),
        "--method",
        "ties",
        "--out",
        str(tmp_path / "o"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "--force" in err and not (tmp_path / "o").exists()
    assert main([*args, "--force"]) == 0
    out = capsys.readouterr()
    assert "merge ties: " in out.err  # the progress bar, on stderr
    assert json.loads((tmp_path / "o" / "harness_merge.json").read_text())["method"] == "ties"
