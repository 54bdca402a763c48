"""The backend seam (``harness_merge.backends.base``): request types, rolling
windows, stop strings, ``load_backend``'s errors. (Moved from
tests/harness/test_model_args.py.)"""

from __future__ import annotations

import pytest

from harness_merge.backends.base import (
    BackendError,
    GenRequest,
    LLRequest,
    cut_at_stop,
    load_backend,
    rolling_windows,
)


def test_rolling_windows_cover_every_token_once():
    toks = list(range(10, 33))
    for max_len in (1, 4, 7, 50):
        wins = rolling_windows(toks, 0, max_len)
        assert [t for _, ts in wins for t in ts] == toks
        for ctx, tgt in wins:
            assert len(ctx) + len(tgt) - 1 <= max_len and len(ctx) >= 1
    assert rolling_windows([], 0, 4) == []


def test_cut_at_stop_takes_earliest():
    assert cut_at_stop("abc\ndef.ghi", [".", "\n"]) == "abc"
    assert cut_at_stop("abc", ["", "x"]) == "abc"


def test_request_types_validate():
    with pytest.raises(ValueError):
        GenRequest()
    with pytest.raises(ValueError):
        LLRequest(continuation="x", context="a", messages=({"role": "user", "content": "a"},))
    assert GenRequest(prompt="a", temperature=0.7, do_sample=True).greedy is False
    assert GenRequest(prompt="a", temperature=0.0, do_sample=True).greedy is True


def test_load_backend_unknown_name():
    with pytest.raises(BackendError, match="available: hf, vllm"):
        load_backend("tgi", None, "/b")


def test_load_backend_vllm_missing_says_how_to_install(monkeypatch):
    import builtins
    import sys

    if "harness_merge.backends.vllm" in sys.modules:
        pytest.skip("a vllm backend module is importable here")
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError("No module named 'vllm'", name="vllm")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(BackendError, match=r"scripts/setup_vllm.sh|not available"):
        load_backend("vllm", None, "/b")
