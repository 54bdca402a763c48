"""ChartQA on local parquet: lmms-eval's own prompt and relaxed accuracy."""

from lmms_eval.tasks.chartqa.utils import (  # noqa: F401
    chartqa_doc_to_text,
    chartqa_doc_to_visual,
    chartqa_process_results,
)
