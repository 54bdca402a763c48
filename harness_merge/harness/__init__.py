"""Harness adapters (layer 5): lmms-eval model ``merged`` (:mod:`.lmms_model`,
registered by :mod:`.lmms_plugin`), lm-eval model ``merged``
(:mod:`.lm_eval_model`), their console scripts (:mod:`.lmms_cli`,
:mod:`.lm_eval_cli`) and ``harness-merge`` (:mod:`.cli`).

Shared by the adapters: the ``model_args`` parser (:mod:`.model_args`), prompt
profiles (:mod:`.profiles`), merge-and-serve (:mod:`.serve`), failure reporting
(:mod:`.failures`) and every hook into the harnesses' private names
(:mod:`._compat`).

Importing this package imports no harness, no transformers and no vLLM.
"""

from __future__ import annotations

from .failures import FAILURES, report_failure
from .serve import (
    Loaded,
    _dora_for_backend,  # noqa: F401  (tests/inputs/test_dora.py)
    close_backends,
    dist_env,
    load_merged,
    merge_progress,
    rank_device,
    run_id,
)

__all__ = [
    "FAILURES",
    "Loaded",
    "close_backends",
    "dist_env",
    "load_merged",
    "merge_progress",
    "rank_device",
    "report_failure",
    "run_id",
]
