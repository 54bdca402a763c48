"""MMBench-EN dev on local parquet: lmms-eval's own prompt and results, scored
with its static aggregation (option letter / regex / substring matching;
``eval_method="static"``), never the GPT matcher, so nothing calls an API."""

from lmms_eval.tasks.mmbench.en_utils import (  # noqa: F401
    mmbench_aggregate_dev_results_static,
    mmbench_doc_to_text,
    mmbench_doc_to_visual,
    mmbench_process_results,
)
