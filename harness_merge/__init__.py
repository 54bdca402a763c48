"""harness-merge: merge fine-tuned adapters and evaluate the merge in the harnesses.

``from harness_merge.api import MergeSpec, merge`` is the programmatic entry;
``harness-merge`` the command. Importing this package loads neither vLLM nor
the harnesses.
"""

__version__ = "0.1.0"
