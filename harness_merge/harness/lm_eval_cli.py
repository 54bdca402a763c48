"""The ``lm-eval-merged`` command: lm-eval's own CLI with model ``merged`` registered.

lm-eval 0.4.13 finds models only in its registry, filled by imports; this
wrapper imports :mod:`harness_merge.harness.lm_eval_model` first and exits
non-zero (with a summary on stderr) when the model reported a failure.
"""

from __future__ import annotations

import sys


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import (
        FAILURES,
        close_backends,
        lm_eval_model,  # noqa: F401  (registers "merged")
    )

    code: int | str | None = 0
    try:
        cli_evaluate()
    except SystemExit as e:
        code = e.code
    except Exception:
        if not FAILURES:
            raise
        code = 1
    finally:
        close_backends()
    if FAILURES:
        print("\n[harness-merge] the run failed:\n  " + "\n  ".join(FAILURES), file=sys.stderr, flush=True)
        sys.exit(code if isinstance(code, int) and code else 1)
    sys.exit(code)


if __name__ == "__main__":
    main()
