"""ScienceQA-IMG on local parquet: lmms-eval's own prompt, target and scoring."""

from lmms_eval.tasks.scienceqa.utils import (  # noqa: F401
    sqa_doc_to_target,
    sqa_doc_to_text,
    sqa_doc_to_visual,
    sqa_process_results,
)
