"""The ``lmms_eval`` command: lmms-eval 0.7.3's own CLI (it installs only
``lmms-eval``), plus a non-zero exit status when model ``merged`` failed.

lmms-eval catches an exception raised while a model loads or answers, logs
it and exits 0; our model records its failures (see
``harness_merge.harness.FAILURES``), and this wrapper turns them into exit
status 1 with a summary on stderr.
"""

from __future__ import annotations

import sys


def _finish(code: int | None) -> int:
    from . import FAILURES

    if FAILURES:
        print("\n[harness-merge] the run failed:\n  " + "\n  ".join(FAILURES), file=sys.stderr, flush=True)
        return code if isinstance(code, int) and code else 1
    return code if isinstance(code, int) else (0 if code is None else 1)


def _evaluation_failed(e: BaseException) -> None:
    """Record an exception of one evaluation (lmms-eval logs it and goes on)
    unless model 'merged' reported it already."""
    from . import FAILURES

    if not any(f.startswith("lmms-eval model 'merged'") for f in FAILURES):
        FAILURES.append(f"lmms-eval evaluation: {type(e).__name__}: {e}")


def main() -> int:
    from lmms_eval.cli.dispatch import main as lmms_main

    from ._compat import watch_evaluations

    watch_evaluations(_evaluation_failed)

    from . import close_backends

    try:
        lmms_main()
        code: int | None = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    finally:
        close_backends()
    sys.exit(_finish(code))


if __name__ == "__main__":
    main()
