"""POPE on local parquet: lmms-eval's own prompt, parsing and metrics."""

from lmms_eval.tasks.pope.utils import (  # noqa: F401
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_aggregate_yes_ratio,
    pope_doc_to_text,
    pope_doc_to_visual,
    pope_process_results,
)
