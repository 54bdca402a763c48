"""MME on local parquet: lmms-eval's own prompt, Yes/No parsing and pairwise score."""

from lmms_eval.tasks.mme.utils import (  # noqa: F401
    mme_aggregate_results,
    mme_doc_to_text,
    mme_doc_to_visual,
    mme_process_results,
)
