"""RefCOCO bbox REC on local parquet: lmms-eval's own preprocessing (normalised
xyxy boxes, one row per referring expression), prompt, parsing and IoU metrics."""

from lmms_eval.tasks.refcoco.utils_rec import (  # noqa: F401
    refcoco_bbox_rec_acc01,
    refcoco_bbox_rec_acc03,
    refcoco_bbox_rec_acc05,
    refcoco_bbox_rec_acc07,
    refcoco_bbox_rec_acc09,
    refcoco_bbox_rec_center_acc,
    refcoco_bbox_rec_doc_to_text,
    refcoco_bbox_rec_doc_to_visual,
    refcoco_bbox_rec_iou,
    refcoco_bbox_rec_preprocess_dataset,
    refcoco_bbox_rec_process_result,
)
