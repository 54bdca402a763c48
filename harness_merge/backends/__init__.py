"""Model servers behind one protocol (:mod:`harness_merge.backends.base`).

``load_backend("hf" | "vllm", artifact, base, **opts)`` imports the backend
module only when called: importing this package loads neither transformers
nor vLLM.
"""

from .base import BACKENDS, Backend, BackendError, GenRequest, LLRequest, load_backend

__all__ = ["BACKENDS", "Backend", "BackendError", "GenRequest", "LLRequest", "load_backend"]
