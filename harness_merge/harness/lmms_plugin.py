"""Entry point ``lmms_eval.models: merged`` (pyproject.toml).

lmms-eval 0.7.3 builds its model registry when ``lmms_eval.models`` is first
imported, loading every entry point of the group then; one that fails to load
stops the loop and drops every plugin after it. This module imports nothing of
lmms-eval at import time, so it loads whatever imported lmms-eval first, even
``import harness_merge.harness.lmms_model`` (which imports lmms-eval, which
loads this entry point while ``lmms_model`` is still half-initialized).
"""

from __future__ import annotations

MODEL_ID = "merged"
CLASS_PATH = "harness_merge.harness.lmms_model.MergedLMM"


def manifest():
    """The ``ModelManifest`` of model ``merged`` (its class is imported only
    when ``--model merged`` is asked for)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


__all__ = ["CLASS_PATH", "MODEL_ID", "manifest"]
