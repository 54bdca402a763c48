"""Failures of model ``merged`` made visible where the harness swallows them:
:func:`report_failure` prints a banner and records the error in
:data:`FAILURES`; the console scripts exit non-zero when it is not empty
(lmms-eval itself logs and exits 0)."""

from __future__ import annotations

import sys
import traceback

# Errors reported by a harness model in this process.
FAILURES: list[str] = []


def report_failure(exc: BaseException, where: str) -> None:
    """Print a banner for ``exc`` to stderr and remember it (see ``FAILURES``)."""
    from ..errors import MergeError

    msg = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
    FAILURES.append(f"{where}: {msg}")
    bar = "=" * 78
    lines = [bar, f"harness-merge ERROR ({where})", msg, bar]
    if not isinstance(exc, MergeError):
        lines.insert(3, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
    print("\n".join(lines), file=sys.stderr, flush=True)
